"""``python -m orchestrator.sweep``: stability sweeps and multi-objective HPO of DARTS-family searches on Ray Tune
(``stability``, ``hpo``, ``status``, ``summary``; the README's *Stability sweeps*). The same command resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any, Iterator, Mapping, Sequence

from .cli import EXIT_INTERRUPTED, Parser, check_name, resolve_storage, run_cli, split_experiment
from .cluster import check_storage, cluster_address, connect, connect_timeout, local_resources
from .experiment import (TUNE_DIRS, ParquetResults, abs_data_dir, claim_experiment, finish, fit,
                         read_claim, reconcile_stability, render_stability)
from .presets import Preset, check_data, check_resources, load_preset
from .progress import OPTUNA_TRIAL_KEY, TuneProgress, console
from .results import experiment_lock, ResultStore

DEFAULT_CONFIG = "stability"


@contextlib.contextmanager
def locked_experiment(preset: Preset, storage: str, name: str, address: str | None,
               per_trial: Sequence[Mapping[str, float]], verbose: bool) -> Iterator[tuple[ResultStore, dict]]:
    """Check the data and that a trial fits (before Ray starts, when Ray runs here), then hold the experiment's
    lock with Ray connected: yields the store and the cluster's capacity."""
    if not (address or "").startswith("ray://"):
        check_data(preset)
    here = local_resources() if not address else None  # what the Ray started here will have
    for res in per_trial if here else ():
        check_resources(res, here)
    store = ResultStore(storage, name)
    check_storage(store)
    with experiment_lock(store):
        available = connect(address, verbose, store)
        for res in per_trial:
            check_resources(res, available)
        yield store, available


# -- stability ---------------------------------------------------------------------------------------------------
def run_stability(preset: Preset, storage: str, name: str, address: str | None, evaluate: bool = False,
                  verbose: bool = False, callbacks: Sequence[Any] = ()) -> int:
    from ray import tune

    from .trainable import search_trainable

    evaluation = preset.evaluation() if (evaluate or preset.evaluate) else None
    evaluate_after = evaluation is not None and (evaluate or evaluation.after_sweep)
    per_trial = [preset.resources] + ([evaluation.resources] if evaluate_after else [])
    groups, seeds, grid_keys = [abs_data_dir(g) for g in preset.groups()], list(preset.seeds), preset.group_keys()
    with locked_experiment(preset, storage, name, address, per_trial, verbose) as (store, available):
        trainable, space, workers = search_trainable, {}, ""
        if preset.distributed:  # every search a data-parallel Ray Train run inside its Tune trial
            from .distributed import DistributedOptions, check_resources as check_workers, distributed_search_trial

            opts = DistributedOptions.from_mapping(preset.distributed)
            check_workers(opts, available)
            trainable, space = distributed_search_trial, {"distributed": dict(preset.distributed)}
            workers = f", each on {opts.num_workers} Ray Train worker(s)"
        claim_experiment(store, "stability", {"groups": groups, "group_keys": grid_keys, "seeds": seeds,
                                              "distributed": dict(preset.distributed)}, preset.raw)
        n_trials = len(groups) * len(seeds)
        console().print(f"[bold]{name}[/]: {len(groups)} configuration(s) x {len(seeds)} seed(s) = {n_trials} "
                        f"searches{workers}; results in {store.uri()}")
        epochs = sum(preset.search_config(g, seed=seeds[0]).epochs for g in preset.groups()) * len(seeds)
        start = time.perf_counter()
        grid = fit(store, TUNE_DIRS["stability"], trainable, preset.resources,
                   preset.failure_spec(), verbose, lambda: (
                       {"search": tune.grid_search(groups), "seed": tune.grid_search(seeds), **space},
                       {"max_concurrent_trials": preset.max_concurrent_trials or None},
                       [ParquetResults(storage, name, "stability", grid_keys),
                        TuneProgress("search", n_trials, epochs, grid_keys=grid_keys)]), callbacks)
        counts = reconcile_stability(store, grid, grid_keys)
        console().print(f"searches: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
                        f"{counts.get('running', 0)} unfinished; {time.perf_counter() - start:.0f} s")
        eval_code = 0
        if not counts.get("running") and evaluate_after:
            from .evaluate import EvaluateRequest, run_evaluations

            eval_code = run_evaluations(preset, store, EvaluateRequest.from_spec(evaluation), address, show=False)
        code = finish(store, counts)
        return code if code == EXIT_INTERRUPTED or eval_code == 0 else max(code, eval_code)


