"""The stability table of an experiment (one row per configuration group, over its done seeds, with the statistics
of :mod:`pcdarts_core.stability`) from its trials, epochs and evaluations tables; and its terminal rendering."""

from __future__ import annotations

import functools
import math
import re
from typing import Any, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Column, Table

from pcdarts_core.config import SearchConfig
from pcdarts_core.data import DATASETS
from pcdarts_core.genotypes import Genotype, parse_genotype
from pcdarts_core.spaces import TRIAL_METRIC_PREFIXES
from pcdarts_core.stability import (StabilityOptions, Summary, canonical_key, genotype_json_key, genotype_stats,
                                    parse_genotype_json, random_distance_mean, summarize)

from .results import SUMMARY_STATS, retrained, to_table


# -- the table -------------------------------------------------------------------------------------------------
def _column(table: pa.Table, name: str, floats: bool = False) -> Any:
    col = table.column(name) if name in table.column_names else pa.nulls(table.num_rows)
    return col.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False) if floats else col.to_pylist()


@functools.lru_cache(maxsize=4096)  # reports and the end of a command read the same cells again
def _genotype(text: str, where: str) -> Genotype:
    try:
        return parse_genotype_json(text) or parse_genotype(text)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _stop_epochs(epochs: pa.Table, trial_ids: set[str]) -> dict[str, int]:
    """:func:`stopped_changing_epoch` of every listed trial with epoch rows, vectorized over the epochs table."""
    if epochs.num_rows == 0 or not {"trial_id", "epoch", "genotype"} <= set(epochs.column_names):
        return {}
    ids = pa.array(list(trial_ids), pa.string())
    t = epochs.select(["trial_id", "epoch", "genotype"]).drop_null().filter(pc.field("trial_id").isin(ids))
    if t.num_rows == 0:
        return {}
    tid, geno = (pc.dictionary_encode(t[name]).combine_chunks() for name in ("trial_id", "genotype"))
    trial, code = (encoded.indices.to_numpy(zero_copy_only=False) for encoded in (tid, geno))
    epoch = t["epoch"].to_numpy()
    order = np.lexsort((epoch, trial))  # sort small integer arrays, never the genotype texts
    trial, epoch, code = trial[order], epoch[order], code[order]
    same_trial = trial[1:] == trial[:-1]
    text_change = np.flatnonzero(same_trial & (code[1:] != code[:-1])) + 1
    # Only texts on either side of a textual change need parsing: a different text may be the same cell (equal keys:
    # genotypes at distance 0).
    texts, keys = geno.dictionary.to_pylist(), {}
    for k in np.unique(np.concatenate([code[text_change], code[text_change - 1]])).tolist():
        keys[k] = genotype_json_key(texts[k]) or canonical_key(_genotype(texts[k], "epochs genotype"))
    real = [i for i in text_change.tolist() if keys[code[i]] != keys[code[i - 1]]]
    starts = np.flatnonzero(np.r_[True, ~same_trial])
    # Position of the last change inside each trial (or the trial's first row): the genotype held from there.
    marker = np.zeros(len(code), dtype=np.int64)
    marker[real] = real
    last = np.maximum(np.maximum.reduceat(marker, starts), starts)
    return {tid.dictionary[trial[s]].as_py(): int(epoch[i]) for s, i in zip(starts, last)}


def _summary(prefix: str, s: Summary, fields: tuple[str, ...] = SUMMARY_STATS) -> dict:
    return {f"{prefix}_{name}": getattr(s, name) for name in fields}


