"""``python -m orchestrator.report EXPERIMENT [--storage S] [--out FILE]``: the stability report, one HTML file.

The file is self-contained (figures are inline SVG drawn by matplotlib, styles inline, nothing loaded from the
network), so it can be mailed, archived next to the Parquet files or opened from a bucket. It is built from the
experiment's results only (through :class:`orchestrator.results.ResultStore`), so it can be built at any time:
while a sweep is still running it shows what has arrived, with the unfinished searches marked.

What it shows, across groups and then per group (a group is a configuration; its seeds are independent
searches): the stability table; accuracy of every seed with the mean, its bootstrap CI and best - mean, next to
the retrained consensus cell, random cells and published cells under the same protocol, and NB201 benchmark
accuracies where looked up; the consensus cell, the best search's cell and every seed's cell as diagrams; how
often each (edge, op) was chosen across seeds; the pairwise genotype distances of the seeds; per-epoch curves
(op probabilities per edge, arch entropy, skip-connects in the normal cell, the Hessian eigenvalue where
recorded, train/val accuracy, distance to the final genotype with the epoch it stopped changing); for an HPO
study (and any experiment with several groups) accuracy vs genotype distance with the Pareto front.

The statistics are :mod:`orchestrator.stability`'s (``stability_table``, ``pairwise_distances``,
``summarize``, ``stopped_changing_epoch``): the report draws them, it does not compute them another way.
:func:`publish` is what sweeps, HPO studies and evaluations call when they end.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from pcdarts_core.genotypes import CELL_TYPES
from pcdarts_core.ops import OPS, PRIMITIVES

from .cli import Parser, run_cli, split_experiment
from pcdarts_core.stability import (Summary, cross_distances, encode, frequencies_from_json, pairwise_distances,
                                    stopped_changing_epoch, summarize)

from pcdarts_core.visualize import CellGraph, cell_graphs, figure_svg, genotype_svgs, node_label, op_color

from .plots import ForestRow, Panel, Series, forest, heatmap, line_panels, op_probability_grid, pareto, series_color
from .results import ResultStore, parse_source
from .stability import stability_table

REPORT_FILE = "report.html"
#: per-seed cell diagrams shown open; more seeds than this are folded (still in the page)
OPEN_SEED_CELLS = 8

_OP_ORDER = tuple(PRIMITIVES) + tuple(op for op in OPS if op not in PRIMITIVES)


# -- reading ----------------------------------------------------------------------------------------------------
def _rows(table: pa.Table) -> list[dict[str, Any]]:
    return table.to_pylist() if table.num_rows else []


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class SeedRun:
    """One search: its trials row (if written yet) and its epoch rows in epoch order."""

    trial_id: str
    group: str
    seed: Any
    status: str
    trial: dict[str, Any] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    eval_accs: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"seed {self.seed}"

    @property
    def genotype(self) -> str | None:
        """The trial's genotype when done, else the latest epoch's (what a running search would return now)."""
        if self.trial.get("genotype") and self.status == "done":
            return self.trial["genotype"]
        for row in reversed(self.epochs):
            if row.get("genotype"):
                return row["genotype"]
        return self.trial.get("genotype")

    @property
    def val_acc(self) -> float | None:
        if self.status == "done":
            return _finite(self.trial.get("val_acc"))
        return _finite(self.epochs[-1].get("val_acc")) if self.epochs else None

    @property
    def eval_acc(self) -> float | None:
        return sum(self.eval_accs) / len(self.eval_accs) if self.eval_accs else None

    @property
    def last_epoch(self) -> int | None:
        return self.epochs[-1].get("epoch") if self.epochs else self.trial.get("epochs_done")


@dataclass
class Experiment:
    """Everything the report shows, read once from the store."""

    name: str
    location: str
    trials: pa.Table
    epochs: pa.Table
    evaluations: pa.Table
    stability: pa.Table
    seeds: dict[str, list[SeedRun]]
    hpo: bool

    @property
    def groups(self) -> list[str]:
        return sorted(self.seeds)

    def stats(self, group: str) -> dict[str, Any]:
        for row in _rows(self.stability):
            if row["group"] == group:
                return row
        return {}

    def status_counts(self) -> dict[str, int]:
        counts = {"done": 0, "running": 0, "failed": 0}
        for runs in self.seeds.values():
            for run in runs:
                counts[run.status] = counts.get(run.status, 0) + 1
        return counts


def load_experiment(store: ResultStore) -> Experiment:
    """Read trials, epochs and evaluations; compute the stability table from them (never the stored copy, which
    a running sweep writes only at its end)."""
    trials, epochs, evaluations = store.read("trials"), store.read("epochs"), store.read("evaluations")
    runs: dict[str, SeedRun] = {}
    for row in _rows(trials):
        runs[row["trial_id"]] = SeedRun(row["trial_id"], row["group"], row.get("seed"), row.get("status") or
                                        "running", trial=row)
    for row in sorted(_rows(epochs), key=lambda r: (str(r["trial_id"]), r.get("epoch") or 0)):
        run = runs.get(row["trial_id"])
        if run is None:  # a search that has reported epochs but has no trials row yet (HPO seeds in flight)
            run = runs[row["trial_id"]] = SeedRun(row["trial_id"], row["group"], row.get("seed"), "running")
        run.epochs.append(row)
    for row in _rows(evaluations):
        if row.get("status") not in (None, "done") or _finite(row.get("test_acc")) is None:
            continue
        kind, value = parse_source(row["source"])
        if kind == "trial" and value in runs:
            runs[value].eval_accs.append(float(row["test_acc"]))
    seeds: dict[str, list[SeedRun]] = {}
    for run in runs.values():
        seeds.setdefault(run.group, []).append(run)
    for group in seeds:
        seeds[group].sort(key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0, r.trial_id))
    table = stability_table(trials, epochs, evaluations) if trials.num_rows else None
    hpo = "hpo_trial" in trials.column_names  # HPO rows name their Tune trial (one per configuration)
    return Experiment(store.name, store.root, trials, epochs, evaluations,
                      table if table is not None else pa.table({"group": pa.array([], pa.string())}), seeds, hpo)


# -- labels -------------------------------------------------------------------------------------------------------
_PAIR = re.compile(r",(?=[A-Za-z_][\w.]*=)")


def short_labels(groups: Sequence[str]) -> dict[str, str]:
    """Group texts without the ``key=value`` pairs all groups share (``method=pcdarts,k=4`` -> ``k=4``)."""
    parts = {g: _PAIR.split(g) for g in groups}
    common = set.intersection(*(set(p) for p in parts.values())) if len(groups) > 1 else set()
    return {g: ",".join(p for p in parts[g] if p not in common) or g for g in groups}


def _fmt(value: Any, spec: str = ".3f") -> str:
    v = _finite(value)
    return "–" if v is None else format(v, spec)


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


# -- figures --------------------------------------------------------------------------------------------------------
class Figures:
    """Builds figures by key; a figure that fails is shown as a one-line error in its place (the rest of the
    report still renders), and the errors are listed at the top."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def figure(self, key: str, caption: str, build: Callable[[], Any], wide: bool = False) -> str:
        try:
            made = build()
            svg = made if isinstance(made, str) else figure_svg(made, key)
        except Exception as err:  # noqa: BLE001 - one bad figure must not cost the whole report
            line = f"{caption or key}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            self.errors.append(line)
            return f'<div class="fig-error">figure not drawn — {_esc(line)}</div>'
        cls = "fig wide" if wide else "fig"
        text = f"<figcaption>{caption}</figcaption>" if caption else ""
        return f'<figure class="{cls}" id="{_esc(key)}">{svg}{text}</figure>'