# -- hpo -----------------------------------------------------------------------------------------------------------
def _optuna_search_class() -> type:
    from ray.tune.search.optuna import OptunaSearch

    from .trainable import OBJECTIVE_ACC, OBJECTIVE_DISTANCE

    class MultiObjectiveOptuna(OptunaSearch):
        """OptunaSearch that records a trial stopped before its last seed (no objectives) as pruned; Ray 2.60's
        own would pass ``[None, None]`` to ``study.tell`` as a completed trial, which Optuna refuses. Its configs
        carry their Optuna trial number (``OPTUNA_TRIAL_KEY``), which the progress lines show."""

        def suggest(self, trial_id: str) -> dict | None:
            config = super().suggest(trial_id)
            if isinstance(config, dict) and trial_id in self._ot_trials:
                config[OPTUNA_TRIAL_KEY] = self._ot_trials[trial_id].number
            return config

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result is not None and any(result.get(m) is None for m in (OBJECTIVE_ACC, OBJECTIVE_DISTANCE)):
                result = None
            super().on_trial_complete(trial_id, result=result, error=error)

    return MultiObjectiveOptuna


def study_url(spec: Any, storage: str, name: str) -> str:
    if spec.study_storage:
        return spec.study_storage
    if "://" in storage:
        raise ValueError("hpo with remote --storage needs hpo.study_storage (an Optuna storage URL reachable from "
                         "the driver, e.g. postgresql://...): a sqlite file cannot live in object storage")
    return f"sqlite:///{ResultStore(storage, name).root}/optuna.db"


