"""``python -m orchestrator.sweep``: stability sweeps and multi-objective HPO of DARTS-family searches on Ray Tune.

- ``stability [--config FILE | --preset NAME] [--storage PATH_OR_URI] [--name NAME] [--address auto|ray://...]
  [--set key=value ...] [--evaluate]``: the preset's grid of search configurations x its seeds, one Tune trial per
  search (``orchestrator.trainable.search_trainable``), run concurrently under ``tune.with_resources``; the
  results go to Parquet under ``<storage>/<name>/`` as they arrive, then the stability table is printed.
- ``hpo [same options]``: Optuna (``OptunaSearch``, a persistent sqlite study) over the preset's ``hpo.space``;
  every Optuna trial runs one search per ``hpo.seeds`` and is scored on two objectives, the mean val_acc
  (maximized) and the mean pairwise genotype distance between its seeds (minimized). ASHA (one scalar metric
  only, so on the running mean val_acc per completed seed) may stop hopeless configurations after
  ``hpo.grace_period`` seeds.
- ``status EXPERIMENT`` / ``summary EXPERIMENT [--storage ...]``: the stability table of a finished or running
  experiment from its Parquet files (or, before any, from Tune's experiment state); ``status`` adds one line per
  trial.

Running the same command again resumes: ``Tuner.restore(..., resume_errored=True)`` continues unfinished trials
from their last epoch checkpoint, reruns none that finished, and gives failed ones another try. Every config key
is validated before Ray starts; bad input is one ``error: ...`` line and exit status 2; an interrupted run exits
with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import time
from typing import Any, Iterable, Mapping, NoReturn, Sequence

from ray.tune import Callback

from .cli import fail, run_cli
from .presets import Preset, check_data, check_resources, load_preset
from .progress import TuneProgress, console, error_line, stop_all
from .results import ResultStore, config_columns, group_key, trial_row

DEFAULT_CONFIG = "stability"
DEFAULT_STORAGE_ENV = "PCDARTS_STORAGE"
DEFAULT_STORAGE = "results"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$")
SWEEP_FILE = "sweep.json"
TUNE_DIRS = {"stability": "search", "hpo": "hpo"}
#: result keys Tune adds itself; never copied into the Parquet files
TUNE_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
             "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
             "iterations_since_restore", "experiment_tag", "should_checkpoint"}
EPOCH_COLUMNS = ("epoch", "train_acc", "train_loss", "val_acc", "val_loss", "lr", "alphas_normal", "alphas_reduce",
                 "betas_normal", "betas_reduce", "genotype", "arch_entropy", "n_skip_normal")
#: result keys of the loops that are not per-epoch columns of their own
NOT_EPOCH_EXTRAS = {"search_done", "final_genotype", "epochs_total", "seed", "seed_done", "seed_index",
                    "seeds_done", "eval_id", "source", "hpo_epochs_done"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


# -- where things go ---------------------------------------------------------------------------------------------
def resolve_storage(storage: str | None) -> str:
    """``--storage``, else ``$PCDARTS_STORAGE``, else ``./results``; local paths made absolute."""
    storage = storage or os.environ.get(DEFAULT_STORAGE_ENV) or DEFAULT_STORAGE
    if "://" in storage:
        return storage.rstrip("/")
    return os.path.abspath(os.path.expanduser(storage))


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"--name {name!r} must be letters, digits and ._=+- (no slashes), at most 200 characters")
    return name


def experiment_uri(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def split_experiment(experiment: str, storage: str | None) -> tuple[str, str]:
    """``EXPERIMENT`` as (storage, name): a name under ``--storage``, or a path/URI of the experiment folder."""
    if "/" in experiment or "://" in experiment:
        path = experiment.rstrip("/")
        if "://" not in path:
            path = os.path.abspath(os.path.expanduser(path))
        parent, _, name = path.rpartition("/")
        return parent, check_name(name)
    return resolve_storage(storage), check_name(experiment)


def _read_text(store: ResultStore, filename: str) -> str | None:
    import pyarrow.fs as pafs

    path = f"{store.root}/{filename}"
    if store.fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with store.fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def _write_text(store: ResultStore, filename: str, text: str) -> None:
    store.fs.create_dir(store.root, recursive=True)
    with store.fs.open_output_stream(f"{store.root}/{filename}") as f:
        f.write(text.encode("utf-8"))


def claim_experiment(store: ResultStore, kind: str, settings: Mapping[str, Any],
                     preset: Mapping[str, Any] | None = None) -> None:
    """Record what this experiment is (``sweep.json``: its kind, the settings that define its trials and the
    whole preset, which ``orchestrator.evaluate`` reuses); refuse to resume one started with other settings."""
    record = {"kind": kind, "settings": settings, "preset": dict(preset or {})}
    text = json.dumps(record, sort_keys=True, default=str, indent=1)
    old = _read_text(store, SWEEP_FILE)
    if old is not None:
        try:
            previous = json.loads(old)
        except ValueError:
            previous = None
        if not isinstance(previous, dict):
            raise ValueError(f"{store.root}/{SWEEP_FILE} is not a sweep record of this project")
        if previous.get("kind") != kind:
            raise ValueError(f"experiment {store.name!r} is a {previous.get('kind')} run, not {kind}; "
                             f"use --name for a new experiment")
        before = json.loads(json.dumps(previous.get("settings"), sort_keys=True, default=str))
        now = json.loads(json.dumps(settings, sort_keys=True, default=str))
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ValueError(f"experiment {store.name!r} in {store.storage} was started with different settings "
                             f"({', '.join(changed)} differ); rerun it unchanged to resume, or pick another --name")
        return
    _write_text(store, SWEEP_FILE, text)


def read_claim(store: ResultStore) -> dict[str, Any] | None:
    text = _read_text(store, SWEEP_FILE)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


# -- Ray -----------------------------------------------------------------------------------------------------------
def machine_cpus() -> int:
    """CPUs this process may use: the affinity mask, further limited by a cgroup CPU quota when there is one."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        count = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="utf-8") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def local_resources() -> dict[str, float]:
    """What a local Ray started by this process would have (checked before Ray starts)."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        gpus = 0
    return {"CPU": float(machine_cpus()), "GPU": float(gpus)}


def cluster_address(address: str | None) -> str | None:
    """``--address``, else ``$RAY_ADDRESS`` (set by ``ray job submit`` on a cluster), else None: start Ray here."""
    return address or os.environ.get("RAY_ADDRESS") or None


def hook_env() -> dict[str, str]:
    """The testing-hook variables (see ``orchestrator.trainable``) to forward to the Ray job's workers."""
    from .trainable import TEST_HOOK_ENV

    return {k: os.environ[k] for k in TEST_HOOK_ENV if os.environ.get(k)}


