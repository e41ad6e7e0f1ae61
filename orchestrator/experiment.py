"""One experiment on Ray Tune of any kind (stability sweep, HPO, evaluation): its claim (``sweep.json``), the
driver callback that records it, running it, and its end (what ``orchestrator.sweep`` and ``evaluate`` share)."""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

from ray.tune import Callback

from .cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from .progress import console, error_line, last_error_line, stop_all
from .results import ResultStore, heartbeat, epoch_row, eval_row, group_key, retrained, search_row

SWEEP_FILE = "sweep.json"
LOCK_HEARTBEAT_S = 60.0
TUNE_DIRS = {"stability": "search", "hpo": "hpo"}


# -- the claim -------------------------------------------------------------------------------------------------
def claim_experiment(store: ResultStore, kind: str, settings: Mapping[str, Any],
                     preset: Mapping[str, Any] | None = None) -> None:
    """Record what this experiment is (kind, settings, and the preset ``evaluate`` reuses); refuse other settings."""
    previous = read_claim(store)
    if previous is None:
        if store.read_file(SWEEP_FILE) is not None:
            raise ValueError(f"{store.root}/{SWEEP_FILE} is not a sweep record of this project")
        store.write_json(SWEEP_FILE, {"kind": kind, "settings": settings, "preset": dict(preset or {})})
    elif previous.get("kind") != kind:
        raise ValueError(f"experiment {store.name!r} is a {previous.get('kind')} run, not {kind}; "
                         f"use --name for a new experiment")
    else:
        before, now = (json.loads(json.dumps(s, default=str)) for s in (previous.get("settings"), settings))
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ValueError(f"experiment {store.name!r} in {store.storage} was started with different settings "
                             f"({', '.join(changed)} differ); rerun it unchanged to resume, or pick another --name")


def read_claim(store: ResultStore) -> dict[str, Any] | None:
    try:
        claim = store.read_json(SWEEP_FILE)
    except ValueError:
        return None
    return claim if isinstance(claim, dict) else None


# -- running on Tune -------------------------------------------------------------------------------------------
def abs_data_dir(values: Mapping[str, Any]) -> dict[str, Any]:
    """Local paths (the dataset root, a NAS-Bench-201 file) made absolute: Ray workers run elsewhere."""
    return {**values, **{k: os.path.abspath(os.path.expanduser(str(v))) for k, v in values.items()
                         if k in ("data_dir", "nb201_benchmark") and v is not None and "://" not in str(v)}}


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (Tune's default puts the whole config in them)."""
    return str(trial.trial_id)


#: Trials reuse the actor process of a finished trial with the same resources (``TuneConfig(reuse_actors=True)``):
#: no new worker process and imports per trial. bench/orchestration.py measured Tune's per-trial overhead at
#: 5.3 s without and 1.3 s with it on 2 CPUs (smoke searches). Every trial seeds all RNGs and sets its torch
#: threads itself.
REUSE_ACTORS = True


def fit(store: ResultStore, tune_dir: str, trainable: Any, resources: Mapping[str, float], failure: Any,
        verbose: bool, make: Callable[[], tuple[dict, dict, list]], loop_callbacks: Sequence[Any] = ()) -> Any:
    """Run the Tune experiment ``<experiment>/<tune_dir>``: restored (errored trials resumed) when it exists, else
    built from ``make()`` -> (param space, ``TuneConfig`` options, callbacks) with Ray's ``RunConfig``,
    ``FailureConfig`` and ``CheckpointConfig`` from the preset's ``failure:``. Quiet unless ``verbose``.
    ``loop_callbacks`` (tests' fault injectors) reach the search loop through ``tune.with_parameters``."""
    from ray import tune

    exp = store.uri()
    if loop_callbacks:
        trainable = tune.with_parameters(trainable, callbacks=list(loop_callbacks))
    trainable = tune.with_resources(trainable, {"cpu": float(resources.get("cpu", 1)),
                                                "gpu": float(resources.get("gpu", 0))})
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the new output engine prints a header even at verbose=0
        # Tune logs every trial failure with its traceback; the progress display prints one line instead and
        # the errors are kept in the Parquet files and the trials' error.txt.
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    try:
        if tune.Tuner.can_restore(f"{exp}/{tune_dir}"):
            console().print(f"resuming the Tune experiment at {exp}/{tune_dir}")
            return tune.Tuner.restore(f"{exp}/{tune_dir}", trainable=trainable, resume_errored=True).fit()
        space, options, callbacks = make()
        return tune.Tuner(trainable, param_space=space, tune_config=tune.TuneConfig(
            trial_dirname_creator=trial_dirname, reuse_actors=REUSE_ACTORS, **options), run_config=tune.RunConfig(
            name=tune_dir, storage_path=exp, callbacks=callbacks, verbose=1 if verbose else 0,
            failure_config=tune.FailureConfig(max_failures=failure.max_failures, fail_fast=failure.fail_fast),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=failure.checkpoints_to_keep))).fit()
    finally:
        stop_all()


