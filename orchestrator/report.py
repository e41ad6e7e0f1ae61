"""``python -m orchestrator.report EXPERIMENT [--storage S] [--out FILE]``: the stability report, one HTML file.

Self-contained (inline SVG figures drawn by matplotlib, inline styles, nothing loaded from the network) and built
from the experiment's results only (:class:`~orchestrator.results.ResultStore`), so at any time: while a sweep runs
it shows what has arrived. It draws :mod:`orchestrator.stability`'s numbers, never computing them another way. The
page (what it shows, in which order, with which captions: README, "The stability report") is ``report.html.j2``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jinja2
import numpy as np

from pcdarts_core.config import get_method, search_config
from pcdarts_core.genotypes import CELL_TYPES
from pcdarts_core.ops import OPS, PRIMITIVES
from pcdarts_core.stability import (cross_distances, encode, frequencies_from_json, pairwise_distances,
                                    stopped_changing_epoch, summarize)
from pcdarts_core.visualize import CellGraph, cell_graphs, figure_svg, genotype_svgs, node_label, op_color

from .cli import Parser, run_cli, split_experiment
from .plots import ForestRow, Panel, Series, forest, heatmap, line_panels, op_probability_grid, pareto, series_color
from .results import ResultStore, finite_or_none as _finite, retrained
from .stability import References, reference_line, references, short_labels, stability_table

REPORT_FILE = "report.html"
#: per-seed cell diagrams shown open; more seeds than this are folded (still in the page)
OPEN_SEED_CELLS = 8
_HERE = Path(__file__).parent
#: the page's script (the template includes its stylesheet, report.css): it marks every figure with its laid-out
#: size once the page has loaded (``data-size``) and the body with the count of non-empty figures (``data-figures``),
#: which the tests read
CHECK_SCRIPT = (_HERE / "report.js").read_text(encoding="utf-8")
_OP_ORDER = tuple(PRIMITIVES) + tuple(op for op in OPS if op not in PRIMITIVES)


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if (v := _finite(value)) is None else format(v, spec)


def _acc_text(mean: Any, low: Any, high: Any) -> str:
    """``mean [low, high]``; the mean alone without a CI; a dash without a mean."""
    return _fmt(mean) + (f" [{_fmt(low)}, {_fmt(high)}]" if None not in map(_finite, (mean, low, high)) else "")


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _anchor(group: str) -> str:
    return "g-" + re.sub(r"[^A-Za-z0-9_-]+", "-", group).strip("-")


_PAGE = jinja2.Environment(loader=jinja2.FileSystemLoader(_HERE), autoescape=True, trim_blocks=True,
                           lstrip_blocks=True, undefined=jinja2.StrictUndefined)
_PAGE.filters.update(fmt=_fmt, acc=_acc_text, anchor=_anchor)


# -- reading ----------------------------------------------------------------------------------------------------
@dataclass
class SeedRun:
    """One search: its trials row (if written yet) and its epoch rows in epoch order."""

    trial_id: str
    group: str
    seed: Any
    status: str
    trial: dict[str, Any] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    eval_acc: float | None = None  # the mean test accuracy of its retrainings

    @property
    def label(self) -> str:
        return f"seed {self.seed}"

    @property
    def genotype(self) -> str | None:
        """The trial's genotype when done, else the latest epoch's (what a running search would return now)."""
        if self.trial.get("genotype") and self.status == "done":
            return self.trial["genotype"]
        return next((r["genotype"] for r in reversed(self.epochs) if r.get("genotype")), self.trial.get("genotype"))

    @property
    def val_acc(self) -> float | None:
        return _finite((self.trial if self.status == "done" else (self.epochs or [{}])[-1]).get("val_acc"))

    @property
    def last_epoch(self) -> int | None:
        return self.epochs[-1].get("epoch") if self.epochs else self.trial.get("epochs_done")

    @cached_property
    def epoch_genotypes(self) -> tuple[list[str], list[int]]:
        rows = [r for r in self.epochs if r.get("genotype")]
        return [r["genotype"] for r in rows], [int(r["epoch"]) for r in rows]

    @cached_property
    def stop(self) -> int | None:
        """The epoch from which the seed's per-epoch genotype never changed (stability.stopped_changing_epoch)."""
        return stopped_changing_epoch(*self.epoch_genotypes) if self.epoch_genotypes[0] else None

    @property
    def skips(self) -> int | None:
        """skip_connect edges of the first cell (the normal cell; NB201's only cell)."""
        return sum(op == "skip_connect" for *_, op in cell_graphs(self.genotype)[0][1].edges) if self.genotype else None

    def distance(self, to: str | None) -> float | None:
        return float(cross_distances(encode([self.genotype]), encode([to]))[0, 0]) if self.genotype and to else None

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        """(epochs, values) of an epochs column, or of ``distance_to_final``: each epoch's cell to the final one."""
        cells, epochs = self.epoch_genotypes
        if key == "distance_to_final":  # a seed with epoch genotypes has a genotype (the latest one at least)
            return epochs, cross_distances(encode(cells), encode([self.genotype]))[:, 0].tolist() if cells else []
        rows = [(int(r["epoch"]), y) for r in self.epochs if r.get("epoch") is not None and (y := _finite(r.get(key)))
                is not None]
        return [x for x, _ in rows], [y for _, y in rows]