def connect(address: str | None, verbose: bool = False) -> dict[str, float]:
    """Join the cluster at ``address`` (``auto``, ``ray://host:10001``, ``host:6379``), or start a local Ray sized
    to this machine; reuse the connection when this process already has one. Returns the cluster's resources."""
    import ray

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else
                                  logging.WARNING, "runtime_env": {"env_vars": hook_env()}}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ctx = ray.init(num_cpus=machine_cpus(), **kwargs)
            url = getattr(ctx, "dashboard_url", None)
            if url:
                console().print(f"Ray dashboard: http://{url}")
    try:  # an autoscaling cluster may grow: its configured maximum is what a trial must fit in
        from .distributed import cluster_capacity

        return cluster_capacity()
    except ImportError:  # pragma: no cover
        return {k: float(v) for k, v in ray.cluster_resources().items()}


def preflight(preset: Preset, address: str | None, per_trial: Iterable[Mapping[str, float]]) -> None:
    """Before Ray starts: the data is there and one trial fits this machine (when Ray will run here)."""
    if not (address or "").startswith("ray://"):
        check_data(preset)
    if not address:
        available = local_resources()
        for res in per_trial:
            check_resources(res, available)


def tune_resources(res: Mapping[str, float]) -> dict[str, float]:
    return {"cpu": float(res.get("cpu", 1)), "gpu": float(res.get("gpu", 0))}


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (Tune's default puts the whole config in them)."""
    return str(trial.trial_id)


#: Trials reuse the actor process of a finished trial with the same resources (``TuneConfig(reuse_actors=True)``):
#: no new worker process and imports per trial. bench/orchestration.py measured Tune's per-trial overhead at
#: 5.3 s without and 1.3 s with it on 2 CPUs (smoke searches). Every trial seeds all RNGs and sets its torch
#: threads itself.
REUSE_ACTORS = True


def run_tuner(trainable: Any, path: str, make_tuner: Any, verbose: bool = False) -> Any:
    """``Tuner.restore(path, resume_errored=True)`` when ``path`` holds a Tune experiment, else ``make_tuner()``;
    then ``fit()``. Live displays are stopped however ``fit`` ends. Unless ``verbose``, Tune's own output is off
    (its new output engine prints a header even at ``verbose=0``; the legacy one is silent there)."""
    from ray import tune

    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        # Tune logs every trial failure with its traceback; the progress display prints one line instead and
        # the errors are kept in the Parquet files and the trials' error.txt.
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)

    try:
        if tune.Tuner.can_restore(path):
            console().print(f"resuming the Tune experiment at {path}")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        else:
            tuner = make_tuner()
        return tuner.fit()
    finally:
        stop_all()