def _summary_row(label: str, values: Sequence[float], color: str, summary: Summary | None = None,
                 points: Sequence[str] = ()) -> ForestRow:
    s = summary or summarize(values)
    ci = (s.ci_low, s.ci_high) if s.ci_low is not None and s.ci_high is not None and s.n > 1 else None
    return ForestRow(label, list(values), s.mean, ci, s.best_minus_mean if s.n > 1 else None, color, points)


def bench_columns(table: pa.Table) -> list[str]:
    return sorted(c for c in table.column_names if c.startswith("bench_acc_"))


def baseline_sources(evaluations: pa.Table) -> dict[str, list[float]]:
    """Retrained accuracies of the random and published cells, by label (the same protocol as the groups')."""
    out: dict[str, list[float]] = {}
    protocols = {r.get("protocol") for r in _rows(evaluations)} - {None}
    for row in _rows(evaluations):
        if row.get("status") not in (None, "done") or _finite(row.get("test_acc")) is None:
            continue
        kind, value = parse_source(row["source"])
        if kind not in ("random", "published"):
            continue
        label = "random cells" if kind == "random" else f"published {value}"
        if len(protocols) > 1 and row.get("protocol"):
            label += f" [{row['protocol']}]"
        out.setdefault(label, []).append(float(row["test_acc"]))
    return dict(sorted(out.items()))