@dataclass
class Experiment:
    """Everything the report shows, read once from the store."""

    store: ResultStore  # where it was read from
    groups: list[str]  # sorted
    seeds: dict[str, list[SeedRun]]  # by group
    stats: dict[str, dict[str, Any]]  # the stability table's rows by group, in its order
    retrained: dict[tuple[str, str], list[float]]  # see results.retrained()
    #: retrained accuracies of the random and published cells, sorted by label (under the groups' protocol)
    baselines: list[tuple[str, list[float]]]
    bench: list[str]  # the trials' bench_acc_<dataset> columns
    hpo: bool
    refs: dict[str, References]  # each group's reference levels (chance, random cells, uniform alphas)

    @property
    def single(self) -> bool:
        """One search in all (``search single``, a one-search sweep): the page is laid out for one run."""
        return sum(len(runs) for runs in self.seeds.values()) == 1

    @property
    def kind(self) -> str:
        return "HPO study" if self.hpo else "single search" if self.single else "stability sweep"

    def levels(self, attr: str, label: str, groups: Sequence[str] | None = None) -> list[tuple[float, str]]:
        """The distinct reference levels ``attr`` of ``groups`` (default all) as (value, "label value") lines."""
        values = dict.fromkeys(v for g in (self.groups if groups is None else groups)
                               if (r := self.refs.get(g)) is not None and (v := getattr(r, attr)) is not None)
        return [(v, f"{label} {v:.3f}") for v in values]


def load_experiment(store: ResultStore) -> Experiment:
    """The experiment's results, with the stability table computed (a running sweep writes its copy at its end)."""
    trials, epochs, evaluations = store.read("trials"), store.read("epochs"), store.read("evaluations")
    runs = {row["trial_id"]: SeedRun(row["trial_id"], row["group"], row.get("seed"), row.get("status") or "running",
                                     trial=row) for row in trials.to_pylist()}
    for row in sorted(epochs.to_pylist(), key=lambda r: (str(r["trial_id"]), r.get("epoch") or 0)):
        # a search that has reported epochs but has no trials row yet is running
        run = runs.setdefault(row["trial_id"], SeedRun(row["trial_id"], row["group"], row.get("seed"), "running"))
        run.epochs.append(row)
    accs = retrained(evaluations)
    seeds: dict[str, list[SeedRun]] = {}
    for run in sorted(runs.values(), key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0, r.trial_id)):
        run.eval_acc = sum(v) / len(v) if (v := accs.get(("trial", run.trial_id))) else None
        seeds.setdefault(run.group, []).append(run)
    table = stability_table(trials, epochs, evaluations).to_pylist() if trials.num_rows else []
    return Experiment(store, sorted(seeds), seeds, {r["group"]: r for r in table}, accs,
                      sorted((label, v) for (kind, label), v in accs.items() if kind == "baseline"),
                      sorted(c for c in trials.column_names if c.startswith("bench_acc_")),
                      "hpo_trial" in trials.column_names,  # HPO rows name their Tune trial
                      references(trials, epochs) if trials.num_rows else {})


# -- figures --------------------------------------------------------------------------------------------------------
def figure(errors: list[str], key: str, caption: str, build: Callable, *args: Any, wide: bool = False) -> dict:
    """``build(*args)`` as the figure ``key`` (``show``'s arguments), or a one-line error also added to ``errors``."""
    try:
        return dict(key=key, caption=caption, svg=figure_svg(build(*args), key), wide=wide)
    except Exception as err:  # noqa: BLE001 - one bad figure must not cost the whole report
        errors.append(f"{caption or key}: {_one_line(err)}")
        return dict(key=key, error=errors[-1])