def shown_url(url: str) -> str:
    """A study storage URL as printed: its password, if any, as ``***``."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is refused by open_study_storage, shown as given here
        return url


def open_study_storage(url: str) -> Any:
    """The Optuna storage at ``url``, connected (its tables created): a ``ValueError`` naming the URL (password
    hidden) when it cannot be, e.g. no server, a wrong password, a missing driver. A server database
    (``postgresql://``) is given the connect timeout; its password may come from ``PGPASSWORD`` or ``~/.pgpass``."""
    import optuna

    connect_args = {"connect_timeout": max(1, round(connect_timeout()))} if url.startswith("postgresql") else {}
    try:
        if url.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(url[len("sqlite:///"):]), exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": connect_args})
    except ImportError as err:  # Optuna's, from the driver's ModuleNotFoundError
        missing = getattr(err.__cause__, "name", None) or "?"
        how = "pip install -c constraints.txt -e '.[postgres]'" if url.startswith("postgresql") else "install it"
        raise ValueError(f"hpo.study_storage {shown_url(url)} needs the database driver {missing!r}: {how}") from None
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's and the driver's errors, any of them: one line
        cause = getattr(err, "orig", None) or err  # the driver's own message, without SQLAlchemy's footer
        first = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        raise ValueError(f"hpo.study_storage {shown_url(url)} cannot be opened: {first}") from None


SAMPLERS = {"tpe": "TPESampler", "nsga2": "NSGAIISampler", "random": "RandomSampler"}


def run_hpo(preset: Preset, storage: str, name: str, address: str | None, verbose: bool = False,
            callbacks: Sequence[Any] = ()) -> int:
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from .trainable import HPO_PROGRESS, HPO_RUNNING_ACC, OBJECTIVE_ACC, OBJECTIVE_DISTANCE, hpo_trainable

    spec = preset.hpo_spec()
    url = study_url(spec, storage, name)
    study_storage = open_study_storage(url)  # before anything runs: a bad URL is one line
    with locked_experiment(preset, storage, name, address, [spec.resources], verbose) as (store, available):
        claim_experiment(store, "hpo", {"search": abs_data_dir(preset.search), "hpo": dict(preset.hpo)}, preset.raw)
        # The objectives arrive with a configuration's last seed only; earlier results carry the ASHA metric.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        epochs = int(preset.search_config(seed=0).epochs)
        console().print(f"[bold]{name}[/]: Optuna ({spec.sampler}, 2 objectives: {OBJECTIVE_ACC} max, "
                        f"{OBJECTIVE_DISTANCE} min) x {spec.num_samples} configurations x {len(spec.seeds)} seeds; "
                        f"study {shown_url(url)}")

        def make() -> tuple[dict, dict, list]:
            sampler = getattr(optuna.samplers, SAMPLERS[spec.sampler])(seed=spec.seed)
            searcher = _optuna_search_class()(metric=[OBJECTIVE_ACC, OBJECTIVE_DISTANCE], mode=["max", "min"],
                                              sampler=sampler, study_name=name,
                                              storage=study_storage)
            limit = spec.max_concurrent_trials or max(1, int(available.get("CPU", 1) //
                                                             max(float(spec.resources.get("cpu", 1)), 1e-9)))
            scheduler = (ASHAScheduler(time_attr=HPO_PROGRESS, metric=HPO_RUNNING_ACC, mode="max",
                                       max_t=len(spec.seeds), grace_period=spec.grace_period,
                                       reduction_factor=spec.reduction_factor)
                         if spec.scheduler == "asha" else FIFOScheduler())
            return ({"search": abs_data_dir(preset.search), "seeds": list(spec.seeds),
                     "params": {p.name: p.tune_domain() for p in spec.space}},
                    {"search_alg": ConcurrencyLimiter(searcher, max_concurrent=limit), "scheduler": scheduler,
                     "num_samples": spec.num_samples},
                    [ParquetResults(storage, name, "hpo"),
                     TuneProgress("hpo", spec.num_samples, spec.num_samples * len(spec.seeds) * epochs,
                                  metric=OBJECTIVE_ACC, epoch_key="hpo_epochs_done")])

        start = time.perf_counter()
        grid = fit(store, TUNE_DIRS["hpo"], hpo_trainable, spec.resources,
                   preset.failure_spec(), verbose, make, callbacks)
        results = [(r.error, dict(r.metrics or {})) for r in grid]
        unfinished = sum(1 for err, m in results if err is None and not m.get("done"))
        unfinished += max(0, spec.num_samples - len(results))  # never created before an interruption
        failed = sum(1 for err, _ in results if err is not None)
        console().print(f"hpo: {len(results)} configurations in {time.perf_counter() - start:.0f} s")
        code = finish(store, {"failed": failed, "running": unfinished}, what="configuration(s)")
        render_pareto(study_storage, name)
        return code


def render_pareto(study_storage: Any, name: str) -> None:
    """The Optuna study's trials and its Pareto front (both objectives)."""
    import optuna
    from rich.table import Table

    try:
        study = optuna.load_study(study_name=name, storage=study_storage)
    except KeyError:
        return
    front = {t.number for t in study.best_trials}
    table = Table(title=f"Optuna study {name!r}: {len(study.trials)} trials (* = Pareto front)")
    names = sorted({k for t in study.trials for k in t.params})
    for col in ["#", "state", *[n.split("/")[-1] for n in names], "val acc mean", "genotype dist"]:
        table.add_column(col, justify="right")
    for t in study.trials:
        cells = [f"{t.number}{'*' if t.number in front else ''}", t.state.name.lower()]
        cells += [f"{t.params[n]:.4g}" if isinstance(t.params.get(n), float) else str(t.params.get(n, "-"))
                  for n in names]
        table.add_row(*cells, *["-" if v is None else f"{v:.4f}" for v in t.values or [None, None]])
    console().print(table)


# -- status / summary ----------------------------------------------------------------------------------------------
def show_status(storage: str, name: str, per_trial: bool) -> int:
    from rich.table import Table

    store = ResultStore(storage, name)
    claim = read_claim(store)
    if claim is None and not store.exists("trials"):
        raise ValueError(f"no experiment {name!r} in {storage}")
    trials = store.read("trials")
    if trials.num_rows == 0:
        console().print(f"{name}: no trial has reported yet")
        return 0
    statuses = trials.column("status").to_pylist()
    console().print(f"[bold]{name}[/] ({(claim or {}).get('kind', '?')}, from Parquet): {statuses.count('done')} "
                    f"done, {statuses.count('running')} running, {statuses.count('failed')} failed")
    if per_trial:
        table = Table(title="Trials")
        for col in ("trial", "group", "seed", "status", "epochs", "val acc", "wall s", "error"):
            table.add_column(col, overflow="fold")
        for r in trials.to_pylist():
            table.add_row(str(r["trial_id"]), str(r["group"]), str(r["seed"]), str(r["status"]),
                          str(r.get("epochs_done") or "-"),
                          "-" if r.get("val_acc") is None else f"{r['val_acc']:.4f}",
                          "-" if r.get("wall_time_s") is None else f"{r['wall_time_s']:.0f}",
                          (r.get("error") or "")[:80])
        console().print(table)
    render_stability(store)
    return 0


# -- command line --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m orchestrator.sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    runs = {"stability": "many seeded searches per configuration; the stability table",
            "hpo": "multi-objective Optuna over search settings (accuracy and stability)"}
    for cmd, text in runs.items():
        p = sub.add_parser(cmd, help=text)
        p.add_argument("--config", help=f"sweep config: a YAML file (default tune_configs/{DEFAULT_CONFIG}.yaml)")
        p.add_argument("--preset", help="a preset name in tune_configs/ (smoke, local, cifar10, ...)")
        p.add_argument("--storage", help="results root: a directory or s3://bucket/prefix (default "
                                         "$PCDARTS_STORAGE or ./results)")
        p.add_argument("--name", help="experiment name (default: the preset's name); the same name resumes")
        p.add_argument("--address", help="Ray cluster to join: auto, ray://HEAD:10001 or HEAD:6379 "
                                         "(default: start Ray on this machine)")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a preset value: search.k=8 (or k=8), seeds=[0,1], evaluate.epochs=3")
        p.add_argument("--verbose", action="store_true", help="Tune's own progress output and the workers' logs")
        if cmd == "stability":
            p.add_argument("--evaluate", action="store_true", help="then retrain the found genotypes (the "
                           "preset's evaluate: section) and a random baseline")
    for cmd in ("status", "summary"):
        p = sub.add_parser(cmd, help="the stability table of an experiment" +
                           (" and its trials" if cmd == "status" else ""))
        p.add_argument("experiment", help="experiment name (under --storage) or its folder")
        p.add_argument("--storage", help="results root (default $PCDARTS_STORAGE or ./results)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("status", "summary"):
        storage, name = split_experiment(args.experiment, args.storage)
        return show_status(storage, name, per_trial=args.command == "status")
    if args.config and args.preset:
        raise ValueError("give either --config FILE or --preset NAME, not both")
    if not (args.config or args.preset):
        console().print(f"no --preset given: using the {DEFAULT_CONFIG!r} preset (tune_configs/{DEFAULT_CONFIG}.yaml, "
                        "CIFAR-10, needs its data); --preset local runs the offline sweep on this machine")
    preset = load_preset(args.config or args.preset or DEFAULT_CONFIG, args.sets)
    storage, address = resolve_storage(args.storage), cluster_address(args.address)
    if args.command == "stability":
        name = check_name(args.name or preset.name)
        return run_stability(preset, storage, name, address, evaluate=args.evaluate, verbose=args.verbose)
    return run_hpo(preset, storage, check_name(args.name or f"{preset.name}-hpo"), address, verbose=args.verbose)


if __name__ == "__main__":
    run_cli(main)