def consensus_accs(evaluations: pa.Table) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for row in _rows(evaluations):
        if row.get("status") in (None, "done") and _finite(row.get("test_acc")) is not None:
            kind, value = parse_source(row["source"])
            if kind == "consensus":
                out.setdefault(value, []).append(float(row["test_acc"]))
    return out


def accuracy_rows(exp: Experiment, group: str) -> list[ForestRow]:
    """A group's accuracies: search val acc, retrained test acc, consensus, benchmark lookups, then baselines."""
    done = [r for r in exp.seeds[group] if r.status == "done"]
    rows = []
    val = [(r.val_acc, r.label) for r in done if r.val_acc is not None]
    if val:
        rows.append(_summary_row(f"search val acc ({len(val)} seeds)", [v for v, _ in val], "#1f77b4"))
    ev = [(r.eval_acc, r.label) for r in done if r.eval_acc is not None]
    if ev:
        rows.append(_summary_row(f"retrained test acc ({len(ev)})", [v for v, _ in ev], "#2ca02c"))
    cons = consensus_accs(exp.evaluations).get(group)
    if cons:
        rows.append(_summary_row("consensus cell, retrained", cons, "#17becf"))
    for col in bench_columns(exp.trials):
        vals = [_finite(r.trial.get(col)) for r in done]
        vals = [v for v in vals if v is not None]
        if vals:
            rows.append(_summary_row(f"NB201 {col[len('bench_acc_'):]} ({len(vals)})", vals, "#9467bd"))
    if ev or cons:
        for label, vals in baseline_sources(exp.evaluations).items():
            rows.append(_summary_row(label, vals, "#7f7f7f"))
    return rows


def overview_accuracy(exp: Experiment, labels: Mapping[str, str]) -> list[tuple[str, list[ForestRow]]]:
    """Across groups: one forest per metric (search val acc, retrained test acc, each benchmark dataset)."""
    out: list[tuple[str, list[ForestRow]]] = []
    metrics: list[tuple[str, Callable[[SeedRun], float | None]]] = [
        ("search val acc", lambda r: r.val_acc), ("retrained test acc", lambda r: r.eval_acc)]
    metrics += [(f"NB201 {c[len('bench_acc_'):]} test acc", lambda r, c=c: _finite(r.trial.get(c)))
                for c in bench_columns(exp.trials)]
    for title, get in metrics:
        rows = []
        for i, group in enumerate(exp.groups):
            vals = [v for v in (get(r) for r in exp.seeds[group] if r.status == "done") if v is not None]
            if vals:
                rows.append(_summary_row(labels[group], vals, series_color(i)))
        if not rows:
            continue
        if title == "retrained test acc":
            cons = consensus_accs(exp.evaluations)
            for i, group in enumerate(exp.groups):
                if cons.get(group):
                    rows.append(_summary_row(f"{labels[group]} consensus", cons[group], series_color(i)))
            rows += [_summary_row(label, vals, "#7f7f7f") for label, vals in baseline_sources(exp.evaluations).items()]
        out.append((title, rows))
    return out


#: the key of a cell in the epochs (``alphas_<cell>``) and frequency tables: a one-cell space's cell is 'normal'
def _cell_key(name: str) -> str:
    return name if name in CELL_TYPES else "normal"


def frequency_figure(stats: Mapping[str, Any], name: str, graph: CellGraph) -> Any:
    """Heatmap of how often each (op, edge) was chosen across the group's seeds (stability's edge_op JSON), over
    every edge the cell could have."""
    freqs = frequencies_from_json(stats.get("edge_op_frequencies")).get(_cell_key(name), {})
    seen = {op for per in freqs.values() for op in per}
    ops = [op for op in _OP_ORDER if op in seen] + sorted(seen - set(_OP_ORDER))
    slots = graph.slots()
    matrix = np.array([[freqs.get(graph.edge_key(s, d), {}).get(op, 0.0) for s, d in slots] for op in ops])
    return heatmap(matrix, ops, [f"{node_label(s)}→{node_label(d)}" for s, d in slots],
                   f"{name} cell: share of seeds choosing (op, edge)", cmap="Blues", fmt="{:.0%}",
                   row_colors=[op_color(op) for op in ops], colorbar="share of seeds")