# -- rows ------------------------------------------------------------------------------------------------------------
def _num(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def search_group(search: Mapping[str, Any], grid_keys: Sequence[str]) -> str:
    """A search's group: its method and the values of the grid's keys (``method=pcdarts,k=4``)."""
    values = {"method": search.get("method", "pcdarts")}
    values.update({k: search.get(k) for k in grid_keys})
    return group_key(values)


def _sig(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float) and value != 0 and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    return value


def hpo_group(search: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """An HPO configuration's group: its method and sampled values (4 significant digits)."""
    values = {"method": search.get("method", "pcdarts")}
    values.update({k: _sig(v) for k, v in params.items()})
    return group_key(values)


def epoch_row(trial_id: str, group: str, seed: Any, result: Mapping[str, Any]) -> dict[str, Any]:
    """An ``epochs`` row from one reported search epoch: the known columns, then any other numeric metric."""
    row: dict[str, Any] = {"trial_id": trial_id, "group": group, "seed": seed}
    for key in EPOCH_COLUMNS:
        row[key] = _num(result.get(key))
    row["wall_time_s"] = _num(result.get("time_total_s"))
    for key, value in result.items():
        if key in row or key in TUNE_KEYS or key in NOT_EPOCH_EXTRAS:
            continue
        if isinstance(value, bool) or isinstance(value, (int, float)):
            row[key] = _num(value)
    return row


def search_trial_fields(result: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "val_acc": _num(result.get("val_acc")), "train_acc": _num(result.get("train_acc")),
        "val_loss": _num(result.get("val_loss")), "train_loss": _num(result.get("train_loss")),
        "genotype": result.get("final_genotype") or result.get("genotype"),
        "epochs_done": result.get("epoch"), "arch_entropy": _num(result.get("arch_entropy")),
        "n_skip_normal": result.get("n_skip_normal"),
    }


def stability_trial_row(trial_id: str, config: Mapping[str, Any], result: Mapping[str, Any] | None, status: str,
                        grid_keys: Sequence[str], error: str | None = None,
                        failures: int | None = None) -> dict[str, Any]:
    """A ``trials`` row of one search of a stability sweep (config columns: the preset's settings and seed)."""
    result = result or {}
    values = {**config["search"], "seed": config["seed"]}
    fields = search_trial_fields(result)
    return trial_row(trial_id, values, status, group=search_group(config["search"], grid_keys), error=error,
                     wall_time_s=_num(result.get("time_total_s")), num_failures=failures, **fields)


def hpo_seed_row(tune_id: str, config: Mapping[str, Any], result: Mapping[str, Any], status: str,
                 error: str | None = None) -> dict[str, Any]:
    """A ``trials`` row of one seed of an HPO configuration (``trial_id`` = ``<tune trial>-s<seed>``)."""
    seed = result.get("seed", config["seeds"][0])
    values = {**config["search"], **config["params"], "seed": seed}
    fields = search_trial_fields(result)
    return trial_row(f"{tune_id}-s{seed}", values, status, group=hpo_group(config["search"], config["params"]),
                     error=error, wall_time_s=_num(result.get("seed_wall_time_s")), hpo_trial=tune_id, **fields)


def eval_row(spec: Mapping[str, Any], eval_cfg: Mapping[str, Any], result: Mapping[str, Any] | None, status: str,
             error: str | None = None, tune_id: str | None = None) -> dict[str, Any]:
    """An ``evaluations`` row: one genotype trained from scratch with one seed under one protocol."""
    result = result or {}
    row = {"eval_id": spec["eval_id"], "source": spec["source"], "genotype": spec["genotype"],
           "seed": int(spec["seed"]), "status": status, "test_acc": _num(result.get("test_acc")),
           "params": result.get("params"), "epochs_done": result.get("epoch"), "error": error,
           "wall_time_s": _num(result.get("time_total_s")), "group": spec.get("group"),
           "train_acc": _num(result.get("train_acc")), "test_loss": _num(result.get("test_loss")),
           "protocol": spec.get("protocol"), "tune_trial_id": tune_id}
    row.update(config_columns({k: v for k, v in eval_cfg.items() if k != "seed"}))
    return row


# -- the driver callback that writes the Parquet files -----------------------------------------------------------
class ParquetResults(Callback):
    """Writes trials/epochs/evaluations rows as results arrive (upserts: a resumed sweep never duplicates).

    ``kind``: 'stability' (one trial = one search), 'hpo' (one trial = one configuration over seeds; rows per
    seed) or 'evaluate' (one trial = one retraining). Epoch rows are buffered and flushed every few
    seconds, when a trial ends, and before Tune saves its experiment state (``get_state``), so every epoch
    that a resumed trial will not repeat is on disk first. Holds plain settings only (Tune pickles it).
    """

    FLUSH_EVERY_S = 5.0

    def __init__(self, storage: str, name: str, kind: str, grid_keys: Sequence[str] = (),
                 eval_config: Mapping[str, Any] | None = None):
        self.storage, self.name, self.kind = storage, name, kind
        self.grid_keys = list(grid_keys)
        self.eval_config = dict(eval_config or {})
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._store: ResultStore | None = None
        self._epochs: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("storage", "name", "kind", "grid_keys", "eval_config")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    @property
    def store(self) -> ResultStore:
        if self._store is None:
            self._store = ResultStore(self.storage, self.name)
        return self._store

    # -- writing ---------------------------------------------------------------------------------------
    def _upsert(self, kind: str, rows: list[dict[str, Any]]) -> bool:
        if not rows:
            return True
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

    def _trial_row(self, trial: Any, status: str, error: str | None = None) -> dict[str, Any] | None:
        result = trial.last_result or {}
        if self.kind == "stability":
            return stability_trial_row(trial.trial_id, trial.config, result, status, self.grid_keys, error,
                                       trial.num_failures)
        if self.kind == "evaluate":
            return eval_row(trial.config["spec"], self.eval_config, result, status, error, trial.trial_id)
        return None

    # -- Tune hooks ------------------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        row = self._trial_row(trial, "running")
        if row is not None:
            self._upsert("evaluations" if self.kind == "evaluate" else "trials", [row])

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        if self.kind == "stability":
            group = search_group(trial.config["search"], self.grid_keys)
            self._epochs.append(epoch_row(trial.trial_id, group, trial.config["seed"], result))
        elif self.kind == "hpo":
            cfg = trial.config
            seed = result.get("seed")
            group = hpo_group(cfg["search"], cfg["params"])
            self._epochs.append(epoch_row(f"{trial.trial_id}-s{seed}", group, seed, result))
            if result.get("seed_done"):
                self.flush()
                self._upsert("trials", [hpo_seed_row(trial.trial_id, cfg, result, "done")])

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self._epochs and time.monotonic() - self._last_flush > self.FLUSH_EVERY_S:
            self.flush()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.flush()
        row = self._trial_row(trial, "done")
        if row is not None:
            self._upsert("evaluations" if self.kind == "evaluate" else "trials", [row])

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.flush()
        error = error_line(trial)
        if self.kind == "hpo":
            result = trial.last_result or {}
            if result.get("seed_done"):  # it failed after that seed: the next one is the failed search
                seeds = list(trial.config["seeds"])
                nxt = seeds.index(result["seed"]) + 1 if result.get("seed") in seeds else 0
                result = {"seed": seeds[min(nxt, len(seeds) - 1)]}
            self._upsert("trials", [hpo_seed_row(trial.trial_id, trial.config, result, "failed", error)])
            return
        row = self._trial_row(trial, "failed", error)
        if row is not None:
            self._upsert("evaluations" if self.kind == "evaluate" else "trials", [row])

    def get_state(self) -> dict | None:
        self.flush()  # before Tune records checkpoints that resumed trials will start from
        return None

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.flush()


# -- reconciling with what Tune knows ----------------------------------------------------------------------------
def _results_of(grid: Any) -> list[tuple[str, dict[str, Any], dict[str, Any], str | None]]:
    """(trial_id, config, last metrics, error line) of every trial of a ``ResultGrid``."""
    from .progress import last_error_line

    out = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or os.path.basename(str(result.path).rstrip("/"))
        error = last_error_line(str(result.error)) if result.error is not None else None
        out.append((str(trial_id), dict(result.config or {}), metrics, error))
    return out


def reconcile_stability(store: ResultStore, grid: Any, grid_keys: Sequence[str]) -> dict[str, int]:
    """Upsert every trial's final row from the ``ResultGrid`` (rows a killed driver never wrote); counts by status."""
    rows = []
    counts: dict[str, int] = {}
    for trial_id, config, metrics, error in _results_of(grid):
        if "search" not in config:  # never started before an interruption: its row comes on resume
            counts["running"] = counts.get("running", 0) + 1
            continue
        status = "failed" if error else ("done" if metrics.get("search_done") else "running")
        rows.append(stability_trial_row(trial_id, config, metrics, status, grid_keys, error))
    if rows:
        stored = store.read("trials")
        existing = ({r["trial_id"]: r for r in stored.select(["trial_id", "num_failures"]).to_pylist()}
                    if "num_failures" in stored.column_names else {})
        for row in rows:
            if row.get("num_failures") is None and row["trial_id"] in existing:
                row["num_failures"] = existing[row["trial_id"]].get("num_failures")
        store.upsert("trials", rows)
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


# -- the stability table -----------------------------------------------------------------------------------------
def write_stability(store: ResultStore, show: bool = True) -> Any:
    """Recompute ``stability.parquet`` from the other three files; print it (and the baselines) when ``show``."""
    from .stability import render_table, stability_table

    trials = store.read("trials")
    if trials.num_rows == 0:
        if show:
            console().print(f"no search results in {store.root} yet")
        return None
    table = stability_table(trials, store.read("epochs"), store.read("evaluations"))
    store.write_table("stability", table)
    if show:
        render_table(table, console(), title=f"Search stability per group: {store.name}")
        render_baselines(store)
    return table


def baseline_rows(evaluations: Any) -> list[dict[str, Any]]:
    """Evaluated accuracy per source kind that is not a group's own (random cells, published, named cells)."""
    from .results import parse_source

    if evaluations is None or evaluations.num_rows == 0:
        return []
    per: dict[str, list[float]] = {}
    for row in evaluations.select(["source", "status", "test_acc"]).to_pylist():
        if row["status"] != "done" or row["test_acc"] is None:
            continue
        try:
            kind, value = parse_source(row["source"])
        except ValueError:
            continue
        if kind in ("random", "published"):
            label = "random DARTS-space cells" if kind == "random" else f"published {value}"
            per.setdefault(label, []).append(float(row["test_acc"]))
    out = []
    for label, values in sorted(per.items()):
        n = len(values)
        mean = sum(values) / n
        std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else None
        out.append({"source": label, "n": n, "mean": mean, "std": std, "best": max(values)})
    return out


def render_baselines(store: ResultStore) -> None:
    rows = baseline_rows(store.read("evaluations"))
    if not rows:
        return
    from rich.table import Table

    table = Table(title="Baselines under the same evaluation protocol", show_lines=False)
    for col in ("source", "evaluations", "test acc mean ± std", "best"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for r in rows:
        acc = f"{r['mean']:.4f}" + (f" ± {r['std']:.4f}" if r["std"] is not None else "")
        table.add_row(r["source"], str(r["n"]), acc, f"{r['best']:.4f}")
    console().print(table)


# -- stability ---------------------------------------------------------------------------------------------------
def _abs_data_dir(values: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(values)
    if out.get("data_dir") is not None and "://" not in str(out["data_dir"]):
        out["data_dir"] = os.path.abspath(os.path.expanduser(str(out["data_dir"])))
    return out


def stability_settings(preset: Preset) -> dict[str, Any]:
    """What defines a stability sweep's trials (a resumed sweep must match): its groups and seeds."""
    return {"groups": [_abs_data_dir(g) for g in preset.groups()], "group_keys": preset.group_keys(),
            "seeds": list(preset.seeds), "distributed": dict(preset.distributed)}


def distributed_trials(preset: Preset) -> tuple[Any, Any] | None:
    """(options, trainable) when the preset's ``distributed:`` section makes every search a data-parallel Ray
    Train run inside its Tune trial (``orchestrator.distributed.distributed_search_trial``), else None."""
    if not preset.distributed:
        return None
    try:
        from .distributed import DistributedOptions, distributed_search_trial
    except ImportError:  # pragma: no cover - the module ships with the project
        raise ValueError("the preset has a distributed: section but orchestrator.distributed is missing") from None
    return DistributedOptions.from_mapping(preset.distributed), distributed_search_trial


def total_epochs(preset: Preset) -> int:
    return sum(int(preset.search_config(group, seed=preset.seeds[0]).epochs) for group in preset.groups()) \
        * len(preset.seeds)


def _run_config(kind: str, exp: str, callbacks: list, failure: Any, verbose: bool) -> Any:
    """Tune's RunConfig shared by stability sweeps and HPO: storage, retries from checkpoints, kept checkpoints."""
    from ray import tune

    return tune.RunConfig(
        name=TUNE_DIRS[kind], storage_path=exp, callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=failure.max_failures, fail_fast=failure.fail_fast),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=failure.checkpoints_to_keep),
        verbose=1 if verbose else 0)


def run_stability(preset: Preset, storage: str, name: str, address: str | None, evaluate: bool = False,
                  verbose: bool = False) -> int:
    from ray import tune

    from .trainable import search_trainable

    failure = preset.failure_spec()
    evaluation = preset.evaluation() if (evaluate or preset.evaluate) else None
    per_trial = [preset.resources] + ([evaluation.resources] if evaluation and (evaluate or
                                                                               evaluation.after_sweep) else [])
    dist = distributed_trials(preset)
    preflight(preset, address, per_trial)
    store = ResultStore(storage, name)
    claim_experiment(store, "stability", stability_settings(preset), preset.raw)
    available = connect(address, verbose)
    for res in per_trial:
        check_resources(res, available)
    if dist is not None:
        from .distributed import check_resources as check_workers, cluster_capacity

        check_workers(dist[0], cluster_capacity())

    exp = experiment_uri(storage, name)
    path = f"{exp}/{TUNE_DIRS['stability']}"
    grid_keys = preset.group_keys()
    n_trials = len(preset.groups()) * len(preset.seeds)
    trainable = tune.with_resources(dist[1] if dist else search_trainable, tune_resources(preset.resources))
    extra_space = {"distributed": dict(preset.distributed)} if dist else {}
    console().print(f"[bold]{name}[/]: {len(preset.groups())} configuration(s) x {len(preset.seeds)} seed(s) = "
                    f"{n_trials} searches" + (f", each on {dist[0].num_workers} Ray Train worker(s)" if dist else "")
                    + f"; results in {exp}")

    def make_tuner() -> Any:
        callbacks = [ParquetResults(storage, name, "stability", grid_keys),
                     TuneProgress("search", n_trials, total_epochs(preset))]
        return tune.Tuner(
            trainable,
            param_space={"search": tune.grid_search([_abs_data_dir(g) for g in preset.groups()]),
                         "seed": tune.grid_search(list(preset.seeds)), **extra_space},
            tune_config=tune.TuneConfig(max_concurrent_trials=preset.max_concurrent_trials or None,
                                        trial_dirname_creator=trial_dirname, reuse_actors=REUSE_ACTORS),
            run_config=_run_config("stability", exp, callbacks, failure, verbose))

    start = time.perf_counter()
    grid = run_tuner(trainable, path, make_tuner, verbose)
    counts = reconcile_stability(store, grid, grid_keys)
    elapsed = time.perf_counter() - start
    console().print(f"searches: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
                    f"{counts.get('running', 0)} unfinished; {elapsed:.0f} s")
    interrupted = counts.get("running", 0) > 0
    if not interrupted and evaluation is not None and (evaluate or evaluation.after_sweep):
        from .evaluate import EvaluateRequest, run_evaluations

        run_evaluations(preset, store, EvaluateRequest.from_spec(evaluation), address, show=False)
    write_stability(store)
    from .report import publish
    publish(store)
    if counts.get("failed"):
        console().print(f"[yellow]{counts['failed']} search(es) failed; their errors are in "
                        f"{store.uri('trials')} (column error)[/]")
    if interrupted:
        console().print("[yellow]interrupted: run the same command again to resume[/]")
        return 130
    return 0


# -- hpo -----------------------------------------------------------------------------------------------------------
def _optuna_search_class() -> type:
    from ray.tune.search.optuna import OptunaSearch

    from .trainable import OBJECTIVE_ACC, OBJECTIVE_DISTANCE

    class MultiObjectiveOptuna(OptunaSearch):
        """OptunaSearch that records a trial stopped before its last seed (no objectives) as pruned; Ray 2.60's
        own would pass ``[None, None]`` to ``study.tell`` as a completed trial, which Optuna refuses."""

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
    return f"sqlite:///{experiment_uri(storage, name)}/optuna.db"


def run_hpo(preset: Preset, storage: str, name: str, address: str | None, verbose: bool = False) -> int:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from .trainable import HPO_PROGRESS, HPO_RUNNING_ACC, OBJECTIVE_ACC, OBJECTIVE_DISTANCE, hpo_trainable

    spec = preset.hpo_spec()
    failure = preset.failure_spec()
    preflight(preset, address, [spec.resources])
    store = ResultStore(storage, name)
    url = study_url(spec, storage, name)
    settings = {"search": _abs_data_dir(preset.search), "hpo": dict(preset.hpo)}
    claim_experiment(store, "hpo", settings, preset.raw)
    available = connect(address, verbose)
    check_resources(spec.resources, available)
    # The objectives arrive with a configuration's last seed only; earlier results carry the ASHA metric.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"

    exp = experiment_uri(storage, name)
    path = f"{exp}/{TUNE_DIRS['hpo']}"
    trainable = tune.with_resources(hpo_trainable, tune_resources(spec.resources))
    epochs = int(preset.search_config(seed=0).epochs)
    console().print(f"[bold]{name}[/]: Optuna ({spec.sampler}, 2 objectives: {OBJECTIVE_ACC} max, "
                    f"{OBJECTIVE_DISTANCE} min) x {spec.num_samples} configurations x {len(spec.seeds)} seeds; "
                    f"study {url}")

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def make_tuner() -> Any:
        if url.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(url[len("sqlite:///"):]), exist_ok=True)
        study_storage = optuna.storages.RDBStorage(url)
        sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=spec.seed),
                   "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=spec.seed),
                   "random": lambda: optuna.samplers.RandomSampler(seed=spec.seed)}[spec.sampler]()
        searcher = _optuna_search_class()(metric=[OBJECTIVE_ACC, OBJECTIVE_DISTANCE], mode=["max", "min"],
                                          sampler=sampler, study_name=name, storage=study_storage)
        per_trial_cpu = max(float(spec.resources.get("cpu", 1)), 1e-9)
        limit = spec.max_concurrent_trials or max(1, int(available.get("CPU", 1) // per_trial_cpu))
        if spec.scheduler == "asha":
            scheduler: Any = ASHAScheduler(time_attr=HPO_PROGRESS, metric=HPO_RUNNING_ACC, mode="max",
                                           max_t=len(spec.seeds), grace_period=spec.grace_period,
                                           reduction_factor=spec.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        callbacks = [ParquetResults(storage, name, "hpo"),
                     TuneProgress("hpo", spec.num_samples, spec.num_samples * len(spec.seeds) * epochs,
                                  metric=OBJECTIVE_ACC, epoch_key="hpo_epochs_done")]
        return tune.Tuner(
            trainable,
            param_space={"search": _abs_data_dir(preset.search), "seeds": list(spec.seeds),
                         "params": {p.name: p.tune_domain() for p in spec.space}},
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=limit),
                                        scheduler=scheduler, num_samples=spec.num_samples,
                                        trial_dirname_creator=trial_dirname, reuse_actors=REUSE_ACTORS),
            run_config=_run_config("hpo", exp, callbacks, failure, verbose))

    start = time.perf_counter()
    grid = run_tuner(trainable, path, make_tuner, verbose)
    results = _results_of(grid)
    unfinished = sum(1 for _, _, m, err in results if err is None and not m.get("done"))
    unfinished += max(0, spec.num_samples - len(results))  # never created before an interruption
    console().print(f"hpo: {len(results)} configurations in {time.perf_counter() - start:.0f} s")
    write_stability(store)
    render_pareto(url, name)
    from .report import publish
    publish(store)
    if unfinished:
        console().print("[yellow]interrupted: run the same command again to resume[/]")
        return 130
    return 0


def render_pareto(url: str, name: str) -> None:
    """The Optuna study's trials and its Pareto front (both objectives)."""
    import optuna
    from rich.table import Table

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        return
    front = {t.number for t in study.best_trials}
    table = Table(title=f"Optuna study {name!r}: {len(study.trials)} trials (* = Pareto front)")
    names = sorted({k for t in study.trials for k in t.params})
    for col in ["#", "state", *[n.split("/")[-1] for n in names], "val acc mean", "genotype dist"]:
        table.add_column(col, justify="right")
    for t in study.trials:
        values = t.values or [None, None]
        cells = [f"{t.number}{'*' if t.number in front else ''}", t.state.name.lower()]
        cells += [f"{t.params[n]:.4g}" if isinstance(t.params.get(n), float) else str(t.params.get(n, "-"))
                  for n in names]
        cells += ["-" if v is None else f"{v:.4f}" for v in values]
        table.add_row(*cells)
    console().print(table)


# -- status / summary ----------------------------------------------------------------------------------------------
def status_from_tune(storage: str, name: str) -> Any:
    """Trials rows built from Tune's experiment state (a run that has not written Parquet yet)."""
    from ray.tune import ExperimentAnalysis

    store = ResultStore(storage, name)
    claim = read_claim(store) or {}
    kind = claim.get("kind", "stability")
    path = f"{experiment_uri(storage, name)}/{TUNE_DIRS.get(kind, 'search')}"
    try:
        analysis = ExperimentAnalysis(path)
    except Exception:  # noqa: BLE001 - nothing there (yet)
        return []
    grid_keys = list((claim.get("settings") or {}).get("group_keys", []))
    rows = []
    for trial in analysis.trials:
        status = {"TERMINATED": "done", "ERROR": "failed"}.get(trial.status, "running")
        if kind == "stability":
            rows.append(stability_trial_row(trial.trial_id, trial.config, trial.last_result, status, grid_keys))
    return rows


def show_status(storage: str, name: str, per_trial: bool) -> int:
    from rich.table import Table

    from .results import to_table
    from .stability import render_table, stability_table

    store = ResultStore(storage, name)
    claim = read_claim(store)
    if claim is None and not store.exists("trials"):
        raise ValueError(f"no experiment {name!r} in {storage}")
    trials = store.read("trials")
    source = "Parquet"
    if trials.num_rows == 0:
        rows = status_from_tune(storage, name)
        if not rows:
            console().print(f"{name}: no trial has reported yet")
            return 0
        trials = to_table("trials", rows)
        source = "Tune experiment state"
    statuses = trials.column("status").to_pylist()
    counts = {s: statuses.count(s) for s in ("done", "running", "failed")}
    console().print(f"[bold]{name}[/] ({(claim or {}).get('kind', '?')}, from {source}): {counts['done']} done, "
                    f"{counts['running']} running, {counts['failed']} failed")
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
    table = stability_table(trials, store.read("epochs"), store.read("evaluations"))
    render_table(table, console(), title=f"Search stability per group: {name}")
    render_baselines(store)
    return 0


# -- command line --------------------------------------------------------------------------------------------------
def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"sweep config: a YAML file (default tune_configs/{DEFAULT_CONFIG}.yaml)")
    p.add_argument("--preset", help="a preset name in tune_configs/ (smoke, local, cifar10, ...)")
    p.add_argument("--storage", help=f"results root: a directory or s3://bucket/prefix (default "
                                     f"${DEFAULT_STORAGE_ENV} or ./{DEFAULT_STORAGE})")
    p.add_argument("--name", help="experiment name (default: the preset's name); the same name resumes")
    p.add_argument("--address", help="Ray cluster to join: auto, ray://HEAD:10001 or HEAD:6379 "
                                     "(default: start Ray on this machine)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value: search.k=8 (or k=8), seeds=[0,1], evaluate.epochs=3")
    p.add_argument("--verbose", action="store_true", help="Tune's own progress output and the workers' logs")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m orchestrator.sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    st = sub.add_parser("stability", help="many seeded searches per configuration; the stability table")
    _run_options(st)
    st.add_argument("--evaluate", action="store_true",
                    help="then retrain the found genotypes (the preset's evaluate: section) and a random baseline")
    hpo = sub.add_parser("hpo", help="multi-objective Optuna over search settings (accuracy and stability)")
    _run_options(hpo)
    for cmd in ("status", "summary"):
        p = sub.add_parser(cmd, help="the stability table of an experiment" +
                           (" and its trials" if cmd == "status" else ""))
        p.add_argument("experiment", help="experiment name (under --storage) or its folder")
        p.add_argument("--storage", help=f"results root (default ${DEFAULT_STORAGE_ENV} or ./{DEFAULT_STORAGE})")
    return parser


def resolve_preset(args: argparse.Namespace) -> Preset:
    if args.config and args.preset:
        raise ValueError("give either --config FILE or --preset NAME, not both")
    return load_preset(args.config or args.preset or DEFAULT_CONFIG, args.sets)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("status", "summary"):
        storage, name = split_experiment(args.experiment, args.storage)
        return show_status(storage, name, per_trial=args.command == "status")
    preset = resolve_preset(args)
    storage = resolve_storage(args.storage)
    if args.command == "stability":
        name = check_name(args.name or preset.name)
        return run_stability(preset, storage, name, cluster_address(args.address), evaluate=args.evaluate,
                             verbose=args.verbose)
    name = check_name(args.name or f"{preset.name}-hpo")
    return run_hpo(preset, storage, name, cluster_address(args.address), verbose=args.verbose)


if __name__ == "__main__":
    run_cli(main)
