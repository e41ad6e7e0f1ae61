"""The stability table of an experiment: one row per configuration group (a configuration without its seed,
:func:`orchestrator.results.group_key`) over its done seeds, from the experiment's trials, epochs and evaluations
tables, with the statistics of :mod:`pcdarts_core.stability`; and its terminal rendering.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pcdarts_core.genotypes import Genotype, parse_genotype
from pcdarts_core.spaces import TRIAL_METRIC_PREFIXES
from pcdarts_core.stability import (StabilityOptions, canonical_key, genotype_json_key, genotype_stats,
                                    parse_genotype_json, summarize)

from .results import parse_source, to_table

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table as RichTable


# -- the table -------------------------------------------------------------------------------------------------
def _column(table: pa.Table, name: str, default: Any = None) -> list[Any]:
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [default] * table.num_rows


def _float_column(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    col = table.column(name).cast(pa.float64())
    return col.fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float64)


class _GenotypeCache:
    """Parses each distinct genotype text once (a sweep's epochs repeat the same few cells many times)."""

    def __init__(self) -> None:
        self._parsed: dict[str, Genotype] = {}
        self._ids: dict[tuple, int] = {}

    def get(self, text: str, where: str) -> Genotype:
        g = self._parsed.get(text)
        if g is None:
            try:
                g = parse_genotype_json(text) or parse_genotype(text)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            self._parsed[text] = g
        return g

    def class_id(self, text: str, where: str) -> int:
        """An integer equal for two texts exactly when their genotypes are at distance 0."""
        key = genotype_json_key(text)
        if key is None:  # not the core's JSON: the full parser decides (and reports what is wrong)
            key = canonical_key(self.get(text, where))
        return self._ids.setdefault(key, len(self._ids))



def _stop_epochs(epochs: pa.Table, trial_ids: set[str], cache: _GenotypeCache) -> dict[str, int]:
    """:func:`stopped_changing_epoch` of every listed trial with epoch rows, vectorized over the epochs table."""
    needed = {"trial_id", "epoch", "genotype"}
    if epochs is None or epochs.num_rows == 0 or not needed <= set(epochs.column_names):
        return {}
    t = epochs.select(["trial_id", "epoch", "genotype"])
    mask = pc.and_(pc.and_(pc.is_valid(t["genotype"]), pc.is_valid(t["epoch"])),
                   pc.is_in(t["trial_id"], value_set=pa.array(sorted(trial_ids), type=pa.string())))
    t = t.filter(mask)
    if t.num_rows == 0:
        return {}
    tid = pc.dictionary_encode(t["trial_id"]).combine_chunks()
    geno = pc.dictionary_encode(t["genotype"]).combine_chunks()
    trial = tid.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    epoch = t["epoch"].to_numpy()
    code = geno.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.lexsort((epoch, trial))  # sort small integer arrays, never the genotype texts
    trial, epoch, code = trial[order], epoch[order], code[order]
    same_trial = trial[1:] == trial[:-1]
    text_change = np.flatnonzero(same_trial & (code[1:] != code[:-1])) + 1
    # Only texts on either side of a textual change need parsing: a different text may be the same cell.
    involved = np.unique(np.concatenate([code[text_change], code[text_change - 1]]))
    texts = geno.dictionary
    cls = np.full(len(texts), -1, dtype=np.int64)
    for k in involved.tolist():
        cls[k] = cache.class_id(texts[k].as_py(), "epochs genotype")
    real = text_change[cls[code[text_change]] != cls[code[text_change - 1]]]
    starts = np.flatnonzero(np.r_[True, ~same_trial])
    # Position of the last change inside each trial (or the trial's first row): the genotype held from there.
    marker = np.full(len(code), -1, dtype=np.int64)
    marker[real] = real
    marker[starts] = np.maximum(marker[starts], starts)
    last = np.maximum.reduceat(marker, starts)
    names = tid.dictionary.to_pylist()
    return {names[trial[s]]: int(epoch[i]) for s, i in zip(starts, last)}


def stability_table(trials: pa.Table, epochs: pa.Table | None = None, evaluations: pa.Table | None = None,
                    *, options: StabilityOptions | None = None) -> pa.Table:
    """One row per configuration group (columns of ``results.STABILITY_SCHEMA``), sorted by group.

    Seeds are the group's ``done`` trials. Evaluations with status ``done`` (or none) and a ``test_acc`` count:
    ``trial:<id>`` rows toward that trial's group (several evaluations of one trial are averaged first, so each
    search counts once), ``consensus:<group>`` rows toward ``consensus_eval_acc_mean``; ``random:``/``published:``
    rows (baselines, not per group) and rows of unknown trials or groups are ignored here. ``epochs`` gives ``stop_changing_epoch_mean`` over the seeds that have rows.
    """
    opts = options or StabilityOptions()
    for name in ("trial_id", "group", "status"):
        if name not in trials.column_names:
            raise ValueError(f"trials table has no {name!r} column")
    cache = _GenotypeCache()
    trial_ids = [str(t) for t in _column(trials, "trial_id")]
    groups = _column(trials, "group")
    status = _column(trials, "status")
    genos = _column(trials, "genotype")
    val = _float_column(trials, "val_acc")
    # what the search spaces add per search: NAS-Bench-201 lookups (bench_acc_<dataset>, the tabulated test
    # accuracy of each search's cell) and the share of parameter-free ops (param_free_share_<cell>)
    bench = {name: _float_column(trials, name) for name in trials.column_names
             if name.startswith(TRIAL_METRIC_PREFIXES)}
    group_of = {tid: grp for tid, grp in zip(trial_ids, groups)}

    by_group: dict[str, list[int]] = {}
    for i, grp in enumerate(groups):
        if grp is None:
            raise ValueError(f"trial {trial_ids[i]!r} has no group")
        by_group.setdefault(grp, []).append(i)

    done_ids = {trial_ids[i] for i, s in enumerate(status) if s == "done"}
    stop = _stop_epochs(epochs, done_ids, cache) if epochs is not None else {}

    trial_eval: dict[str, list[float]] = {}
    consensus_eval: dict[str, list[float]] = {}
    if evaluations is not None and evaluations.num_rows and "source" in evaluations.column_names:
        ev_status = _column(evaluations, "status")
        ev_acc = _float_column(evaluations, "test_acc")
        for source, st, acc in zip(_column(evaluations, "source"), ev_status, ev_acc):
            if source is None or st not in (None, "done") or not math.isfinite(acc):
                continue
            kind, value = parse_source(source)
            if kind == "trial" and value in group_of:
                trial_eval.setdefault(value, []).append(float(acc))
            elif kind == "consensus":
                consensus_eval.setdefault(value, []).append(float(acc))

    rows: list[dict[str, Any]] = []
    for grp in sorted(by_group):
        idx = by_group[grp]
        done = [i for i in idx if status[i] == "done"]
        acc = summarize(val[done], opts)
        per_trial_eval = [sum(v) / len(v) for v in (trial_eval.get(trial_ids[i]) for i in done) if v]
        ev = summarize(per_trial_eval, opts)
        try:
            gstats = genotype_stats([cache.get(genos[i], f"trial {trial_ids[i]!r} genotype")
                                     for i in done if genos[i] is not None], opts.collapse_threshold)
        except ValueError as err:
            raise ValueError(f"group {grp!r}: {err}") from None
        stops = [stop[trial_ids[i]] for i in done if trial_ids[i] in stop]
        cons_evals = consensus_eval.get(grp, [])
        rows.append({
            "group": grp,
            "n_seeds": len(done),
            "n_failed": sum(1 for i in idx if status[i] == "failed"),
            "n_running": sum(1 for i in idx if status[i] == "running"),
            "val_acc_mean": acc.mean, "val_acc_std": acc.std, "val_acc_ci_low": acc.ci_low,
            "val_acc_ci_high": acc.ci_high, "val_acc_best": acc.best, "best_minus_mean": acc.best_minus_mean,
            "n_evaluated": ev.n, "eval_acc_mean": ev.mean, "eval_acc_std": ev.std, "eval_acc_ci_low": ev.ci_low,
            "eval_acc_ci_high": ev.ci_high, "eval_acc_best": ev.best, "eval_best_minus_mean": ev.best_minus_mean,
            "consensus_eval_acc_mean": float(np.mean(cons_evals)) if cons_evals else None,
            "n_consensus_evals": len(cons_evals),
            "n_genotypes": gstats.n,
            "genotype_distance_mean": gstats.distance_mean,
            "n_distinct_genotypes": gstats.n_distinct,
            "consensus_genotype": gstats.consensus.to_json() if gstats.consensus is not None else None,
            "consensus_distance_mean": gstats.consensus_distance_mean,
            "skip_normal_mean": gstats.skip_normal_mean,
            "collapse_threshold": opts.collapse_threshold,
            "collapse_rate": gstats.collapse_rate,
            "stop_changing_epoch_mean": float(np.mean(stops)) if stops else None,
            "edge_frequencies": gstats.frequencies.to_json("edge"),
            "edge_op_frequencies": gstats.frequencies.to_json("edge_op"),
            "op_frequencies": gstats.frequencies.to_json("op"),
            **_bench_columns(bench, done, opts),
        })
    return to_table("stability", rows)


def _bench_columns(bench: dict[str, np.ndarray], done: list[int], opts: StabilityOptions) -> dict[str, Any]:
    """``<metric>_mean/_ci_low/_ci_high`` over a group's done seeds that have a value (``bench_acc_cifar10_mean``,
    ``param_free_share_normal_mean``, ...)."""
    out: dict[str, Any] = {}
    for name, values in sorted(bench.items()):
        summary = summarize(values[done], opts)
        out.update({f"{name}_mean": summary.mean, f"{name}_ci_low": summary.ci_low,
                    f"{name}_ci_high": summary.ci_high})
    return out


# -- terminal output -------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".2f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def _acc_cell(mean: Any, std: Any, low: Any, high: Any) -> str:
    if mean is None:
        return "-"
    text = _fmt(mean)
    if std is not None:
        text += f" ± {_fmt(std)}"
    if low is not None and high is not None and high > low:
        text += f"\n[{_fmt(low)}, {_fmt(high)}]"
    return text


def render_table(table: pa.Table, console: Console | None = None,
                 title: str = "Search stability per group") -> RichTable:
    """A ``rich`` table of a :func:`stability_table` (fits 120 columns; groups wrap); printed on ``console``."""
    from rich.table import Table

    out = Table(title=title, show_lines=True, expand=False)
    out.add_column("group", overflow="fold", max_width=34, style="cyan")
    out.add_column("seeds", justify="right", no_wrap=True)
    out.add_column("val acc\nmean ± std [CI]", justify="right", no_wrap=True)
    out.add_column("best\n- mean", justify="right", no_wrap=True)
    out.add_column("dist", justify="right", no_wrap=True)
    out.add_column("dis-\ntinct", justify="right", no_wrap=True)
    out.add_column("skip", justify="right", no_wrap=True)
    out.add_column("coll-\napse", justify="right", no_wrap=True)
    out.add_column("eval acc\nmean ± std (n)", justify="right", no_wrap=True)
    out.add_column("cons.\neval", justify="right", no_wrap=True)
    for row in table.to_pylist():
        seeds = str(row.get("n_seeds", 0))
        if row.get("n_failed"):
            seeds += f"\n{row['n_failed']} fail"
        eval_text = _acc_cell(row.get("eval_acc_mean"), row.get("eval_acc_std"), None, None)
        if row.get("eval_acc_mean") is not None:
            eval_text += f" ({row.get('n_evaluated', 0)})"
        collapse = row.get("collapse_rate")
        out.add_row(
            str(row.get("group", "")),
            seeds,
            _acc_cell(row.get("val_acc_mean"), row.get("val_acc_std"), row.get("val_acc_ci_low"),
                      row.get("val_acc_ci_high")),
            _fmt(row.get("best_minus_mean")),
            _fmt(row.get("genotype_distance_mean"), ".3f"),
            _fmt(row.get("n_distinct_genotypes"), "d"),
            _fmt(row.get("skip_normal_mean"), ".1f"),
            "-" if collapse is None else f"{collapse:.0%}",
            eval_text,
            _fmt(row.get("consensus_eval_acc_mean")),
        )
    if console is not None:
        console.print(out)
    return out