def distance_figure(runs: Sequence[SeedRun]) -> Any:
    d = pairwise_distances([r.genotype for r in runs])
    labels = [f"s{r.seed}" for r in runs]
    return heatmap(d, labels, labels, "genotype distance between seeds", cmap="magma_r", fmt="{:.2f}",
                   colorbar="distance")


def alpha_ops(width: int, trial: Mapping[str, Any]) -> list[str]:
    """The op of each alpha column: the op list a ``cfg_*primitives*`` column gives, else the core's PRIMITIVES
    for 8 columns; other widths are named by position."""
    for key, value in trial.items():
        if key.startswith("cfg_") and "primitives" in key and isinstance(value, str):
            try:
                names = json.loads(value)
            except ValueError:
                names = None
            if isinstance(names, (list, tuple)) and len(names) == width and all(isinstance(n, str) for n in names):
                return list(names)
    if width == len(PRIMITIVES):
        return list(PRIMITIVES)
    return [f"op {i}" for i in range(width)]


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def alpha_figure(runs: Sequence[SeedRun], name: str, kept_by: CellGraph | None, title: str,
                 slots_of: CellGraph) -> Any:
    """Mean over seeds of softmax(alphas) per edge and op, per epoch (epochs whose alphas have the first
    epoch's shape: P-DARTS's pruned stages are left out). ``slots_of`` names the rows (every edge the cell could
    have); the ops ``kept_by`` (the consensus cell) kept are drawn thick."""
    col = f"alphas_{_cell_key(name)}"
    per_epoch: dict[int, list[np.ndarray]] = {}
    shape = None
    for run in runs:
        for row in run.epochs:
            a = row.get(col)
            if a is None:
                continue
            arr = np.asarray(a, dtype=float)
            shape = shape or arr.shape
            if arr.shape == shape:
                per_epoch.setdefault(int(row["epoch"]), []).append(_softmax(arr))
    if not per_epoch or shape is None:
        raise ValueError(f"no {col} in the epochs table")
    slots = slots_of.slots()
    if len(slots) != shape[0]:
        raise ValueError(f"{col} has {shape[0]} rows but the cell has {len(slots)} possible edges")
    epochs = np.array(sorted(per_epoch))
    probs = np.stack([np.mean(per_epoch[e], axis=0) for e in epochs])
    kept: dict[tuple[str, str], set[str]] = {}
    for src, dst, op in kept_by.edges if kept_by is not None else ():
        kept.setdefault((src, dst), set()).add(op)
    return op_probability_grid(epochs, probs, [(node_label(s), node_label(d)) for s, d in slots],
                               alpha_ops(shape[1], runs[0].trial), title,
                               [kept.get(slot, set()) for slot in slots] if kept_by is not None else ())


