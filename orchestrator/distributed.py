"""Data-parallel PC-DARTS search on Ray Train (V2), and the one-process search it shares its loop with.

The core (``pcdarts_core.search``) does the data-parallel arithmetic with plain ``torch.distributed``: both levels'
gradients are averaged over ranks in one bucket, BatchNorm statistics are averaged before validation, metrics are
summed, every rank draws the same channel subsets, and each rank reads its own shard through a
``DistributedSampler``. This module supplies everything around it:

- **Global batch.** ``batch_size`` in a config is the *global* batch. Each of N ranks gets ``batch_size // N``
  (:func:`rank_config`), so the run computes the same thing on 1 or 8 workers, and the lr stays the one configured
  for that global batch. When N does not divide the batch (an elastic group that came up smaller), each rank takes
  the floor and the lr is scaled linearly to the batch actually processed.
- **lr scaling.** ``distributed.lr_reference_batch: B0`` in a preset declares that ``lr`` (and ``lr_min``) were tuned
  for a global batch of ``B0``; a run at global batch ``B`` uses ``lr * B / B0`` (Goyal et al.'s linear scaling
  rule). The core's linear warm-up (``lr_warmup_epochs``, 5 on ImageNet) ramps up to that lr.
- **Checkpoints.** Rank 0 reports one checkpoint per epoch through ``ray.train.report``; the other ranks report the
  same metrics without one. A restarted worker group (``FailureConfig(max_failures)``) or a rerun of the same
  command resumes from ``ray.train.get_checkpoint()``. Checkpoints are ``torch.save`` dicts of tensors and plain
  values, read back with ``weights_only=True``.
- **Results.** With ``write_results`` (the CLI), rank 0 upserts each epoch into ``<storage>/<name>/epochs.parquet``,
  the run's one row into ``trials.parquet``, and writes ``genotype.json`` at the end (the core's JSON). Inside a
  sweep (:func:`distributed_search_trial`) nothing is written here: rank 0's metrics go to Tune, and the sweep
  driver, the single writer of its store, records them.
- **Dashboard.** Runs appear in the Train view (``RAY_TRAIN_ENABLE_STATE_TRACKING=1`` is set unless already set:
  Ray 2.60 tracks Train V2 runs only with it) and rank 0 records :mod:`orchestrator.metrics` every epoch.
- **Consistency check.** After every epoch the ranks all-gather a fingerprint of their parameters and buffers
  (every arch parameter in full, per-tensor sums of the rest) and stop with an error if any rank differs from
  rank 0 in a single bit.

Testing hook (never set it in production): ``PCDARTS_KILL_RANK_AT_EPOCH=R:E`` in the environment of the command
that launches a distributed run makes rank ``R`` call ``os._exit(1)`` right after its first optimizer step of epoch
``E`` (1-based, as the ``epoch`` column counts) and a wait of three Ray Train health-check intervals (so the
controller has registered epoch ``E-1``'s checkpoint) — once: it first creates the marker file
``PCDARTS_KILL_MARKER`` (default: a file under the system temp dir named after the run), and does nothing when
that file exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from pcdarts_core.config import SearchConfig, search_config_from_dict
from pcdarts_core.genotypes import Genotype
from pcdarts_core.runtime import CheckpointError, all_reduce_sum, distributed_world, load_checkpoint
from pcdarts_core.search import RESUMABLE_DIFFERENCES, Searcher
from pcdarts_core.spaces import TRIAL_METRIC_PREFIXES

from .metrics import record_epoch
from .results import ResultStore, finite_or_none, group_key, trial_row

CHECKPOINT_FORMAT = "pcdarts-run/1"
#: file names under ``<storage>/<name>/``
CHECKPOINT_FILE = "checkpoint.pt"  # single-process runs (distributed runs use Ray Train's checkpoint_* dirs)
RAY_CHECKPOINT_FILE = "search.pt"  # inside each Ray Train checkpoint directory
CONFIG_FILE = "search_config.json"
GENOTYPE_FILE = "genotype.json"

KILL_ENV = "PCDARTS_KILL_RANK_AT_EPOCH"
KILL_MARKER_ENV = "PCDARTS_KILL_MARKER"

Echo = Callable[[str], None]


class RunFailed(RuntimeError):
    """The search itself failed (after Ray Train's retries): not a usage error."""


# -- options -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistributedOptions:
    """The ``distributed:`` section of a preset (and the CLI flags that override it)."""

    num_workers: int | tuple[int, int] = 1  # an int, or (min, max) for an elastic worker group
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # Ray CPUs per worker; torch uses that many threads
    max_failures: int = 3  # worker-group restarts from the last checkpoint before the run fails
    lr_reference_batch: int | None = None  # lr was tuned for this global batch: scale linearly to batch_size
    checkpoints_to_keep: int = 2

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> "DistributedOptions":
        """Validated options from a preset's section; ``overrides`` that are not None win (CLI flags)."""
        merged = dict(values or {})
        merged.update({k: v for k, v in overrides.items() if v is not None})
        known = [f.name for f in dataclasses.fields(cls)]
        for key in merged:
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                raise ValueError(f"unknown distributed key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                 + f"; known: {', '.join(known)}")
        out: dict[str, Any] = {}
        if "num_workers" in merged:
            out["num_workers"] = parse_num_workers(merged["num_workers"])
        if "use_gpu" in merged:
            out["use_gpu"] = _bool("use_gpu", merged["use_gpu"])
        if "cpus_per_worker" in merged:
            out["cpus_per_worker"] = _number("cpus_per_worker", merged["cpus_per_worker"])
            if not 0 < out["cpus_per_worker"] <= 1024:
                raise ValueError(f"cpus_per_worker must be in (0, 1024], got {merged['cpus_per_worker']}")
        if "max_failures" in merged:
            out["max_failures"] = _int("max_failures", merged["max_failures"])
            if out["max_failures"] < -1:
                raise ValueError("max_failures must be >= 0 (or -1: retry forever)")
        if merged.get("lr_reference_batch") is not None:
            out["lr_reference_batch"] = _int("lr_reference_batch", merged["lr_reference_batch"])
            if out["lr_reference_batch"] < 1:
                raise ValueError("lr_reference_batch must be >= 1")
        if "checkpoints_to_keep" in merged:
            out["checkpoints_to_keep"] = _int("checkpoints_to_keep", merged["checkpoints_to_keep"])
            if out["checkpoints_to_keep"] < 1:
                raise ValueError("checkpoints_to_keep must be >= 1")
        return cls(**out)

    def scaling_config(self) -> Any:
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                             resources_per_worker={"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})})


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def parse_num_workers(value: Any) -> int | tuple[int, int]:
    """``4``, ``"4"``, ``[2, 8]`` or ``"2-8"`` (elastic: at least 2, at most 8 workers)."""
    if isinstance(value, str) and any(sep in value for sep in "-:,"):
        parts = value.replace(":", "-").replace(",", "-").split("-")
        value = [p.strip() for p in parts]
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"num_workers must be N or [MIN, MAX], got {value!r}")
        low, high = _int("num_workers", value[0]), _int("num_workers", value[1])
        if not 1 <= low <= high:
            raise ValueError(f"num_workers range must satisfy 1 <= MIN <= MAX, got {low}-{high}")
        return (low, high) if low != high else low
    n = _int("num_workers", value)
    if n < 1:
        raise ValueError(f"num_workers must be >= 1, got {n}")
    return n


# -- configs: global batch, per-rank batch, lr scaling -------------------------------------------------------------
def global_config(values: Mapping[str, Any], lr_reference_batch: int | None = None) -> SearchConfig:
    """The run's config (``batch_size`` = global batch), with ``lr``/``lr_min`` scaled linearly from
    ``lr_reference_batch`` to ``batch_size`` when one is given."""
    cfg = search_config_from_dict(values)
    if lr_reference_batch:
        scale = cfg.batch_size / lr_reference_batch
        if scale != 1.0:
            cfg = dataclasses.replace(cfg, lr=cfg.lr * scale, lr_min=cfg.lr_min * scale)
    return cfg


def rank_config(cfg: SearchConfig, world_size: int, device: str | None = None) -> SearchConfig:
    """What one of ``world_size`` ranks runs: ``batch_size // world_size`` samples per step, and the lr scaled by
    (batch actually processed) / (global batch), which is 1 whenever ``world_size`` divides the batch."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    per_rank = cfg.batch_size // world_size
    if per_rank < 1:
        raise ValueError(f"batch_size={cfg.batch_size} (global) is smaller than the {world_size} data-parallel "
                         f"workers: each needs at least one sample per step")
    changes: dict[str, Any] = {}
    if world_size > 1:
        changes["batch_size"] = per_rank
        scale = per_rank * world_size / cfg.batch_size
        if scale != 1.0:
            changes.update(lr=cfg.lr * scale, lr_min=cfg.lr_min * scale)
    if device is not None and device != cfg.device:
        changes["device"] = device
    return dataclasses.replace(cfg, **changes) if changes else cfg


def incompatible_settings(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Config keys whose values differ and that a resumed run may not change (the core's rule)."""
    return sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_DIFFERENCES and saved.get(k) != now.get(k))


# -- storage helpers (local paths or any pyarrow URI, like ResultStore) --------------------------------------------
def normalize_storage(storage: str) -> str:
    """Local paths become absolute (Ray Train needs that); URIs (``s3://...``) are kept as they are."""
    storage = os.fspath(storage)
    if "://" in storage:
        return storage
    return os.path.abspath(os.path.expanduser(storage))


def _file(store: ResultStore, name: str) -> str:
    return f"{store.root}/{name}"


def read_bytes(store: ResultStore, name: str) -> bytes | None:
    path = _file(store, name)
    if store.fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with store.fs.open_input_stream(path) as fh:
        return fh.read()


def write_bytes(store: ResultStore, name: str, data: bytes) -> None:
    """Write atomically: temp file + rename locally, a single PUT on object stores."""
    path = _file(store, name)
    store.fs.create_dir(store.root, recursive=True)
    if isinstance(store.fs, pafs.LocalFileSystem):
        tmp = f"{store.root}/.{name}.{os.getpid()}.tmp"
        with store.fs.open_output_stream(tmp) as fh:
            fh.write(data)
        store.fs.move(tmp, path)
    else:
        with store.fs.open_output_stream(path) as fh:
            fh.write(data)


def read_json(store: ResultStore, name: str) -> Any:
    data = read_bytes(store, name)
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{_file(store, name)} is not valid JSON") from None


def write_json(store: ResultStore, name: str, value: Any) -> None:
    write_bytes(store, name, (json.dumps(value, indent=1, sort_keys=True, default=str) + "\n").encode("utf-8"))


def serialize(state: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def prepare_run(store: ResultStore, cfg: SearchConfig, values: Mapping[str, Any],
                resume: bool) -> dict[str, Any] | None:
    """Before a run starts: refuse to resume a run made with other settings, record this run's config.

    Returns what the previous run of this name recorded (None for a new run). ``resume=True`` makes a missing run
    an error, so a mistyped ``--name`` does not silently start from scratch.
    """
    meta = read_json(store, CONFIG_FILE)
    if meta is None:
        if resume:
            raise ValueError(f"--resume: there is no run named {store.name!r} under {store.storage}")
    else:
        saved = meta.get("config") if isinstance(meta, dict) else None
        if not isinstance(saved, dict):
            raise ValueError(f"{_file(store, CONFIG_FILE)} is not a search config of this project")
        changed = incompatible_settings(saved, json.loads(json.dumps(cfg.to_dict(), default=str)))
        if changed:
            raise ValueError(f"cannot resume run {store.name!r}: it was made with different settings "
                             f"({', '.join(changed)}); pick another --name or the same settings")
    write_json(store, CONFIG_FILE, {"format": CHECKPOINT_FORMAT, "values": dict(values), "config": cfg.to_dict()})
    return meta


def finished_run(store: ResultStore, previous: Mapping[str, Any] | None, cfg: SearchConfig,
                 trial_id: str) -> "RunResult | None":
    """The stored result when the run of this name already finished the same number of epochs (nothing to do)."""
    if previous is None or previous.get("config", {}).get("epochs") != cfg.epochs:
        return None
    text = read_bytes(store, GENOTYPE_FILE)
    rows = [r for r in store.read("trials").to_pylist() if r.get("trial_id") == trial_id]
    if text is None or not rows or rows[-1].get("status") != "done":
        return None
    from pcdarts_core.genotypes import parse_genotype

    return RunResult(store.name, store.root, parse_genotype(text.decode("utf-8")), int(rows[-1]["epochs_done"] or 0),
                     True)


def make_spec(values: Mapping[str, Any], *, storage: str | None, name: str, trial_id: str, write_results: bool,
              run_label: str | None = None, lr_reference_batch: int | None = None, cpus_per_worker: float = 1.0,
              use_gpu: bool = False, testing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What every worker needs to run its part of a search: a plain dict (it travels through Ray)."""
    return {"values": dict(values), "storage": storage, "name": name, "trial_id": trial_id,
            "write_results": bool(write_results), "run_label": run_label or name,
            "lr_reference_batch": lr_reference_batch, "cpus_per_worker": float(cpus_per_worker),
            "use_gpu": bool(use_gpu), "testing": dict(testing or {})}


def testing_hooks_from_env(storage: str, name: str) -> dict[str, Any]:
    """The kill hook's settings, read where the run is launched and handed to the workers."""
    spec = os.environ.get(KILL_ENV, "").strip()
    if not spec:
        return {}
    try:
        rank_text, epoch_text = spec.split(":")
        rank, epoch = int(rank_text), int(epoch_text)
    except ValueError:
        raise ValueError(f"{KILL_ENV} must be RANK:EPOCH (e.g. 1:2), got {spec!r}") from None
    if rank < 0 or epoch < 1:
        raise ValueError(f"{KILL_ENV}: rank must be >= 0 and epoch >= 1, got {spec!r}")
    digest = hashlib.sha256(f"{storage}/{name}".encode()).hexdigest()[:12]
    marker = os.environ.get(KILL_MARKER_ENV) or os.path.join(tempfile.gettempdir(),
                                                             f"pcdarts-kill-{digest}-r{rank}-e{epoch}")
    return {"kill_rank": rank, "kill_epoch": epoch, "kill_marker": marker}


# -- the loop every rank runs --------------------------------------------------------------------------------------
SCALAR_TYPES = (bool, int, float, str)
ARCH_COLUMNS = ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce")


def rank_fingerprint(net: torch.nn.Module, arch: list[torch.Tensor]) -> torch.Tensor:
    """Every arch parameter in full, then (sum, sum of squares) of every parameter and floating buffer."""
    parts = [p.detach().reshape(-1).double() for p in arch]
    tensors = list(net.parameters()) + [b for b in net.buffers() if b.dtype.is_floating_point]
    device = tensors[0].device if tensors else torch.device("cpu")
    stats = [torch.stack([t.detach().double().sum(), t.detach().double().square().sum()]) for t in tensors]
    return torch.cat([p.to(device) for p in parts] + stats) if parts or stats else torch.zeros(1, device=device)


def ranks_identical(net: torch.nn.Module, arch: list[torch.Tensor]) -> bool:
    """True when every rank's fingerprint equals rank 0's bit for bit (trivially True alone)."""
    _, world = distributed_world()
    if world == 1:
        return True
    mine = rank_fingerprint(net, arch)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)


class SearchRun:
    """One search as seen by one rank: builds this rank's Searcher, resumes, runs the epochs, and on rank 0
    writes the results (when asked) and the dashboard metrics."""

    def __init__(self, spec: Mapping[str, Any], state: Mapping[str, Any] | None = None, device: str | None = None,
                 echo: Echo | None = None):
        self.spec = dict(spec)
        self.rank, self.world = distributed_world()
        self.global_config = global_config(spec["values"], spec.get("lr_reference_batch"))
        self.config = rank_config(self.global_config, self.world, device)
        self.echo = echo
        self.searcher = Searcher(self.config)
        self.wall_time_s = 0.0
        self.last_metrics: dict[str, Any] | None = None
        self.resumed_from_epoch = 0
        if state is not None:
            self.load_state_dict(state)
        self.store = (ResultStore(spec["storage"], spec["name"])
                      if spec.get("write_results") and self.rank == 0 else None)
        self._group = group_key(spec["values"])

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "config": self.global_config.to_dict(), "world_size": self.world,
                "wall_time_s": self.wall_time_s, "last_metrics": self.last_metrics,
                "searcher": self.searcher.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT or not isinstance(state.get("searcher"), dict):
            raise CheckpointError("not a run checkpoint of this project (format mismatch)")
        changed = incompatible_settings(state["config"], self.global_config.to_dict())
        if changed:
            raise ValueError(f"cannot resume: the checkpoint was made with different settings ({', '.join(changed)})")
        searcher_state = dict(state["searcher"])
        # The saved per-rank config may come from another worker count; the global config was checked above.
        searcher_state["config"] = self.config.to_dict()
        self.searcher.load_state_dict(searcher_state)
        self.wall_time_s = float(state.get("wall_time_s") or 0.0)
        self.last_metrics = state.get("last_metrics")
        self.resumed_from_epoch = self.searcher.epoch

    # -- the loop ------------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.searcher.done

    def steps_per_epoch(self) -> int:
        steps = len(self.searcher.train_loader)
        cap = self.config.steps_per_epoch
        return min(steps, cap) if cap is not None else steps

    def epochs(self) -> Iterator[dict[str, Any]]:
        if self.store is not None:
            self._write_trial("running")
        while not self.searcher.done:
            cpu_start = time.process_time()
            metrics = self.searcher.run_epoch()
            # CPU seconds the epoch took in all ranks together (throughput per CPU-second survives a busy machine)
            (cpu_time,) = all_reduce_sum([time.process_time() - cpu_start], self.searcher.device)
            in_sync = ranks_identical(self.searcher.net, list(self.searcher.net.arch_parameters()))
            if not in_sync:
                raise RuntimeError(f"data-parallel ranks diverged in epoch {metrics['epoch']}: parameters differ "
                                   "between ranks (a bug: every rank must apply the same averaged gradients)")
            steps = self.steps_per_epoch()
            self.wall_time_s += float(metrics.get("epoch_time_s") or 0.0)
            throughput = float(metrics.get("throughput") or 0.0)
            # One bilevel step processes a global batch: its mean time, validation excluded.
            step_time = self.config.batch_size * self.world / throughput if throughput > 0 else None
            metrics.update(trial_id=self.spec["trial_id"], world_size=self.world, ranks_identical=in_sync,
                           resumed_from_epoch=self.resumed_from_epoch, steps=steps, step_time_s=step_time,
                           cpu_time_s=cpu_time, wall_time_s=self.wall_time_s)
            # The keys the sweep's own search trials report too (orchestrator.trainable.epoch_result).
            metrics.update(seed=self.global_config.seed, epochs_total=self.global_config.epochs,
                           search_done=self.searcher.done,
                           final_genotype=(self.searcher.final_genotype().to_json() if self.searcher.done
                                           else metrics.get("genotype")))
            self.last_metrics = _plain(metrics)
            if self.rank == 0:
                if self.store is not None:
                    self.store.upsert("epochs", [self._epoch_row(metrics)])
                    self._write_trial("running", metrics)
                record_epoch(metrics, run=self.spec["run_label"], trial=self.spec["trial_id"])
                if self.echo is not None:
                    self.echo(format_epoch(metrics, self.global_config.epochs))
            yield metrics

    def finish(self) -> Genotype:
        """The final genotype; rank 0 writes ``genotype.json`` and marks the trial done."""
        genotype = self.searcher.final_genotype()
        if self.store is not None:
            write_bytes(self.store, GENOTYPE_FILE, (genotype.to_json() + "\n").encode("utf-8"))
            self._write_trial("done", self.last_metrics)
        return genotype

    # -- rows ----------------------------------------------------------------------------------------------------
    def _epoch_row(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"trial_id": self.spec["trial_id"], "group": self._group,
                               "seed": self.global_config.seed}
        for key, value in metrics.items():
            if key in ("trial_id", "final_genotype"):
                continue
            if key in ARCH_COLUMNS or isinstance(value, SCALAR_TYPES) or value is None:
                row[key] = value
        return row

    def _write_trial(self, status: str, metrics: Mapping[str, Any] | None = None, error: str | None = None) -> None:
        assert self.store is not None
        write_trial_row(self.store, self.spec, status, metrics, error=error,
                        epochs_done=self.searcher.epoch, wall_time_s=self.wall_time_s)


def write_trial_row(store: ResultStore, spec: Mapping[str, Any], status: str, metrics: Mapping[str, Any] | None,
                    *, error: str | None = None, epochs_done: int | None = None,
                    wall_time_s: float | None = None) -> None:
    m = metrics or {}
    genotype = m.get("final_genotype") if status == "done" else None
    row = trial_row(spec["trial_id"], spec["values"], status,
                    val_acc=finite_or_none(m.get("val_acc")), train_acc=finite_or_none(m.get("train_acc")),
                    val_loss=finite_or_none(m.get("val_loss")), train_loss=finite_or_none(m.get("train_loss")),
                    genotype=genotype or m.get("genotype"), error=error, wall_time_s=wall_time_s,
                    epochs_done=epochs_done, world_size=m.get("world_size"),
                    **{k: finite_or_none(v) for k, v in m.items() if k.startswith(TRIAL_METRIC_PREFIXES)})
    store.upsert("trials", [row])


def _plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as plain Python values (they go into checkpoints read with ``weights_only=True``)."""
    return json.loads(json.dumps(dict(metrics), default=str))


def format_epoch(m: Mapping[str, Any], epochs: int) -> str:
    def num(key: str, fmt: str) -> str:
        value = m.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"

    return (f"epoch {m.get('epoch')}/{epochs}  lr {num('lr', '.4g')}  train_acc {num('train_acc', '.3f')}  "
            f"val_acc {num('val_acc', '.3f')}  arch_entropy {num('arch_entropy', '.3f')}  "
            f"skip {m.get('n_skip_normal')}  {num('throughput', '.1f')} img/s  {num('epoch_time_s', '.1f')} s"
            + (f"  [{m.get('world_size')} workers]" if (m.get("world_size") or 1) > 1 else ""))


def report_metrics(metrics: Mapping[str, Any], scalars_only: bool = False) -> dict[str, Any]:
    """What goes to Ray Train / Tune each epoch: every metric (the arch lists too, unless ``scalars_only``), NaN
    as None."""
    out: dict[str, Any] = {}
    for key, value in _plain(metrics).items():
        if scalars_only and not (value is None or isinstance(value, SCALAR_TYPES)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def echo_stdout(line: str) -> None:
    """Print from a Train worker once (Ray Train's print patch would log ``print`` output a second time)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _install_kill_hook(run: SearchRun, testing: Mapping[str, Any]) -> None:
    """Testing hook: rank ``kill_rank`` exits right after its first optimizer step of epoch ``kill_epoch``, once."""
    if "kill_rank" not in testing or run.rank != int(testing["kill_rank"]):
        return
    marker = Path(testing["kill_marker"])
    if marker.exists():
        return
    searcher, epoch_index = run.searcher, int(testing["kill_epoch"]) - 1
    step = searcher.step_optimizer

    def step_then_die(optimizer: torch.optim.Optimizer) -> None:
        step(optimizer)
        if searcher.epoch == epoch_index and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"rank {run.rank} killed in epoch {epoch_index + 1}\n", encoding="utf-8")
            # Ray Train's controller collects reports when it polls the workers; give it a few polls to register
            # the previous epoch's checkpoint, so the restart provably resumes from it (a real crash right after
            # a report may lose that checkpoint, and the restart then replays from the one before).
            interval = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S") or 2.0)
            echo_stdout(f"[testing hook] rank {run.rank} exits in epoch {epoch_index + 1} in {3 * interval + 1:g} s")
            time.sleep(3 * interval + 1)
            sys.stderr.flush()
            os._exit(1)

    searcher.step_optimizer = step_then_die  # type: ignore[method-assign]


def _resume_state(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The latest Ray Train checkpoint of this run; else a ``single`` run's checkpoint under the same name."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            return load_checkpoint(Path(directory) / RAY_CHECKPOINT_FILE)
    if spec.get("write_results") and spec.get("storage"):
        data = read_bytes(ResultStore(spec["storage"], spec["name"]), CHECKPOINT_FILE)
        if data is not None:
            return load_checkpoint(data)
    return None


def train_loop_per_worker(spec: dict[str, Any]) -> None:
    """Ray Train's per-worker function (``TorchTrainer`` has set up the process group: gloo or NCCL)."""
    import ray.train
    from ray.train import Checkpoint

    torch.set_num_threads(max(1, int(spec.get("cpus_per_worker") or 1)))
    device = "cpu"
    if spec.get("use_gpu"):
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
        device = "cuda"
    run = SearchRun(spec, _resume_state(spec), device=device, echo=echo_stdout)
    _install_kill_hook(run, spec.get("testing") or {})
    # The CLI keeps the arch lists in Parquet; a sweep trial sends everything to Tune.
    scalars_only = bool(spec.get("write_results"))
    if run.done and run.last_metrics:
        # A finished run was launched again: report its last epoch once more so Train/Tune see the result.
        ray.train.report(report_metrics(run.last_metrics, scalars_only))
    for metrics in run.epochs():
        reported = report_metrics(metrics, scalars_only)
        if run.rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(run.state_dict(), Path(tmp) / RAY_CHECKPOINT_FILE)
                ray.train.report(reported, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(reported)
    genotype = run.finish()
    if run.rank == 0:
        echo_stdout(f"final genotype: {genotype.to_json()}")


# -- one process ---------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    name: str
    root: str
    genotype: Genotype
    epochs_done: int
    resumed: bool


def _previous_or_finished(store: ResultStore, cfg: Any, values: Mapping[str, Any], resume: bool, name: str,
                          echo: Echo | None) -> tuple[Any, RunResult | None]:
    """The run's earlier record (checked against these settings) and, if it already finished, its result."""
    previous = prepare_run(store, cfg, values, resume)
    done = finished_run(store, previous, cfg, name)
    if done is not None and echo:
        echo(f"{name} already finished its {cfg.epochs} epochs")
    return previous, done


def run_single(values: Mapping[str, Any], storage: str, name: str, *, resume: bool = False,
               lr_reference_batch: int | None = None, echo: Echo | None = print) -> RunResult:
    """One search in this process; a checkpoint after every epoch; rerunning resumes (exactly, on CPU)."""
    from pcdarts_core.data import check_dataset

    storage = normalize_storage(storage)
    cfg = global_config(values, lr_reference_batch)
    check_dataset(cfg.dataset, cfg.data_dir)  # before anything is written (a distributed run checks on workers)
    store = ResultStore(storage, name)
    previous, done = _previous_or_finished(store, cfg, values, resume, name, echo)
    if done is not None:
        return done
    data = read_bytes(store, CHECKPOINT_FILE)
    state = load_checkpoint(data) if data is not None else None
    spec = make_spec(values, storage=storage, name=name, trial_id=name, write_results=True,
                     lr_reference_batch=lr_reference_batch)
    run = SearchRun(spec, state, echo=echo)
    if echo and state is not None:
        echo(f"resuming {name} after epoch {run.resumed_from_epoch}/{cfg.epochs}")
    try:
        for _ in run.epochs():
            write_bytes(store, CHECKPOINT_FILE, serialize(run.state_dict()))
        genotype = run.finish()
    except BaseException as err:
        detail = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
        write_trial_row(store, spec, "failed", run.last_metrics, error=detail.splitlines()[0] if detail else None,
                        epochs_done=run.searcher.epoch, wall_time_s=run.wall_time_s)
        raise
    return RunResult(name, store.root, genotype, run.searcher.epoch, previous is not None)


# -- Ray Train ------------------------------------------------------------------------------------------------------
def ensure_ray() -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it) or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)


def cluster_capacity() -> dict[str, float]:
    """The most CPUs/GPUs this cluster can have: the autoscaler's limits when it publishes them, else what the
    nodes have now."""
    import ray

    now = ray.cluster_resources()
    capacity = {"CPU": float(now.get("CPU", 0)), "GPU": float(now.get("GPU", 0))}
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API; without it the current totals are the best we know
        limits = None
    for key, value in (limits or {}).items():
        if key in capacity and value:
            capacity[key] = max(capacity[key], float(value))
    return capacity


def check_resources(opts: DistributedOptions, capacity: Mapping[str, float] | None = None) -> None:
    """One-line ``ValueError`` when the cluster can never host ``opts``' smallest worker group."""
    capacity = dict(capacity) if capacity is not None else cluster_capacity()
    n = opts.min_workers
    if opts.use_gpu and capacity.get("GPU", 0) < n:
        have = capacity.get("GPU", 0)
        raise ValueError(f"--gpu asks for {n} GPU workers but the cluster has {have:g} GPU(s)"
                         + (" (no GPU at all: leave out --gpu to run on CPUs)" if not have else ""))
    need_cpu = n * opts.cpus_per_worker
    if capacity.get("CPU", 0) < need_cpu:
        raise ValueError(f"{n} workers x {opts.cpus_per_worker:g} CPU need {need_cpu:g} CPUs but the cluster has "
                         f"{capacity.get('CPU', 0):g}; use fewer --num-workers or --cpus-per-worker")


#: Ray 2.60 shows Train V2 runs in the dashboard's Train view only with this set where the trainer is created.
STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"


def _train_configs(opts: DistributedOptions) -> tuple[Any, Any]:
    from ray.train import CheckpointConfig, FailureConfig

    os.environ.setdefault(STATE_TRACKING_ENV, "1")  # read by the TorchTrainer we are about to build

    return (FailureConfig(max_failures=opts.max_failures),
            CheckpointConfig(num_to_keep=opts.checkpoints_to_keep))


def run_distributed(values: Mapping[str, Any], opts: DistributedOptions, storage: str, name: str, *,
                    resume: bool = False, echo: Echo | None = print) -> RunResult:
    """The same search on ``opts.num_workers`` Ray Train workers (``TorchTrainer``, gloo on CPUs, NCCL on GPUs)."""
    import ray.train
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    storage = normalize_storage(storage)
    cfg = global_config(values, opts.lr_reference_batch)
    rank_config(cfg, opts.max_workers)  # every worker count of the group must get at least one sample
    store = ResultStore(storage, name)
    testing = testing_hooks_from_env(storage, name)
    ensure_ray()
    check_resources(opts)
    previous, done = _previous_or_finished(store, cfg, values, resume, name, echo)
    if done is not None:
        return done
    existed = previous is not None
    spec = make_spec(values, storage=storage, name=name, trial_id=name, write_results=True,
                     lr_reference_batch=opts.lr_reference_batch, cpus_per_worker=opts.cpus_per_worker,
                     use_gpu=opts.use_gpu, testing=testing)
    failure, checkpoints = _train_configs(opts)
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=spec, scaling_config=opts.scaling_config(),
                           run_config=RunConfig(name=name, storage_path=storage, failure_config=failure,
                                                checkpoint_config=checkpoints))
    if echo:
        echo(f"{'resuming' if existed else 'starting'} {name}: {opts.num_workers} worker(s)"
             f"{' with a GPU each' if opts.use_gpu else ''}, global batch {cfg.batch_size}, lr {cfg.lr:g}")
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        detail = str(err).strip().splitlines()
        message = detail[0] if detail else type(err).__name__
        write_trial_row(store, spec, "failed", None, error=message)
        raise RunFailed(f"distributed search {name!r} failed after {opts.max_failures} restart(s): {message}") \
            from None
    text = read_bytes(store, GENOTYPE_FILE)
    if text is None:
        raise RunFailed(f"distributed search {name!r} ended without writing {GENOTYPE_FILE}")
    from pcdarts_core.genotypes import parse_genotype

    trials = store.read("trials").to_pylist()
    epochs_done = next((r.get("epochs_done") for r in trials if r.get("trial_id") == name), None)
    return RunResult(name, store.root, parse_genotype(text.decode("utf-8")), int(epochs_done or 0), existed)


# -- inside a Tune sweep ---------------------------------------------------------------------------------------------
TRIAL_DISTRIBUTED_KEY = "distributed"


def trial_values(config: Mapping[str, Any]) -> tuple[dict[str, Any], DistributedOptions]:
    """(flat search values incl. seed, options) of a trial config: the sweep's ``{"search": {...}, "seed": s,
    "distributed": {...}}``, or flat search values with an optional ``distributed`` mapping."""
    options = DistributedOptions.from_mapping(config.get(TRIAL_DISTRIBUTED_KEY) or {})
    if isinstance(config.get("search"), Mapping):
        values = dict(config["search"])
        if "seed" in config:
            values["seed"] = int(config["seed"])
    else:
        values = {k: v for k, v in config.items() if k != TRIAL_DISTRIBUTED_KEY}
    return values, options


def distributed_search_trial(config: Mapping[str, Any]) -> None:
    """A Tune function trainable whose trial is a data-parallel search (Ray Train V2 inside Tune).

    ``config`` is what the sweep's ``search_trainable`` gets, ``{"search": {SearchConfig fields}, "seed": s}``,
    plus ``"distributed": {...}`` (the preset's section: ``num_workers``, ``use_gpu``, ``cpus_per_worker``,
    ``max_failures``, ``lr_reference_batch``, ``checkpoints_to_keep``); flat search values work too. It fits a
    ``TorchTrainer`` whose rank 0 reports every epoch to this trial through ``TuneReportCallback``: the core's
    metrics (``epoch``, ``val_acc``, ``alphas_*``, ``genotype``, ...) and the keys ``search_trainable`` adds
    (``seed``, ``epochs_total``, ``search_done``, ``final_genotype``, ``resumed_from_epoch``), plus ``trial_id``,
    ``world_size``, ``step_time_s``, ``wall_time_s`` and ``checkpoint_path``. The Train run keeps its checkpoints
    in the trial's directory (``<trial dir>/distributed-search``): a restarted trial resumes from its last epoch.
    Nothing is written to the sweep's Parquet store here; the sweep driver records the reported results as it
    does for its other trials.

    Tune reserves only the trial's own resources (``tune.with_resources``; ``{"cpu": 0}`` is refused by Tune, a
    small fraction works); Ray Train reserves the workers' CPUs/GPUs itself, so bound the number of concurrent
    trials with ``max_concurrent_trials``.
    """
    import ray.tune
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    values, opts = trial_values(config)
    cfg = global_config(values, opts.lr_reference_batch)
    rank_config(cfg, opts.max_workers)
    context = ray.tune.get_context()
    storage = context.get_storage()
    spec = make_spec(values, storage=None, name="distributed-search", trial_id=context.get_trial_id(),
                     write_results=False, run_label=context.get_experiment_name(),
                     lr_reference_batch=opts.lr_reference_batch, cpus_per_worker=opts.cpus_per_worker,
                     use_gpu=opts.use_gpu)
    failure, checkpoints = _train_configs(opts)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=spec, scaling_config=opts.scaling_config(),
        run_config=RunConfig(name="distributed-search", storage_path=storage.trial_fs_path,
                             storage_filesystem=storage.storage_filesystem, failure_config=failure,
                             checkpoint_config=checkpoints, callbacks=[TuneReportCallback()]))
    trainer.fit()