def _summary_row(label: str, values: Sequence[float], color: str) -> ForestRow:
    s = summarize(values)
    ci = (s.ci_low, s.ci_high) if s.ci_low is not None and s.ci_high is not None and s.n > 1 else None
    return ForestRow(label, list(values), s.mean, ci, s.best_minus_mean if s.n > 1 else None, color)


def _accuracies(exp: Experiment) -> list[tuple[str, str, dict[str, list[float]]]]:
    """(name, colour in a group's forest, finished seeds' values by group) of search val, retrained and NB201 acc."""
    gets = [("search val acc", "#1f77b4", lambda r: r.val_acc), ("retrained test acc", "#2ca02c", lambda r: r.eval_acc)]
    gets += [(f"NB201 {c[len('bench_acc_'):]}", "#9467bd", lambda r, c=c: _finite(r.trial.get(c))) for c in exp.bench]
    return [(name, color, {g: [v for r in runs if r.status == "done" and (v := get(r)) is not None]
                           for g, runs in exp.seeds.items()}) for name, color, get in gets]


def chance_lines(exp: Experiment, groups: Sequence[str] | None = None) -> list[tuple[float, str]]:
    return exp.levels("chance", "chance", groups)


def accuracy_rows(exp: Experiment, group: str) -> list[ForestRow]:
    """A group's accuracies: search val acc, retrained test acc, consensus, benchmark lookups, then baselines."""
    rows, cons, accuracies = [], exp.retrained.get(("consensus", group)), _accuracies(exp)
    for i, (name, color, values) in enumerate(accuracies):
        if vals := values[group]:
            rows.append(_summary_row(f"{name} ({len(vals)}{' seeds' if i == 0 else ''})", vals, color))
        if i == 1 and cons:
            rows.append(_summary_row("consensus cell, retrained", cons, "#17becf"))
    if cons or accuracies[1][2][group]:
        rows += [_summary_row(label, vals, "#7f7f7f") for label, vals in exp.baselines]
    return rows


def overview_accuracy(exp: Experiment, labels: Mapping[str, str]) -> list[tuple[str, list[ForestRow]]]:
    """Across groups: one forest per accuracy; the retrained one with the consensus cells and the baselines."""
    out = []
    for i, (name, _, values) in enumerate(_accuracies(exp)):
        rows = [_summary_row(labels[g], values[g], series_color(j)) for j, g in enumerate(exp.groups) if values[g]]
        if rows and i == 1:
            rows += [_summary_row(f"{labels[g]} consensus", cons, series_color(j)) for j, g in enumerate(exp.groups)
                     if (cons := exp.retrained.get(("consensus", g)))]
            rows += [_summary_row(label, vals, "#7f7f7f") for label, vals in exp.baselines]
        if rows:
            out.append((name + (" test acc" if i > 1 else ""), rows))
    return out


def frequency_figure(stats: Mapping[str, Any], name: str, graph: CellGraph) -> Any:
    """Heatmap: the share of the group's seeds choosing each (op, edge), over every edge the cell could have."""
    freqs = frequencies_from_json(stats.get("edge_op_frequencies")).get(
        name if name in CELL_TYPES else "normal", {})  # a one-cell space's cell is 'normal' in the tables
    seen = {op for per in freqs.values() for op in per}
    ops = [op for op in _OP_ORDER if op in seen] + sorted(seen - set(_OP_ORDER))
    slots = graph.slots()
    matrix = np.array([[freqs.get(graph.edge_key(s, d), {}).get(op, 0.0) for s, d in slots] for op in ops])
    return heatmap(matrix, ops, [f"{node_label(s)}→{node_label(d)}" for s, d in slots],
                   f"{name} cell: share of seeds choosing (op, edge)", cmap="Blues", fmt="{:.0%}",
                   row_colors=[op_color(op) for op in ops], colorbar="share of seeds")


def distance_figure(runs: Sequence[SeedRun]) -> Any:
    labels = [f"s{r.seed}" for r in runs]
    return heatmap(pairwise_distances([r.genotype for r in runs]), labels, labels, "genotype distance between seeds",
                   cmap="magma_r", fmt="{:.2f}", colorbar="distance")


