"""``python -m orchestrator.evaluate``: retrain derived genotypes from scratch as Ray Tune trials, several seeds each.

What is evaluated: ``--top-k``, ``--consensus``, ``--genotype``, ``--random``, else the preset's ``evaluate:`` section.
Evaluations done under the same protocol are not rerun, so the same command resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from pcdarts_core.genotypes import PUBLISHED, consensus_genotype, load_genotype, parse_genotype
from pcdarts_core.spaces import get_space

from .cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Parser, run_cli, split_experiment
from .cluster import check_storage, cluster_address, connect, local_resources
from .experiment import ParquetResults, abs_data_dir, finish, fit, read_claim
from .presets import EvaluateSpec, Preset, apply_sets, check_resources, load_preset, preset_from_dict
from .progress import TuneProgress, console, last_error_line
from .results import (experiment_lock, ResultStore, eval_row, source_consensus, source_published, source_random,
                      source_trial)


@dataclass(frozen=True)
class EvaluateRequest:
    """What to evaluate: top-k searches per group (None: none; 0: all), consensus cells, named cells, random cells."""

    top_k: int | None = None
    consensus: bool = False
    genotypes: tuple[str, ...] = ()
    random: int = 0
    seeds: tuple[int, ...] = (0,)

    @classmethod
    def from_spec(cls, spec: EvaluateSpec) -> "EvaluateRequest":
        return cls(top_k=0 if spec.top_k is None else spec.top_k, consensus=spec.consensus,
                   genotypes=spec.genotypes, random=spec.random_baseline, seeds=spec.seeds)


def protocol_id(eval_cfg: Mapping[str, Any]) -> str:
    """A short hash of the evaluation protocol (EvalConfig without seed and where it runs)."""
    kept = {k: v for k, v in eval_cfg.items() if k not in ("seed", "device", "num_workers", "data_dir")}
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:10]


def evaluation_specs(store: ResultStore, request: EvaluateRequest, protocol: str,
                     space: str = "darts") -> list[dict[str, Any]]:
    """One spec per (source, seed): ``eval_id``, ``source``, ``genotype`` (JSON), ``seed``, ``group``, ``protocol``.
    Random cells come from ``space`` (NAS-Bench-201 cells for nb201, DARTS-space cells otherwise)."""
    sources: list[tuple[str, Any, str | None]] = []
    if request.top_k is not None or request.consensus:
        rows = store.read("trials").select(["trial_id", "group", "status", "val_acc", "genotype"]).to_pylist()
        done = sorted((r for r in rows if r["status"] == "done" and r["genotype"]), key=lambda r: (
            r["group"], -(r["val_acc"] if r["val_acc"] is not None else -1), r["trial_id"]))
        if not done:
            raise ValueError(f"experiment {store.name!r} in {store.storage} has no finished searches to evaluate")
        for group, group_rows in itertools.groupby(done, key=lambda r: r["group"]):
            genotypes = [(r["trial_id"], parse_genotype(r["genotype"])) for r in group_rows]  # best first
            if request.top_k is not None:
                sources += [(source_trial(t), g, group) for t, g in genotypes[:request.top_k or None]]
            if request.consensus:
                sources.append((source_consensus(group), consensus_genotype([g for _, g in genotypes]), group))
    sources += [(source_published(name if name in PUBLISHED else name.replace("|", "_")), load_genotype(name), None)
                for name in request.genotypes]  # a file's path, or an NB201 string, as the label
    sources += [(source_random(i), get_space(space).random_cell(i), None) for i in range(request.random)]
    return [{"eval_id": f"{source}|seed={seed}", "source": source, "genotype": genotype.to_json(), "seed": int(seed),
             "group": group, "protocol": protocol} for source, genotype, group in sources for seed in request.seeds]


def pending(store: ResultStore, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The specs not already done under the same protocol (evaluations.parquet)."""
    table = store.read("evaluations")
    rows = table.select(["eval_id", "status", "protocol"]).to_pylist() if "protocol" in table.column_names else []
    done = {(r["eval_id"], r["protocol"]) for r in rows if r["status"] == "done"}
    return [s for s in specs if (s["eval_id"], s["protocol"]) not in done]


