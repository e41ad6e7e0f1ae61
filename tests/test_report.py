"""The stability report: built from a real smoke sweep with evaluation, from a sweep that is still running and
from an HPO study (real local Ray cluster, real Parquet), then opened in headless Chromium.

Chromium (Debian's ``chromium``; ``.ci/run`` installs it where apt is available) loads each page from disk; the
page's own script records every figure's laid-out size, which the dumped DOM shows, and Chromium's log shows
any console message. Tests that need the browser skip only when no Chromium binary exists.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from orchestrator import report
from orchestrator.plots import pareto_mask
from orchestrator.results import ResultStore
from orchestrator.stability import stability_table
from pcdarts_core import visualize as drawing

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium binary (chromium, chromium-browser, google-chrome) on PATH: .ci/run installs Debian's "
                "chromium where apt is available")


def open_in_chromium(page: Path, tmp: Path) -> tuple[str, list[str]]:
    """Load ``page`` headless; return (the DOM after load, the console messages Chromium logged)."""
    proc = subprocess.run(
        [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--window-size=1400,1000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def assert_renders(page: Path, tmp: Path) -> str:
    """The page loads without console messages and every figure was laid out non-empty. Returns the DOM."""
    source = page.read_text(encoding="utf-8")
    n_figures = source.count('<figure class="fig')
    assert n_figures > 0
    dom, console = open_in_chromium(page, tmp)
    assert console == [], console
    assert f'data-figures="{n_figures}:{n_figures}"' in dom, re.findall(r'data-figures="[^"]*"', dom)
    sizes = re.findall(r'<figure class="fig[^"]*" id="([^"]+)" data-size="(\d+)x(\d+):(\d+)"', dom)
    assert len(sizes) == n_figures
    empty = [fid for fid, w, h, marks in sizes if int(w) < 50 or int(h) < 30 or int(marks) == 0]
    assert empty == [], empty
    # no text covers another (edge labels, titles, legends), and nothing is wider than the window
    overlaps = re.findall(r'<figure class="fig[^"]*" id="([^"]+)" data-size="[^"]*" data-overlaps="(\d+)"', dom)
    assert len(overlaps) == n_figures
    assert [fid for fid, n in overlaps if n != "0"] == []
    assert 'data-overflow="0"' in dom, re.findall(r'data-overflow="[^"]*"', dom)
    return dom


def assert_self_contained(text: str) -> None:
    """Nothing is loaded from anywhere: no external scripts, styles, images or fonts."""
    assert not re.search(r'<(script|img|link|iframe)[^>]+(src|href)=', text)
    assert "@import" not in text and "url(http" not in text
    # SVG namespace declarations are names, not loads; any other absolute URL would be a load.
    urls = set(re.findall(r'https?://[^\s"\'<>)]+', text)) - {"http://www.w3.org/2000/svg",
                                                              "http://www.w3.org/1999/xlink"}
    assert urls == set(), urls


def figure_ids(text: str) -> set[str]:
    return set(re.findall(r'<figure class="fig[^"]*" id="([^"]+)"', text))


# -- the browser check itself can fail ----------------------------------------------------------------------------
def test_browser_check_sees_console_errors_and_empty_figures(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<html><body><figure class="fig" id="f"><svg width="0" height="0"></svg></figure>'
                    f'<script>{report.CHECK_SCRIPT}</script><script>console.error("boom")</script></body></html>')
    dom, console = open_in_chromium(page, tmp_path)
    assert any('"boom"' in line for line in console)
    assert 'data-figures="1:0"' in dom
    with pytest.raises(AssertionError):
        assert_renders(page, tmp_path)


def test_browser_check_sees_overlapping_texts_and_a_page_too_wide(tmp_path):
    page = tmp_path / "crowded.html"
    svg = ('<svg width="200" height="80"><text x="10" y="30">sep 3x3</text><text x="14" y="32">skip</text>'
           '<g class="mpl-legend"><text x="100" y="60" transform="rotate(-0 100 60)">seed 0</text></g>'
           '<text x="104" y="62" transform="rotate(-90 104 62)">title</text><path d="M0 0L1 1"/></svg>')
    page.write_text(f'<html><body><figure class="fig" id="f">{svg}</figure><div style="width:3000px">wide</div>'
                    f'<script>{report.CHECK_SCRIPT}</script></body></html>')
    dom, _ = open_in_chromium(page, tmp_path)
    assert 'data-overlaps="2"' in dom  # two labels, and a legend's text over another (even a rotated one)
    assert re.search(r'data-overflow="[1-9]\d*"', dom)
    with pytest.raises(AssertionError):
        assert_renders(page, tmp_path)


# -- a finished smoke sweep with evaluation ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(smoke_sweep):
    """The session's smoke sweep (2 groups x 2 seeds) with evaluation, plus two random cells and a published one
    retrained under its protocol (tests/conftest.py): (its folder, what the sweep and the evaluate command
    printed)."""
    return smoke_sweep["exp"], smoke_sweep["sweep_out"] + smoke_sweep["evaluate_out"]


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_and_evaluate_write_the_report(smoke):
    exp, printed = smoke
    page = exp / report.REPORT_FILE
    assert page.is_file()
    assert printed.count(f"report: {page}") == 2  # once after the sweep, once after the evaluation


@pytest.mark.ray
@pytest.mark.slow
def test_report_shows_every_figure_of_every_group(smoke):
    exp, _ = smoke
    text = (exp / report.REPORT_FILE).read_text(encoding="utf-8")
    assert_self_contained(text)
    assert "fig-error" not in text.replace(".fig-error{", "")
    ids = figure_ids(text)
    store = ResultStore(str(exp.parent), exp.name)
    trials = store.read("trials")
    table = stability_table(trials, store.read("epochs"), store.read("evaluations"))
    groups = table.column("group").to_pylist()
    assert groups == ["method=pcdarts,k=2", "method=pcdarts,k=4"]
    assert {"ov-acc0", "ov-acc1", "ov-pareto", "ov-curves"} <= ids
    for i, _ in enumerate(groups):
        expected = {f"g{i}-acc", f"g{i}-dist", f"g{i}-curves"}
        expected |= {f"g{i}-{what}-{cell}" for what in ("cons", "best", "freq", "alpha")
                     for cell in ("normal", "reduce")}
        assert expected <= ids, expected - ids
        seed_cells = {x for x in ids if x.startswith(f"g{i}-s")}
        assert len(seed_cells) == 2 * 2  # two seeds, two cells each
    # The table shows stability.py's numbers; the baselines and the published cell are in the figures.
    for row in table.to_pylist():
        assert f"{row['val_acc_mean']:.3f} [{row['val_acc_ci_low']:.3f}, {row['val_acc_ci_high']:.3f}]" in text
        assert f"{row['genotype_distance_mean']:.3f}" in text
    assert ">random cells<" in text and ">published DARTS_V2<" in text
    assert "Still running" not in text
    assert "stability sweep · 2 group(s)" in text and "search stability report" in text


@pytest.mark.ray
@pytest.mark.slow
def test_report_marks_the_reference_levels(smoke):
    """Chance accuracy (1/10 classes), random DARTS cells' mean distance and the uniform entropy (log 8), as
    labelled lines in the figures that show accuracy, distance and entropy, and in one line of text."""
    exp, _ = smoke
    text = (exp / report.REPORT_FILE).read_text(encoding="utf-8")
    assert ("Reference levels (dotted red lines in the figures): chance accuracy 0.100 (synthetic) · random "
            "cells&#39; distance 0.909 (darts) · uniform arch entropy 2.079 (log 8).") in text
    for fid, labels in (("ov-acc0", ["chance 0.100"]), ("ov-curves", ["chance 0.100", "uniform α 2.079"]),
                        ("ov-pareto", ["random cells 0.909", "chance 0.100"]), ("g0-acc", ["chance 0.100"]),
                        ("g1-curves", ["uniform α 2.079", "chance 0.100", "random cells 0.909"])):
        texts = _svg_texts(text, fid)
        for label in labels:
            assert label in texts, (fid, label, texts)
    assert "mean pairwise distance (random cells 0.909)" in text and "search val acc mean [CI] (chance 0.100)" in text


def _svg_texts(page: str, fid: str) -> list[str]:
    """The texts drawn in the figure ``fid`` of a page."""
    svg = re.search(rf'<figure class="fig[^"]*" id="{re.escape(fid)}">(.*?)</figure>', page, re.S).group(1)
    return [re.sub(r"\s+", " ", t).strip() for t in re.findall(r"<text[^>]*>(.*?)</text>", svg, re.S)]


@pytest.mark.ray
@pytest.mark.slow
def test_report_renders_in_chromium(smoke, tmp_path):
    exp, _ = smoke
    dom = assert_renders(exp / report.REPORT_FILE, tmp_path)
    assert "k=2" in dom and "k=4" in dom


@pytest.mark.ray
@pytest.mark.slow
def test_report_command_writes_where_asked(smoke, tmp_path):
    exp, _ = smoke
    out = tmp_path / "sub" / "r.html"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.report", str(exp), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"report: {out}"
    assert figure_ids(out.read_text(encoding="utf-8")) == figure_ids((exp / report.REPORT_FILE).read_text("utf-8"))


def test_report_command_bad_input_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.report", "nothing", "--storage", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no results of experiment 'nothing'")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.ray
@pytest.mark.slow
def test_report_shows_benchmark_accuracies_where_looked_up(smoke, tmp_path):
    """NB201 lookups arrive as bench_acc_<dataset> columns of the trials: each gets its own accuracy rows."""
    exp, _ = smoke
    source = ResultStore(str(exp.parent), exp.name)
    copy = ResultStore(str(tmp_path), "bench")
    trials = source.read("trials")
    acc = [0.9 + 0.01 * i for i in range(trials.num_rows)]
    copy.write_table("trials", trials.append_column("bench_acc_cifar10", pa.array(acc, pa.float64())))
    for kind in ("epochs", "evaluations"):
        copy.write_table(kind, source.read(kind))
    page = Path(report.write_report(copy))
    text = page.read_text(encoding="utf-8")
    assert ">NB201 cifar10 test acc<" in text  # the across-groups forest
    assert text.count(">NB201 cifar10 (2)<") == 2  # and one row in each group's forest
    assert_renders(page, tmp_path)


# -- a sweep that is still running ---------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_report_of_a_running_sweep(ray_cluster, tmp_path):
    storage = tmp_path / "results"
    args = ["stability", "--preset", "smoke", "--storage", str(storage), "--address", ray_cluster,
            "--set", "epochs=40", "--set", "grid.k=[4]", "--set", "hessian_every=1"]
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        store = ResultStore(str(storage), "smoke")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the sweep ended before the report was built"
            epochs = store.read("epochs")
            if epochs.num_rows and len(set(epochs.column("trial_id").to_pylist())) == 2 and \
                    min(_epochs_per_trial(epochs).values()) >= 2:
                break
            time.sleep(0.5)
        else:
            pytest.fail("no epochs written within 300 s")
        page = tmp_path / "running.html"
        built = subprocess.run([sys.executable, "-m", "orchestrator.report", str(storage / "smoke"), "--out",
                                str(page)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.poll() is None, "the sweep finished while the report was built: not a running sweep"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert built.returncode == 0, built.stderr
    text = page.read_text(encoding="utf-8")
    assert "Still running" in text and 'class="pill running"' in text
    assert "Running searches show the genotype of their latest epoch" in text
    ids = figure_ids(text)
    assert {"g0-curves", "g0-alpha-normal", "g0-alpha-reduce"} <= ids
    assert "Hessian eigenvalue" in text  # recorded every epoch here: its panel is drawn
    assert len([x for x in ids if x.startswith("g0-s")]) == 2 * 2  # both running seeds' current cells
    assert_renders(page, tmp_path)


def _epochs_per_trial(epochs: pa.Table) -> dict[str, int]:
    out: dict[str, int] = {}
    for tid in epochs.column("trial_id").to_pylist():
        out[tid] = out.get(tid, 0) + 1
    return out


# -- an HPO study ------------------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_hpo_study_report_has_the_pareto_front(smoke_hpo, tmp_path):
    exp, printed = smoke_hpo  # the session's HPO study (tests/conftest.py)
    page = exp / report.REPORT_FILE
    assert f"report: {page}" in printed
    text = page.read_text(encoding="utf-8")
    assert "HPO study" in text and "HPO Pareto front" in text
    assert "ov-pareto" in figure_ids(text)
    assert_renders(page, tmp_path)


# -- pieces ----------------------------------------------------------------------------------------------------------
def test_cell_graphs_of_darts_and_nb201_cells():
    from pcdarts_core.genotypes import PUBLISHED

    (n, normal), (r, reduce) = drawing.cell_graphs(PUBLISHED["PC_DARTS_CIFAR"])
    assert (n, r) == ("normal", "reduce")
    assert normal.inputs == ("c_{k-2}", "c_{k-1}") and normal.nodes == ("0", "1", "2", "3")
    assert len(normal.edges) == 8 and normal.output == ("0", "1", "2", "3")
    assert ("c_{k-2}", "0", "skip_connect") in normal.edges
    arch = "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|skip_connect~2|"
    [(name, cell)] = drawing.cell_graphs(arch)
    assert name == "cell" and cell.inputs == ("0",) and cell.nodes == ("1", "2", "3") and cell.output == ("3",)
    assert ("1", "2", "skip_connect") in cell.edges and len(cell.edges) == 6
    for bad in ("|nor_conv_3x3~1|", "|nor_conv_3x3~0|+|x|", "nor_conv_3x3~0"):
        with pytest.raises(ValueError):
            drawing.cell_graphs(bad)
    with pytest.raises(ValueError, match="backwards"):
        drawing.CellGraph(("a",), ("b", "c"), (("c", "b", "op"),), ("c",))


def test_cell_svg_draws_every_edge_with_its_op():
    arch = "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|skip_connect~2|"
    [(_, svg)] = drawing.genotype_svgs(arch, "nb201")
    assert svg.startswith("<svg")
    labels = re.findall(r"<text[^>]*>([^<]+)</text>", svg)
    for label in ("conv 3x3", "none", "skip", "avg 3x3", "conv 1x1"):
        assert label in " ".join(labels), (label, labels)


def test_genotype_show_svg(tmp_path):
    out = tmp_path / "cells.svg"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.genotype", "show", "DARTS_V2", "--svg", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<?xml") and text.count("<svg") == 3  # a document holding both cells
    assert "DARTS_V2 — normal cell" in text and "DARTS_V2 — reduce cell" in text
    import xml.dom.minidom

    xml.dom.minidom.parseString(text)  # well-formed


def test_pareto_mask_and_short_labels():
    mask = pareto_mask([0.1, 0.2, 0.3, 0.2, float("nan")], [0.5, 0.7, 0.6, 0.4, 0.9])
    assert mask.tolist() == [True, True, False, False, False]
    labels = report.short_labels(["method=darts,arch_lr=0.001,k=2", "method=darts,arch_lr=0.01,k=2"])
    assert labels == {"method=darts,arch_lr=0.001,k=2": "arch_lr=0.001", "method=darts,arch_lr=0.01,k=2":
                      "arch_lr=0.01"}
    # one group (one run): named by its method, its whole text shown beside
    assert report.short_labels(['method=x,ops=["a","b"],k=1']) == {'method=x,ops=["a","b"],k=1': 'method=x'}
    assert report.short_labels(['ops=["a","b"],k=1']) == {'ops=["a","b"],k=1': 'ops=["a","b"],k=1'}


# -- reference levels in every space ------------------------------------------------------------------------------
def test_report_of_an_nb201_experiment_marks_its_own_levels(tmp_path):
    """A NAS-Bench-201 experiment (hand-made rows as a sweep writes them): random NB201 cells' distance and log 5,
    not the DARTS space's levels; chance of its dataset's 120 classes."""
    import math

    from pcdarts_core.nb201_arch import random_arch

    store = ResultStore(str(tmp_path), "nb201")
    trials, epochs = [], []
    for k in (2, 4):
        for seed in (0, 1):
            tid = f"k{k}s{seed}"
            arch = random_arch(seed + k).to_json()
            trials.append({"trial_id": tid, "group": f"method=darts,k={k}", "seed": seed, "status": "done",
                           "val_acc": 0.2 + 0.01 * seed, "genotype": arch, "epochs_done": 2,
                           "cfg_dataset": "imagenet16-120", "cfg_search_space": "nb201"})
            for epoch in (1, 2):
                epochs.append({"trial_id": tid, "group": f"method=darts,k={k}", "seed": seed, "epoch": epoch,
                               "val_acc": 0.1 * epoch, "genotype": arch, "arch_entropy": 1.6 - 0.01 * epoch,
                               "n_skip_normal": 1, "alphas_normal": [[0.1 * epoch, 0.0, 0.0, 0.0, 0.0]] * 6})
    store.write_table("trials", pa.Table.from_pylist(trials))
    store.write_table("epochs", pa.Table.from_pylist(epochs))
    page = Path(report.write_report(store))
    text = page.read_text(encoding="utf-8")
    assert (f"chance accuracy {1 / 120:.3f} (imagenet16-120) · random cells&#39; distance 0.801 (nb201) · uniform "
            f"arch entropy {math.log(5):.3f} (log 5)") in text
    assert "uniform α 1.609" in _svg_texts(text, "ov-curves") and "random cells 0.801" in _svg_texts(text, "g0-curves")
    assert "random cells 0.801" in _svg_texts(text, "ov-pareto")
    assert_renders(page, tmp_path)


# -- the report of one run --------------------------------------------------------------------------------------------
def test_report_of_a_single_run_is_laid_out_for_one_run(tmp_path):
    """``search single`` then ``report`` of it: short label, one run's page (no sweep's overview, agreement or
    per-seed folds), no warnings from matplotlib, nothing overflowing or covering text in the browser."""
    storage = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "orchestrator.search", "single", "--preset", "smoke", "--method",
                          "rome", "--storage", str(storage)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    exp = storage / "smoke-rome-synthetic-s0"
    built = subprocess.run([sys.executable, "-W", "default", "-m", "orchestrator.report", str(exp)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert built.stderr == ""  # no constrained_layout (or any other) warning
    text = (exp / report.REPORT_FILE).read_text(encoding="utf-8")
    assert "stability sweep" not in text and "search stability report" not in text
    assert "smoke-rome-synthetic-s0 — search report" in text and "single search ·" in text
    assert "<h2>method=rome</h2>" in text and "<code>method=rome,batch_size=" in text
    assert 'id="overview"' not in text and "Agreement across seeds" not in text and "cells of the 1 seeds" not in text
    assert {"g0-best-normal", "g0-best-reduce", "g0-curves"} <= figure_ids(text)
    legend = _svg_texts(text, "g0-alpha-normal")  # RoMe's 7 ops by name (and colour), not "op 0".."op 6"
    assert "max 3x3" in legend and "op 0" not in legend
    assert "Reference levels (dotted red lines in the figures): chance accuracy 0.100 (synthetic)" in text
    assert_renders(exp / report.REPORT_FILE, tmp_path)


# -- cells and colours --------------------------------------------------------------------------------------------
def test_cell_diagrams_labels_never_overlap(tmp_path):
    """Every published cell and 20 random cells of each space, laid out by the browser: no op label covers
    another, a node's name or the title."""
    from pcdarts_core.genotypes import PUBLISHED
    from pcdarts_core.spaces import get_space

    cells = list(PUBLISHED.items()) + [(f"{space}{i}", get_space(space).random_cell(i))
                                       for space in ("darts", "nb201") for i in range(20)]
    figures = [f'<figure class="fig" id="{name}-{cell}">{svg}</figure>' for name, genotype in cells
               for cell, svg in drawing.genotype_svgs(genotype, name, name)]
    page = tmp_path / "cells.html"
    page.write_text(f'<html><body>{"".join(figures)}<script>{report.CHECK_SCRIPT}</script></body></html>')
    assert_renders(page, tmp_path)


def _lab(color: str) -> "np.ndarray":
    """CIELAB (D65) of a colour: distances there are what the eye sees."""
    import numpy as np
    from matplotlib.colors import to_rgb

    rgb = np.array(to_rgb(color))
    rgb = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ rgb
    f = np.cbrt(xyz / np.array([0.95047, 1.0, 1.08883]))
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_the_ops_of_a_space_have_distinct_colours():
    """none is the only grey; every two ops of one space are clearly apart (CIELAB distance >= 20)."""
    import numpy as np

    from pcdarts_core.spaces import SPACES

    for space in SPACES.values():
        ops = list(space.ops)
        labs = {op: _lab(drawing.op_color(op)) for op in ops}
        for op in ops:
            chroma = float(np.hypot(*labs[op][1:]))
            assert (chroma < 5) == (op == "none"), (space.name, op, chroma)
        close = [(a, b) for i, a in enumerate(ops) for b in ops[i + 1:] if np.linalg.norm(labs[a] - labs[b]) < 20]
        assert close == [], (space.name, close)
    assert np.linalg.norm(_lab(drawing.op_color("none")) - _lab(drawing.op_color("max_pool_3x3"))) > 40