def alpha_ops(width: int, trial: Mapping[str, Any]) -> list[str]:
    """The op of each alpha column: a ``cfg_*primitives*`` list, the method's own op set (RoMe's 7 ops), the
    core's PRIMITIVES, or ``op <i>``."""
    for key, value in trial.items():
        if key.startswith("cfg_") and "primitives" in key and isinstance(value, str):
            with contextlib.suppress(ValueError):
                if isinstance(names := json.loads(value), list) and len(names) == width and \
                        all(isinstance(n, str) for n in names):
                    return names
    with contextlib.suppress(ValueError, KeyError):  # an unknown method or dataset: the fallbacks below
        cfg = search_config(str(trial.get("method") or "pcdarts"), str(trial.get("cfg_dataset") or "cifar10"))
        if len(names := list(get_method(cfg.method).primitives(cfg))) == width:
            return names
    return list(PRIMITIVES) if width == len(PRIMITIVES) else [f"op {i}" for i in range(width)]


def alpha_figure(runs: Sequence[SeedRun], name: str, slots_of: CellGraph, kept_by: CellGraph | None) -> Any:
    """Mean over seeds of softmax(alphas) per edge (every edge ``slots_of`` could have) and op, per epoch (those
    with the first epoch's shape: P-DARTS's pruned stages are left out); the ops ``kept_by`` kept are thick."""
    col, per_epoch, shape = f"alphas_{name if name in CELL_TYPES else 'normal'}", {}, None
    for row in (row for run in runs for row in run.epochs if row.get(col) is not None):
        a = np.asarray(row[col], dtype=float)
        shape = shape or a.shape
        if a.shape == shape:
            e = np.exp(a - a.max(axis=-1, keepdims=True))
            per_epoch.setdefault(int(row["epoch"]), []).append(e / e.sum(axis=-1, keepdims=True))
    if not per_epoch or shape is None:
        raise ValueError(f"no {col} in the epochs table")
    slots = slots_of.slots()
    if len(slots) != shape[0]:
        raise ValueError(f"{col} has {shape[0]} rows but the cell has {len(slots)} possible edges")
    epochs = np.array(sorted(per_epoch))
    return op_probability_grid(epochs, np.stack([np.mean(per_epoch[e], axis=0) for e in epochs]),
                               [(node_label(s), node_label(d)) for s, d in slots], alpha_ops(shape[1], runs[0].trial),
                               f"{name} cell: op probabilities per edge",
                               [{op for s, d, op in kept_by.edges if (s, d) == e} for e in slots] if kept_by else ())


def curve_panels(exp: Experiment, group: str, runs: Sequence[SeedRun], collapse_threshold: int | None) -> list[Panel]:
    """Per-seed curves of one group: what the search did epoch by epoch, with its reference levels."""
    def series(key: str, marks: bool = False, dashed: bool = False, suffix: str = "") -> list[Series]:
        return [Series(run.label + suffix, x, y, series_color(i), dashed,
                       (run.stop,) if marks and run.stop is not None else ())
                for i, run in enumerate(runs) for x, y in [run.curve(key)] if x]

    panels = [Panel("arch entropy", "nats", series("arch_entropy", marks=True), uniform_lines(exp, [group])),
              Panel("skip-connects (normal cell)", "count", series("n_skip_normal"),
                    ((collapse_threshold, f"collapse ≥ {collapse_threshold}"),) if collapse_threshold else ()),
              Panel("val acc (- - train)", "accuracy",
                    series("val_acc") + series("train_acc", dashed=True, suffix=" train"), chance_lines(exp, [group])),
              Panel("distance to final genotype", "distance", series("distance_to_final", marks=True),
                    random_lines(exp, [group]), ylim=(-0.03, 1.03)),
              Panel("Hessian eigenvalue λmax", "λmax", series("hessian_eigenvalue"))]
    return [p for p in panels if p.series]


def uniform_lines(exp: Experiment, groups: Sequence[str] | None = None) -> list[tuple[float, str]]:
    return exp.levels("uniform_entropy", "uniform α", groups)


def random_lines(exp: Experiment, groups: Sequence[str] | None = None) -> list[tuple[float, str]]:
    return exp.levels("random_distance", "random cells", groups)