def stability_table(trials: pa.Table, epochs: pa.Table | None = None, evaluations: pa.Table | None = None,
                    *, options: StabilityOptions | None = None) -> pa.Table:
    """One row per configuration group (``results.SCHEMAS["stability"]`` columns), sorted. Seeds are its done trials;
    done (or status-less) evaluations count once per search (``trial:<id>``, averaged) or toward the consensus's."""
    opts = options or StabilityOptions()
    for name in ("trial_id", "group", "status"):
        if name not in trials.column_names:
            raise ValueError(f"trials table has no {name!r} column")
    trial_ids = [str(t) for t in _column(trials, "trial_id")]
    groups, status, genos = (_column(trials, name) for name in ("group", "status", "genotype"))
    val = _column(trials, "val_acc", floats=True)
    # what the search spaces add per search: NAS-Bench-201 lookups (bench_acc_<dataset>, the tabulated test
    # accuracy of each search's cell) and the share of parameter-free ops (param_free_share_<cell>)
    bench = {name: _column(trials, name, floats=True) for name in sorted(trials.column_names)
             if name.startswith(TRIAL_METRIC_PREFIXES)}
    by_group: dict[str, list[int]] = {}
    for i, grp in enumerate(groups):
        if grp is None:
            raise ValueError(f"trial {trial_ids[i]!r} has no group")
        by_group.setdefault(grp, []).append(i)
    done_ids = {trial_ids[i] for i, s in enumerate(status) if s == "done"}
    stop = _stop_epochs(epochs, done_ids) if epochs is not None else {}

    # test accuracies of ("trial", <id>) and ("consensus", <group>) (baselines are not any group's)
    evals = retrained(evaluations) if evaluations is not None else {}

    rows: list[dict[str, Any]] = []
    for grp, idx in sorted(by_group.items()):
        done = [i for i in idx if status[i] == "done"]
        acc = summarize(val[done], opts)
        ev = summarize([sum(v) / len(v) for v in (evals.get(("trial", trial_ids[i])) for i in done) if v], opts)
        try:
            gstats = genotype_stats([_genotype(genos[i], f"trial {trial_ids[i]!r} genotype")
                                     for i in done if genos[i] is not None], opts.collapse_threshold)
        except ValueError as err:
            raise ValueError(f"group {grp!r}: {err}") from None
        stops = [stop[trial_ids[i]] for i in done if trial_ids[i] in stop]
        cons_evals = evals.get(("consensus", grp), [])
        row = {"group": grp, "n_seeds": len(done), "n_failed": sum(status[i] == "failed" for i in idx),
               "n_running": sum(status[i] == "running" for i in idx), "collapse_threshold": opts.collapse_threshold,
               **_summary("val_acc", acc), "best_minus_mean": acc.best_minus_mean,
               "n_evaluated": ev.n, **_summary("eval_acc", ev), "eval_best_minus_mean": ev.best_minus_mean,
               "consensus_eval_acc_mean": float(np.mean(cons_evals)) if cons_evals else None,
               "n_consensus_evals": len(cons_evals), "n_genotypes": gstats.n, "n_distinct_genotypes": gstats.n_distinct,
               "genotype_distance_mean": gstats.distance_mean, "collapse_rate": gstats.collapse_rate,
               "consensus_genotype": gstats.consensus.to_json() if gstats.consensus is not None else None,
               "consensus_distance_mean": gstats.consensus_distance_mean, "skip_normal_mean": gstats.skip_normal_mean,
               "stop_changing_epoch_mean": float(np.mean(stops)) if stops else None,
               **{f"{name}_frequencies": gstats.frequencies.to_json(name) for name in ("edge", "edge_op", "op")}}
        for name, values in bench.items():  # bench_acc_cifar10_mean, param_free_share_normal_ci_low, ...
            row.update(_summary(name, summarize(values[done], opts), ("mean", "ci_low", "ci_high")))
        rows.append(row)
    return to_table("stability", rows)


# -- labels -------------------------------------------------------------------------------------------------------
_PAIR = re.compile(r",(?=[A-Za-z_][\w.]*=)")


def short_labels(groups: Sequence[str]) -> dict[str, str]:
    """Group texts without the ``key=value`` pairs all groups share (``method=pcdarts,k=4`` -> ``k=4``); a lone
    group (one run, one configuration) is named by its method (``method=rome``), its full text shown beside."""
    parts = {g: _PAIR.split(g) for g in groups}
    if len(groups) == 1:
        return {g: next((p for p in parts[g] if p.startswith("method=")), g) for g in groups}
    common = set.intersection(*(set(p) for p in parts.values())) if groups else set()
    return {g: ",".join(p for p in parts[g] if p not in common) or g for g in groups}


def common_pairs(groups: Sequence[str]) -> str:
    """The ``key=value`` pairs that every group shares, as group text (what :func:`short_labels` leaves out); a
    lone group's whole text (its label names only the method)."""
    parts = [_PAIR.split(g) for g in groups]
    return ",".join(p for p in parts[0] if all(p in q for q in parts[1:])) if groups else ""


# -- reference levels ----------------------------------------------------------------------------------------------
class References(NamedTuple):
    """Where a group's numbers would be without a search: ``chance`` accuracy (1 / classes of its dataset), the
    ``random_distance`` between random cells of its space (its random baseline's cells) and the
    ``uniform_entropy`` of uniform alphas (log of the ops per edge, the search's ``arch_entropy_max``)."""

    dataset: str
    space: str
    chance: float | None
    random_distance: float | None
    uniform_entropy: float | None


def _first(table: pa.Table | None, name: str, rows: Sequence[int]) -> Any:
    values = _column(table, name) if table is not None else []
    return next((values[i] for i in rows if i < len(values) and values[i] is not None), None)