def run_evaluations(preset: Preset, store: ResultStore, request: EvaluateRequest, address: str | None,
                    show: bool = True, verbose: bool = False) -> int:
    """Run the requested evaluations as Tune trials (resuming an interrupted set), then update the tables
    (``show``: also compact, print and return the command's exit status; else the status of these evaluations)."""
    from ray import tune

    from .trainable import eval_trainable

    spec = preset.evaluation()
    eval_cfg = abs_data_dir(spec.config.to_dict())
    protocol = protocol_id(eval_cfg)
    specs = evaluation_specs(store, request, protocol, spec.config.search_space)
    todo = pending(store, specs)
    console().print(f"[bold]evaluate[/] {store.name}: {len(specs)} evaluation(s) "
                    f"({len(specs) - len(todo)} already done) of {spec.config.epochs} epochs, protocol {protocol}")
    counts = {"failed": 0, "running": 0}
    if todo:
        check_resources(spec.resources, connect(address, verbose, store), "evaluate.resources")
        key = hashlib.sha1(json.dumps([sorted(s["eval_id"] for s in todo), protocol]).encode()).hexdigest()[:10]
        start = time.perf_counter()
        grid = fit(store, f"evaluate-{key}", eval_trainable, spec.resources, preset.failure_spec(), verbose, lambda: (
            {"eval": eval_cfg, "spec": tune.grid_search(todo)},
            {"max_concurrent_trials": spec.max_concurrent_trials or None},
            [ParquetResults(store.storage, store.name, "evaluate", eval_config=eval_cfg),
             TuneProgress("evaluate", len(todo), len(todo) * spec.config.epochs, metric="test_acc")]))
        rows = []
        for result in (r for r in grid if "spec" in (r.config or {})):  # not started before an interruption
            metrics = result.metrics or {}
            error = last_error_line(str(result.error)) if result.error is not None else None
            status = "failed" if error else ("done" if metrics.get("done") else "running")
            counts[status] = counts.get(status, 0) + 1
            rows.append(eval_row(result.config["spec"], eval_cfg, metrics, status, error, metrics.get("trial_id")))
        if rows:
            store.upsert("evaluations", rows)
        console().print(f"evaluations: {counts.get('done', 0)} done, {counts['failed']} failed, "
                        f"{counts['running']} unfinished; {time.perf_counter() - start:.0f} s")
    if show:
        return finish(store, counts, what="evaluation(s)")
    return EXIT_INTERRUPTED if counts["running"] else (EXIT_FAILED if counts["failed"] else EXIT_OK)


# -- command line --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m orchestrator.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="experiment", required=True, help="experiment name (under --storage) or its folder")
    p.add_argument("--storage", help="results root (default $PCDARTS_STORAGE or ./results)")
    p.add_argument("--top-k", type=int, metavar="N", help="the N best searches (val_acc) of every group")
    p.add_argument("--consensus", action="store_true", help="each group's consensus genotype")
    p.add_argument("--genotype", action="append", default=[], metavar="NAME_OR_FILE",
                   help="a published genotype (PC_DARTS_CIFAR, DARTS_V2, ...) or a genotype file; repeatable")
    p.add_argument("--random", type=int, default=0, metavar="N",
                   help="N random cells of the search space (the baseline)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds of every evaluation (default: the preset's)")
    p.add_argument("--preset", help="take the evaluation protocol from this preset's evaluate: section")
    p.add_argument("--config", help="... or from this YAML file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override the protocol: evaluate.epochs=20, evaluate.layers=8, ...")
    p.add_argument("--address", help="Ray cluster to join (default: start Ray on this machine)")
    p.add_argument("--verbose", action="store_true", help="Tune's own output and the workers' logs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage, name = split_experiment(args.experiment, args.storage)
    store = ResultStore(storage, name)
    check_storage(store)
    claim = read_claim(store)
    if claim is None and not store.exists("trials"):
        raise ValueError(f"no experiment {name!r} in {storage}")
    if args.preset and args.config:
        raise ValueError("give either --preset NAME or --config FILE, not both")
    if args.preset or args.config:
        preset = load_preset(args.preset or args.config, args.sets)
    elif not (claim or {}).get("preset"):
        raise ValueError(f"experiment {name!r} has no recorded preset; pass --preset NAME for the protocol")
    else:  # the protocol of the preset the experiment ran with
        raw = apply_sets(dict(claim["preset"]), args.sets, section="evaluate")
        preset = preset_from_dict(raw, default_name=name, where=f"{name} preset")
    spec = preset.evaluation()
    if args.top_k is not None and args.top_k < 1:
        raise ValueError("--top-k must be at least 1")
    if args.random < 0:
        raise ValueError("--random must be >= 0")
    for g in args.genotype:
        load_genotype(g)
    seeds = tuple(args.seeds) if args.seeds else spec.seeds
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError("--seeds must be distinct integers >= 0")
    request = EvaluateRequest(args.top_k, args.consensus, tuple(args.genotype), args.random, seeds)
    if request == EvaluateRequest(seeds=seeds):  # no selection flag: the preset's evaluate: section chooses
        request = replace(EvaluateRequest.from_spec(spec), seeds=seeds)
    address = cluster_address(args.address)
    if not (address or "").startswith("ray://"):
        from pcdarts_core.data import check_dataset

        check_dataset(spec.config.dataset, spec.config.data_dir)
    if not address:
        check_resources(spec.resources, local_resources(), "evaluate.resources")
    with experiment_lock(store):
        return run_evaluations(preset, store, request, address, verbose=args.verbose)


if __name__ == "__main__":
    run_cli(main)