# -- rows of searches ------------------------------------------------------------------------------------------
def search_group(search: Mapping[str, Any], grid_keys: Sequence[str]) -> str:
    """A search's group: its method and the values of the grid's keys (``method=pcdarts,k=4``)."""
    return group_key({"method": search.get("method", "pcdarts"), **{k: search.get(k) for k in grid_keys}})


def hpo_group(search: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """An HPO configuration's group: its method and sampled values (4 significant digits)."""
    return group_key({"method": search.get("method", "pcdarts"),
                      **{k: float(f"{v:.4g}") if isinstance(v, float) and v != 0 and math.isfinite(v) else v
                         for k, v in params.items()}})


def stability_trial_row(trial_id: str, config: Mapping[str, Any], result: Mapping[str, Any] | None, status: str,
                        grid_keys: Sequence[str], error: str | None = None,
                        failures: int | None = None) -> dict[str, Any]:
    """A ``trials`` row of one search of a stability sweep (config columns: the preset's settings and seed)."""
    return search_row(trial_id, {**config["search"], "seed": config["seed"]}, status, result, error=error,
                      group=search_group(config["search"], grid_keys), num_failures=failures)


def hpo_seed_row(tune_id: str, config: Mapping[str, Any], result: Mapping[str, Any], status: str,
                 error: str | None = None) -> dict[str, Any]:
    """A ``trials`` row of one seed of an HPO configuration (``trial_id`` = ``<tune trial>-s<seed>``)."""
    seed = result.get("seed", config["seeds"][0])
    metrics = {**result, "wall_time_s": result.get("seed_wall_time_s")}
    return search_row(f"{tune_id}-s{seed}", {**config["search"], **config["params"], "seed": seed}, status, metrics,
                      error=error, group=hpo_group(config["search"], config["params"]), hpo_trial=tune_id)


# -- the driver callback that writes the Parquet files -----------------------------------------------------------
class ParquetResults(Callback):
    """Writes the rows of a ``kind`` of experiment as results arrive: 'stability' (a trial is a search), 'hpo' (a
    configuration over seeds: rows per seed) or 'evaluate' (a retraining). Epoch rows are flushed every few seconds,
    when a trial ends and before Tune saves its state, so no epoch a resumed trial skips is lost."""

    FLUSH_EVERY_S = 5.0

    def __init__(self, storage: str, name: str, kind: str, grid_keys: Sequence[str] = (),
                 eval_config: Mapping[str, Any] | None = None):
        self.storage, self.name, self.kind = storage, name, kind
        self.grid_keys, self.eval_config = list(grid_keys), dict(eval_config or {})
        self.store = ResultStore(storage, name)
        self._epochs: list[dict[str, Any]] = []
        self._last_flush = self._last_beat = time.monotonic()

    def __reduce__(self) -> tuple:  # Tune pickles the callback: only its settings travel, not buffers or the store
        return type(self), (self.storage, self.name, self.kind, self.grid_keys, self.eval_config)

    def _upsert(self, kind: str, rows: list[dict[str, Any]]) -> bool:
        try:
            self.store.upsert(kind, rows)
            return True
        except (OSError, ValueError) as err:  # keep the sweep running; the final pass writes again
            console().print(f"[yellow]warning[/]: could not write {kind}.parquet: {err}")
            return False

    def flush(self) -> None:
        if self._epochs and self._upsert("epochs", self._epochs):
            self._epochs = []
        self._last_flush = time.monotonic()

    def _write_trial(self, trial: Any, status: str, error: str | None = None) -> None:
        """After the epochs so far, the row of a stability search or an evaluation as it starts, ends or fails."""
        self.flush()
        # HPO rows are per seed: on_trial_result and on_trial_error write them
        result = trial.last_result or {}
        if status == "done" and result.get("error"):  # a trial that ended on a deterministic failure
            status, error = "failed", result["error"]
        if self.kind == "stability":
            self._upsert("trials", [stability_trial_row(trial.trial_id, trial.config, result, status, self.grid_keys,
                                                        error, trial.num_failures)])
        elif self.kind == "evaluate":
            self._upsert("evaluations", [eval_row(trial.config["spec"], self.eval_config, result, status, error,
                                                  trial.trial_id)])

    # -- Tune hooks ------------------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._write_trial(trial, "running")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        cfg = trial.config
        if self.kind == "stability":
            self._epochs.append(epoch_row(trial.trial_id, search_group(cfg["search"], self.grid_keys), cfg["seed"],
                                          result))
        elif self.kind == "hpo":
            seed = result.get("seed")
            group = hpo_group(cfg["search"], cfg["params"])
            self._epochs.append(epoch_row(f"{trial.trial_id}-s{seed}", group, seed, result))
            if result.get("seed_done"):
                self.flush()
                self._upsert("trials", [hpo_seed_row(trial.trial_id, cfg, result, "done")])

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self._epochs and time.monotonic() - self._last_flush > self.FLUSH_EVERY_S:
            self.flush()
        if time.monotonic() - self._last_beat > LOCK_HEARTBEAT_S:
            self._last_beat = time.monotonic()
            heartbeat(self.store)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._write_trial(trial, "done")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if self.kind != "hpo":
            return self._write_trial(trial, "failed", error_line(trial))
        self.flush()
        result = trial.last_result or {}
        if result.get("seed_done"):  # it failed after that seed: the next one is the failed search
            seeds = list(trial.config["seeds"])
            nxt = seeds.index(result["seed"]) + 1 if result.get("seed") in seeds else 0
            result = {"seed": seeds[min(nxt, len(seeds) - 1)]}
        self._upsert("trials", [hpo_seed_row(trial.trial_id, trial.config, result, "failed", error_line(trial))])

    def get_state(self) -> dict | None:
        self.flush()  # before Tune records checkpoints that resumed trials will start from (no state of its own)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.flush()


# -- the end of an experiment ----------------------------------------------------------------------------------
def reconcile_stability(store: ResultStore, grid: Any, grid_keys: Sequence[str]) -> dict[str, int]:
    """Upsert every trial's final row from the ``ResultGrid`` (rows a killed driver never wrote); counts by status."""
    stored = store.read("trials")  # the driver's count of failures survives the final pass
    failures = (dict(zip(stored["trial_id"].to_pylist(), stored["num_failures"].to_pylist()))
                if "num_failures" in stored.column_names else {})
    rows, unstarted = [], 0
    for result in grid:
        config, metrics = dict(result.config or {}), dict(result.metrics or {})
        if "search" not in config:  # never started before an interruption: its row comes on resume
            unstarted += 1
            continue
        trial_id = str(metrics.get("trial_id") or os.path.basename(str(result.path).rstrip("/")))
        error = (last_error_line(str(result.error)) if result.error is not None else None) or metrics.get("error")
        status = "failed" if error else ("done" if metrics.get("search_done") else "running")
        rows.append(stability_trial_row(trial_id, config, metrics, status, grid_keys, error, failures.get(trial_id)))
    store.upsert("trials", rows)  # nothing when there are no rows
    return Counter(row["status"] for row in rows) + Counter(running=unstarted)


def finish(store: ResultStore, counts: Mapping[str, int], what: str = "search(es)") -> int:
    """The end of every experiment command: compact the records (one file per kind), recompute the stability
    table, say what failed and where its errors are, and return the exit status (0, 3 failed, 130 unfinished)."""
    from .report import publish  # the HTML report of the experiment; its path is printed

    for kind in ("trials", "epochs", "evaluations"):
        store.compact(kind)
    if store.read("trials").num_rows:
        store.write_table("stability", render_stability(store))
    else:
        console().print(f"no search results in {store.root} yet")
    publish(store)
    failed, unfinished = counts.get("failed", 0), counts.get("running", 0)
    if failed:
        where = store.uri("evaluations" if what.startswith("evaluation") else "trials")
        console().print(f"[yellow]{failed} {what} failed; their errors are in {where} (column error)[/]")
    if unfinished:
        console().print("[yellow]interrupted: run the same command again to resume[/]")
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else EXIT_OK


def render_stability(store: ResultStore) -> Any:
    """Print the experiment's stability table (its legend, its groups' reference levels, the command that retrains
    while nothing is) and its baselines; returns the table."""
    from .stability import references, render_table, stability_table

    trials, epochs = store.read("trials"), store.read("epochs")
    table = stability_table(trials, epochs, store.read("evaluations"))
    render_table(table, console(), title=f"Search stability per group: {store.name}",
                 refs=list(references(trials, epochs).values()),
                 evaluate_hint=f"python -m orchestrator.evaluate --from {store.uri()}")
    render_baselines(store)
    return table


def render_baselines(store: ResultStore) -> None:
    """Print the evaluated accuracy of the baselines (random cells, published genotypes), when there are any."""
    from rich.table import Column, Table

    per = {label: v for (kind, label), v in retrained(store.read("evaluations")).items() if kind == "baseline"}
    if per:
        table = Table("source", *(Column(c, justify="right") for c in ("evaluations", "test acc mean ± std", "best")),
                      title="Baselines under the same evaluation protocol")
        for label, values in sorted(per.items()):
            std = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
            table.add_row(label, str(len(values)), f"{sum(values) / len(values):.4f}{std}", f"{max(values):.4f}")
        console().print(table)