def _epoch_values(run: SeedRun, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in run.epochs:
        v = _finite(row.get(key))
        if v is not None and row.get("epoch") is not None:
            xs.append(int(row["epoch"]))
            ys.append(v)
    return xs, ys


def stop_epoch(run: SeedRun) -> int | None:
    """The epoch from which the seed's per-epoch genotype never changed (stability.stopped_changing_epoch)."""
    rows = [r for r in run.epochs if r.get("genotype")]
    if not rows:
        return None
    return stopped_changing_epoch([r["genotype"] for r in rows], [int(r["epoch"]) for r in rows])


def distance_to_final(run: SeedRun) -> tuple[list[int], list[float]]:
    rows = [r for r in run.epochs if r.get("genotype")]
    final = run.genotype
    if not rows or not final:
        return [], []
    d = cross_distances(encode([r["genotype"] for r in rows]), encode([final]))[:, 0]
    return [int(r["epoch"]) for r in rows], [float(v) for v in d]


def curve_panels(runs: Sequence[SeedRun], collapse_threshold: int | None) -> list[Panel]:
    """Per-seed curves of one group: what the search did epoch by epoch."""
    def series(key: str, marks: bool = False, dashed: bool = False, suffix: str = "") -> list[Series]:
        out = []
        for i, run in enumerate(runs):
            x, y = _epoch_values(run, key)
            if x:
                stop = stop_epoch(run) if marks else None
                out.append(Series(run.label + suffix, x, y, series_color(i), dashed, (stop,) if stop is not None
                                  else ()))
        return out

    panels = [Panel("arch entropy", "nats", series("arch_entropy", marks=True)),
              Panel("skip-connects (normal cell)", "count", series("n_skip_normal"),
                    ((collapse_threshold, f"collapse ≥ {collapse_threshold}"),) if collapse_threshold else ()),
              Panel("val acc (- - train)", "accuracy",
                    series("val_acc") + series("train_acc", dashed=True, suffix=" train"))]
    moved = []
    for i, run in enumerate(runs):
        x, y = distance_to_final(run)
        if x:
            stop = stop_epoch(run)
            moved.append(Series(run.label, x, y, series_color(i), marks=(stop,) if stop is not None else ()))
    if moved:
        panels.append(Panel("distance to final genotype", "distance", moved, ylim=(-0.03, 1.03)))
    hessian = series("hessian_eigenvalue")
    if hessian:
        panels.append(Panel("Hessian eigenvalue λmax", "λmax", hessian))
    return [p for p in panels if p.series]


def overview_curves(exp: Experiment, labels: Mapping[str, str]) -> list[Panel]:
    """Across groups: the mean over a group's seeds, per epoch, of entropy, skip-connects and val accuracy."""
    panels = []
    for key, title, unit in (("n_skip_normal", "skip-connects (normal cell)", "count"),
                             ("arch_entropy", "arch entropy", "nats"),
                             ("val_acc", "search val acc", "accuracy"),
                             ("hessian_eigenvalue", "Hessian eigenvalue λmax", "λmax")):
        lines = []
        for i, group in enumerate(exp.groups):
            per: dict[int, list[float]] = {}
            for run in exp.seeds[group]:
                for x, y in zip(*_epoch_values(run, key)):
                    per.setdefault(x, []).append(y)
            if per:
                xs = sorted(per)
                lines.append(Series(labels[group], xs, [float(np.mean(per[x])) for x in xs], series_color(i)))
        if lines:
            panels.append(Panel(title, unit, lines))
    return panels


def pareto_figure(exp: Experiment, labels: Mapping[str, str]) -> Any:
    rows = [r for r in _rows(exp.stability) if r.get("n_seeds")]
    x = [_finite(r.get("genotype_distance_mean")) for r in rows]
    y = [_finite(r.get("val_acc_mean")) for r in rows]
    ok = [i for i in range(len(rows)) if x[i] is not None and y[i] is not None]
    if not ok:
        raise ValueError("no group has two finished seeds yet (a distance needs a pair)")
    err = [(rows[i]["val_acc_ci_low"], rows[i]["val_acc_ci_high"]) if rows[i].get("val_acc_ci_low") is not None
           else None for i in ok]
    title = ("HPO Pareto front: accuracy vs stability" if exp.hpo else
             "accuracy vs stability of the groups (Pareto front)")
    return pareto([x[i] for i in ok], [y[i] for i in ok], [labels[rows[i]["group"]] for i in ok], title,
                  "mean pairwise genotype distance between seeds (lower = more stable)",
                  "mean search val acc (bar: 95% CI)", err)


# -- HTML -------------------------------------------------------------------------------------------------------
#: the page's stylesheet, and a script that marks every figure with its laid-out size once the page has loaded
#: (``data-size``) and the body with the count of non-empty figures (``data-figures``), which the tests read
CSS = (Path(__file__).parent / "report.css").read_text(encoding="utf-8")
CHECK_SCRIPT = (Path(__file__).parent / "report.js").read_text(encoding="utf-8")


def _keys(items: Iterable[tuple[str, str]]) -> str:
    return '<div class="keys">' + "".join(f'<div class="key"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>'
                                          for k, v in items) + "</div>"


def _acc_text(mean: Any, low: Any, high: Any) -> str:
    if _finite(mean) is None:
        return "–"
    text = _fmt(mean)
    if _finite(low) is not None and _finite(high) is not None:
        text += f" [{_fmt(low)}, {_fmt(high)}]"
    return text


def stability_html(exp: Experiment, labels: Mapping[str, str]) -> str:
    head = ("group", "seeds", "val acc [95% CI]", "best−mean", "retrained [CI]", "consensus retrained",
            "distance", "distinct", "skips (normal)", "collapsed", "stops changing")
    out = ['<table class="stats"><tr>' + "".join(f'<th class="{"l" if i == 0 else ""}">{h}</th>'
                                                 for i, h in enumerate(head)) + "</tr>"]
    for r in _rows(exp.stability):
        seeds = f"{r['n_seeds']}" + (f" (+{r['n_running']} running)" if r.get("n_running") else "") + \
            (f" ({r['n_failed']} failed)" if r.get("n_failed") else "")
        collapse = r.get("collapse_rate")
        cells = [f'<a href="#{_anchor(r["group"])}">{_esc(labels.get(r["group"], r["group"]))}</a>', seeds,
                 _acc_text(r.get("val_acc_mean"), r.get("val_acc_ci_low"), r.get("val_acc_ci_high")),
                 _fmt(r.get("best_minus_mean")),
                 _acc_text(r.get("eval_acc_mean"), r.get("eval_acc_ci_low"), r.get("eval_acc_ci_high")),
                 _fmt(r.get("consensus_eval_acc_mean")), _fmt(r.get("genotype_distance_mean")),
                 str(r.get("n_distinct_genotypes") if r.get("n_distinct_genotypes") is not None else "–"),
                 _fmt(r.get("skip_normal_mean"), ".1f"), "–" if collapse is None else f"{collapse:.0%}",
                 _fmt(r.get("stop_changing_epoch_mean"), ".1f")]
        out.append("<tr>" + "".join(f'<td class="{"l" if i == 0 else ""}">{c}</td>' for i, c in enumerate(cells))
                   + "</tr>")
    out.append("</table>")
    return "".join(out)


def _anchor(group: str) -> str:
    return "g-" + re.sub(r"[^A-Za-z0-9_-]+", "-", group).strip("-")


def skip_count(genotype: str) -> int:
    """skip_connect edges of the first cell (the normal cell; NB201's only cell)."""
    return sum(op == "skip_connect" for _, _, op in cell_graphs(genotype)[0][1].edges)


def seed_table(runs: Sequence[SeedRun], consensus: str | None) -> str:
    cons = encode([consensus]) if consensus else None
    head = ("seed", "trial", "status", "epochs", "search val acc", "retrained", "skips (normal)",
            "stops changing", "distance to consensus")
    out = ['<table class="stats"><tr>' + "".join(f'<th class="{"l" if i < 3 else ""}">{h}</th>'
                                                 for i, h in enumerate(head)) + "</tr>"]
    for run in runs:
        g = run.genotype
        skips = skip_count(g) if g else None
        dist = float(cross_distances(encode([g]), cons)[0, 0]) if (g and cons is not None) else None
        stop = stop_epoch(run)
        cells = [run.seed, run.trial_id, run.status, run.last_epoch if run.last_epoch is not None else "–",
                 _fmt(run.val_acc), _fmt(run.eval_acc), "–" if skips is None else skips,
                 "–" if stop is None else stop, _fmt(dist)]
        out.append(f'<tr class="{_esc(run.status)}">' + "".join(
            f'<td class="{"l" if i < 3 else ""}">{_esc(c)}</td>' for i, c in enumerate(cells)) + "</tr>")
    out.append("</table>")
    if any(r.status == "running" for r in runs):
        out.append('<p class="q">Running searches show the genotype of their latest epoch.</p>')
    return "".join(out)


def cells_html(figs: Figures, key: str, genotype: str, label: str, caption: str = "") -> str:
    return "".join(figs.figure(f"{key}-{cell}", caption, lambda svg=svg: svg)
                   for cell, svg in genotype_svgs(genotype, label, key))


def group_html(exp: Experiment, group: str, index: int, labels: Mapping[str, str], figs: Figures) -> str:
    runs = exp.seeds[group]
    done = [r for r in runs if r.status == "done" and r.trial.get("genotype")]
    stats = exp.stats(group)
    key = f"g{index}"
    consensus = stats.get("consensus_genotype")
    parts = [f'<section id="{_anchor(group)}"><h2>{_esc(labels[group])}</h2>',
             f'<p class="q"><code>{_esc(group)}</code></p>']
    collapse = stats.get("collapse_rate")
    parts.append(_keys([
        ("finished seeds", f"{len(done)} / {len(runs)}"),
        ("search val acc mean [CI]", _acc_text(stats.get("val_acc_mean"), stats.get("val_acc_ci_low"),
                                               stats.get("val_acc_ci_high"))),
        ("best − mean", _fmt(stats.get("best_minus_mean"))),
        ("mean pairwise distance", _fmt(stats.get("genotype_distance_mean"))),
        ("distinct cells", str(stats.get("n_distinct_genotypes", "–"))),
        ("collapsed (≥ {} skips)".format(stats.get("collapse_threshold") or 3),
         "–" if collapse is None else f"{collapse:.0%}"),
        ("genotype stops changing (mean epoch)", _fmt(stats.get("stop_changing_epoch_mean"), ".1f")),
    ]))

    rows = accuracy_rows(exp, group)
    if rows:
        parts.append("<h3>Accuracy of every seed</h3><p class=\"q\">How good is a typical search, how much does "
                     "best-of-N flatter it, and does it beat random and published cells trained the same way?</p>")
        parts.append(figs.figure(f"{key}-acc", "Dots: seeds; diamond: mean; bar: 95% bootstrap CI of the mean.",
                                 lambda: forest(rows, "accuracy per seed"), wide=True))

    if done:
        best = max(done, key=lambda r: r.val_acc if r.val_acc is not None else -1.0)
        parts.append("<h3>Cells</h3><p class=\"q\">What did the seeds agree on (consensus: per node the most "
                     "chosen (op, input) pairs), and what did the best search find?</p><div class=\"figs\">")
        if consensus:
            parts.append(cells_html(figs, f"{key}-cons", consensus, "consensus",
                                    f"Consensus of {len(done)} seeds"))
        parts.append(cells_html(figs, f"{key}-best", best.genotype, f"best search ({best.label})",
                                f"Best search by val acc: {best.label}, val acc {_fmt(best.val_acc)}"))
        parts.append("</div>")

        parts.append("<h3>Agreement across seeds</h3><p class=\"q\">Which (edge, op) choices are stable across "
                     "seeds, and which seeds found similar cells?</p><div class=\"figs\">")
        for name, graph in cell_graphs(consensus or done[0].genotype):
            parts.append(figs.figure(f"{key}-freq-{name}", f"{name} cell: fraction of the {len(done)} seeds whose "
                                     "cell has this edge with this op (op names in the diagrams' colours).",
                                     lambda name=name, graph=graph: frequency_figure(stats, name, graph)))
        if len(done) > 1:
            parts.append(figs.figure(f"{key}-dist", "Fraction of the (input, op) choices two seeds' cells differ in.",
                                     lambda: distance_figure(done)))
        parts.append("</div>")

    with_epochs = [r for r in runs if r.epochs]
    if with_epochs:
        panels = curve_panels(with_epochs, stats.get("collapse_threshold") or 3)
        parts.append("<h3>Search dynamics</h3><p class=\"q\">Did the architecture distribution sharpen, did "
                     "skip-connects take over (collapse), when did the derived cell stop changing?</p>")
        parts.append(figs.figure(f"{key}-curves", "One line per seed; ▼ marks the epoch from which the seed's "
                                 "derived genotype never changed again.", lambda: line_panels(panels), wide=True))
        reference = consensus or next((r.genotype for r in with_epochs if r.genotype), None)
        for name, graph in cell_graphs(reference) if reference else []:
            note = ("thick lines: the op the consensus cell kept on that edge; grey panels: edges it dropped."
                    if consensus else "no consensus yet (no finished seed).")
            parts.append(figs.figure(
                f"{key}-alpha-{name}", f"{name} cell: softmax(α) per edge, mean over the seeds at each epoch; {note}",
                lambda name=name, graph=graph: alpha_figure(with_epochs, name, graph if consensus else None,
                                                            f"{name} cell: op probabilities per edge",
                                                            slots_of=graph), wide=True))

    parts.append("<h3>Every seed</h3>")
    parts.append(seed_table(runs, consensus))
    shown = [r for r in runs if r.genotype]
    if shown:
        is_open = " open" if len(shown) <= OPEN_SEED_CELLS else ""
        parts.append(f"<details{is_open}><summary>cells of the {len(shown)} seeds</summary><div class=\"figs\">")
        for run in shown:
            state = "" if run.status == "done" else f" ({run.status}, epoch {run.last_epoch})"
            parts.append(f'<div class="seedcard"><h4>{_esc(run.label)}{_esc(state)} · val acc '
                         f'{_fmt(run.val_acc)}</h4><div class="figs">')
            parts.append(cells_html(figs, f"{key}-s{_anchor(str(run.trial_id))}", run.genotype, run.label))
            parts.append("</div></div>")
        parts.append("</div></details>")
    parts.append("</section>")
    return "".join(parts)


def render(exp: Experiment, generated: str | None = None) -> str:
    """The report of ``exp`` as one HTML document."""
    figs = Figures()
    labels = short_labels(exp.groups)
    counts = exp.status_counts()
    generated = generated or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kind = "HPO study" if exp.hpo else "stability sweep"
    body: list[str] = []
    if counts.get("running"):
        body.append(f'<div class="banner"><b>Still running:</b> {counts["running"]} search(es) unfinished. This '
                    f"is a snapshot taken {generated}; build the report again for newer results.</div>")
    if not exp.groups:
        body.append('<section><h2>No results yet</h2><p class="q">No search has reported an epoch.</p></section>')
    else:
        overview = ['<section id="overview"><h2>Across groups</h2>',
                    '<p class="q">Which configuration searches best and most reliably?</p>',
                    stability_html(exp, labels), '<div class="figs">']
        for i, (title, rows) in enumerate(overview_accuracy(exp, labels)):
            overview.append(figs.figure(f"ov-acc{i}", f"{title}: dots are seeds, diamonds means, bars 95% bootstrap "
                                        "CIs; grey rows: baselines retrained under the same protocol.",
                                        lambda title=title, rows=rows: forest(rows, title), wide=True))
        if exp.hpo or len(exp.groups) > 1:
            overview.append(figs.figure("ov-pareto", "Each point a configuration: up is more accurate, left "
                                        "is more stable (its seeds find more similar cells). Red: not dominated.",
                                        lambda: pareto_figure(exp, labels), wide=True))
        panels = overview_curves(exp, labels)
        if panels:
            overview.append(figs.figure("ov-curves", "Per group, the mean over its seeds at each epoch.",
                                        lambda: line_panels(panels), wide=True))
        overview.append("</div></section>")
        groups = [group_html(exp, g, i, labels, figs) for i, g in enumerate(exp.groups)]
        body += overview + groups
    if figs.errors:
        body.insert(0, '<div class="fig-error"><b>Some figures could not be drawn:</b><br>' +
                    "<br>".join(_esc(e) for e in figs.errors) + "</div>")
    nav = "".join(f'<a href="#{_anchor(g)}">{_esc(labels[g])}</a>' for g in exp.groups)
    pills = "".join(f'<span class="pill {s}">{n} {s}</span>' for s, n in counts.items() if n)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{_esc(exp.name)}: stability report</title>'
            f"<style>{CSS}</style></head><body><header><h1>{_esc(exp.name)} — search stability report</h1>"
            f'<div class="meta">{kind} · {len(exp.groups)} group(s) · {pills} · <code>{_esc(exp.location)}</code> · '
            f'{_esc(generated)}</div></header><nav><a href="#overview">overview</a>{nav}</nav><main>'
            + "".join(body) + "</main><footer>Built by <code>python -m orchestrator.report</code> from the experiment's "
            f"Parquet files; statistics from <code>orchestrator.stability</code>.</footer><script>{CHECK_SCRIPT}"
            "</script></body></html>")