def overview_curves(exp: Experiment, labels: Mapping[str, str]) -> list[Panel]:
    """Across groups: the mean over a group's seeds, per epoch, of skip-connects, entropy, val acc and λmax."""
    def mean(i: int, group: str, key: str) -> list[Series]:
        xy = [p for run in exp.seeds[group] for p in zip(*run.curve(key))]
        xs = sorted({x for x, _ in xy})
        return [Series(labels[group], xs, [float(np.mean([v for e, v in xy if e == x])) for x in xs],
                       series_color(i))] if xs else []

    curves = (("n_skip_normal", "skip-connects (normal cell)", "count", []),
              ("arch_entropy", "arch entropy", "nats", uniform_lines(exp)),
              ("val_acc", "search val acc", "accuracy", chance_lines(exp)),
              ("hessian_eigenvalue", "Hessian eigenvalue λmax", "λmax", []))
    panels = [Panel(title, unit, [s for i, g in enumerate(exp.groups) for s in mean(i, g, key)], lines)
              for key, title, unit, lines in curves]
    return [p for p in panels if p.series]


def pareto_figure(exp: Experiment, labels: Mapping[str, str]) -> Any:
    rows = [r for r in exp.stats.values() if r.get("n_seeds") and _finite(r.get("genotype_distance_mean"))
            is not None and _finite(r.get("val_acc_mean")) is not None]
    if not rows:
        raise ValueError("no group has two finished seeds yet (a distance needs a pair)")
    err = [(r["val_acc_ci_low"], r["val_acc_ci_high"]) if r.get("val_acc_ci_low") is not None else None for r in rows]
    return pareto([r["genotype_distance_mean"] for r in rows], [r["val_acc_mean"] for r in rows],
                  [labels[r["group"]] for r in rows], "HPO Pareto front: accuracy vs stability" if exp.hpo else
                  "accuracy vs stability of the groups (Pareto front)",
                  "mean pairwise genotype distance between seeds (lower = more stable)",
                  "mean search val acc (bar: 95% CI)", err, xlines=random_lines(exp), ylines=chance_lines(exp))


# -- the page ------------------------------------------------------------------------------------------------------
def group_view(exp: Experiment, group: str) -> dict[str, Any]:
    """What the page shows of one group; the template draws its figures."""
    runs, stats = exp.seeds[group], exp.stats.get(group, {})
    done = [r for r in runs if r.status == "done" and r.trial.get("genotype")]
    with_epochs, consensus = [r for r in runs if r.epochs], stats.get("consensus_genotype")
    return dict(group=group, runs=runs, stats=stats, done=done, with_epochs=with_epochs, consensus=consensus,
                threshold=stats.get("collapse_threshold") or 3, accuracy=accuracy_rows(exp, group),
                best=max(done, key=lambda r: r.val_acc if r.val_acc is not None else -1.0, default=None),
                reference=consensus or next((r.genotype for r in with_epochs if r.genotype), None))


_PAGE.globals.update({f.__name__: f for f in (  # what the page draws with
    genotype_svgs, cell_graphs, overview_accuracy, overview_curves, pareto_figure, forest, line_panels, curve_panels,
    alpha_figure, frequency_figure, distance_figure, chance_lines, reference_line)}, OPEN_SEED_CELLS=OPEN_SEED_CELLS)


def render(exp: Experiment, generated: str | None = None) -> str:
    """The report of ``exp`` as one HTML document."""
    errors: list[str] = []
    return _PAGE.get_template("report.html.j2").render(
        exp=exp, labels=short_labels(exp.groups), groups=[group_view(exp, g) for g in exp.groups], errors=errors,
        figure=partial(figure, errors), script=CHECK_SCRIPT,
        counts={"done": 0, "running": 0, "failed": 0} | Counter(r.status for runs in exp.seeds.values() for r in runs),
        generated=generated or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


# -- writing -------------------------------------------------------------------------------------------------------
def write_report(store: ResultStore, out: str | None = None) -> str:
    """Write the report (replaced atomically; default ``<experiment>/report.html`` in the store); returns where."""
    text = render(load_experiment(store)).encode("utf-8")
    if out is None:
        store.write_file(REPORT_FILE, text)
        return f"{store.uri()}/{REPORT_FILE}"
    out = os.path.abspath(os.path.expanduser(out))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    Path(tmp := f"{out}.tmp{os.getpid()}").write_bytes(text)
    os.replace(tmp, out)
    return out


def publish(store: ResultStore) -> None:
    """What sweeps, HPO studies and evaluations call at their end: write the report and say where it is. A report
    that cannot be built is a warning line, never a failed sweep (the results are safe in Parquet)."""
    try:
        print(f"report: {write_report(store)}")
    except Exception as err:  # noqa: BLE001 - the sweep's results matter more than its report
        print(f"warning: the report could not be written: {_one_line(err)}")


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