def references(trials: pa.Table, epochs: pa.Table | None = None) -> dict[str, References]:
    """The :class:`References` of every group of an experiment, from its trials' ``cfg_dataset`` and
    ``cfg_search_space`` (the search's defaults where the preset left them out) and its epochs' entropy bound."""
    groups = _column(trials, "group")
    per_trial = {str(t): g for t, g in zip(_column(trials, "trial_id"), groups)}
    epoch_groups = [per_trial.get(str(t)) for t in _column(epochs, "trial_id")] if epochs is not None else []
    out = {}
    for grp in dict.fromkeys(g for g in groups if g is not None):
        rows = [i for i, g in enumerate(groups) if g == grp]
        dataset = str(_first(trials, "cfg_dataset", rows) or SearchConfig.dataset)
        space = str(_first(trials, "cfg_search_space", rows) or SearchConfig.search_space)
        ent = _first(epochs, "arch_entropy_max", [i for i, g in enumerate(epoch_groups) if g == grp])
        if ent is None and (alphas := _first(epochs, "alphas_normal", [i for i, g in enumerate(epoch_groups)
                                                                       if g == grp])):
            ent = math.log(len(alphas[0]))
        info = DATASETS.get(dataset)
        try:
            distance = random_distance_mean(space)
        except ValueError:  # an unknown space (a table from elsewhere): no level
            distance = None
        out[grp] = References(dataset, space, 1.0 / info.num_classes if info else None, distance,
                              float(ent) if ent is not None and math.isfinite(ent) else None)
    return out


def reference_line(refs: Sequence[References]) -> str:
    """The reference levels of some groups in one line (each distinct value once, with what it is of)."""
    parts = []
    for what, attr, of in (("chance accuracy", "chance", lambda r: r.dataset),
                           ("random cells' distance", "random_distance", lambda r: r.space),
                           ("uniform arch entropy", "uniform_entropy",
                            lambda r: f"log {math.exp(r.uniform_entropy):.0f}")):
        values = dict.fromkeys((f"{getattr(r, attr):.3f}", of(r)) for r in refs if getattr(r, attr) is not None)
        if values:
            parts.append(f"{what} " + ", ".join(f"{v} ({name})" for v, name in values))
    return " · ".join(parts)


# -- terminal output -------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _acc_cell(mean: Any, std: Any, low: Any = None, high: Any = None, n: Any = None) -> str:
    if mean is None:
        return "-"
    ci = f"\n[{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None and high > low else ""
    return _fmt(mean) + (f" ± {_fmt(std)}" if std is not None else "") + ci + ("" if n is None else f"\n({n})")


#: what the stability table's columns are (the line under it)
LEGEND = ("val acc: the search's validation accuracy over the done seeds (95% CI); best - mean: what best-of-N "
          "adds; distance: mean genotype distance between two seeds' cells (0 = identical); distinct: different "
          "cells; skips: skip-connects in the normal cell (mean); collapse: share of seeds with >= {threshold} "
          "skips; eval acc: the searches' cells retrained (n = retrained); cons. eval: the consensus cell retrained")


def render_table(table: pa.Table, console: Console, title: str = "Search stability per group",
                 refs: Sequence[References] = (), evaluate_hint: str | None = None) -> None:
    """Print a :func:`stability_table` on ``console`` as a ``rich`` table (fits 120 columns; groups wrap), its
    legend, the reference levels ``refs`` and, while no cell was retrained, ``evaluate_hint`` (a command)."""
    headers = ("seeds", "val acc\nmean ± std\n[95% CI]", "best\n- mean", "distance", "distinct", "skips",
               "collapse", "eval acc\nmean ± std\n(n)", "cons.\neval")
    rows = table.to_pylist()
    groups = [str(row.get("group", "")) for row in rows]
    labels, common = short_labels(groups), common_pairs(groups)
    out = Table(Column("group", overflow="fold", max_width=34, style="cyan"),
                *(Column(header, justify="right", no_wrap=True) for header in headers), show_lines=True,
                title=title + (f" ({common})" if common else ""))
    for group, row in zip(groups, rows):
        seeds = str(row.get("n_seeds", 0)) + (f"\n{row['n_failed']} fail" if row.get("n_failed") else "")
        out.add_row(_PAIR.sub("\n", labels[group] if len(rows) > 1 else group), seeds,  # a pair a line
                    _acc_cell(*(row.get(f"val_acc_{k}") for k in ("mean", "std", "ci_low", "ci_high"))),
                    _fmt(row.get("best_minus_mean")), _fmt(row.get("genotype_distance_mean"), ".3f"),
                    _fmt(row.get("n_distinct_genotypes"), "d"), _fmt(row.get("skip_normal_mean"), ".1f"),
                    _fmt(row.get("collapse_rate"), ".0%"),
                    _acc_cell(row.get("eval_acc_mean"), row.get("eval_acc_std"), n=row.get("n_evaluated", 0)),
                    _fmt(row.get("consensus_eval_acc_mean")))
    console.print(out)
    threshold = next((r["collapse_threshold"] for r in rows if r.get("collapse_threshold")), 3)
    console.print(LEGEND.format(threshold=threshold), style="dim", overflow="fold")
    if line := reference_line(refs):
        console.print(f"reference levels: {line}", overflow="fold")
    if evaluate_hint and rows and not any(r.get("n_evaluated") or r.get("n_consensus_evals") for r in rows):
        console.print(f"eval columns empty: nothing retrained yet; run {evaluate_hint}", overflow="fold")