# -- writing -------------------------------------------------------------------------------------------------------
def default_out(store: ResultStore) -> str:
    return f"{store.root}/{REPORT_FILE}"


def write_report(store: ResultStore, out: str | None = None) -> str:
    """Build the report and write it (default ``<experiment>/report.html`` on the store's filesystem, replaced
    atomically); returns where it went."""
    text = render(load_experiment(store)).encode("utf-8")
    if out is not None:
        out = os.path.abspath(os.path.expanduser(out))
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        tmp = f"{out}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(text)
        os.replace(tmp, out)
        return out
    path = default_out(store)
    store.write_file(REPORT_FILE, text)
    scheme = store.storage.split("://", 1)[0] if "://" in store.storage else "file"
    return path if scheme == "file" else f"{scheme}://{path}"  # s3://bucket/... as the user gave the storage


def publish(store: ResultStore, say: Callable[[str], Any] = print) -> str | None:
    """What sweeps, HPO studies and evaluations call at their end: write the report and say where it is. A report
    that cannot be built is a warning line, never a failed sweep (the results are safe in Parquet)."""
    try:
        path = write_report(store)
    except Exception as err:  # noqa: BLE001 - the sweep's results matter more than its report
        say(f"warning: the report could not be written: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        return None
    say(f"report: {path}")
    return path


# -- command line ----------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="python -m orchestrator.report", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", metavar="EXPERIMENT", help="experiment name (under --storage) or its folder")
    parser.add_argument("--storage", help="results root (default $PCDARTS_STORAGE or ./results)")
    parser.add_argument("--out", metavar="FILE", help=f"where to write the HTML (default EXPERIMENT/{REPORT_FILE})")
    args = parser.parse_args(argv)
    store = ResultStore(*split_experiment(args.experiment, args.storage))
    if not any(store.exists(kind) for kind in ("trials", "epochs")):
        raise ValueError(f"no results of experiment {store.name!r} in {store.storage} (no trials or epochs yet)")
    print(f"report: {write_report(store, args.out)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
