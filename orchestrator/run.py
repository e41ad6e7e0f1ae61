"""One search from a config to its end: :func:`run_search`, the loop that every place a search runs calls; the
places differ only in their :class:`Reporter` (README, *Layout*). The loop adds to the core's metrics the CPU time
of all ranks, a bit-exact cross-rank check and the keys every reporter sends.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from pcdarts_core.config import SearchConfig, global_config, rank_config
from pcdarts_core.genotypes import Genotype, parse_genotype
from pcdarts_core.runtime import CheckpointError, all_reduce_sum, distributed_world, load_checkpoint, ranks_identical
from pcdarts_core.search import Searcher, incompatible_settings

from .cluster import check_storage
from .metrics import record_epoch
from .results import experiment_lock, ResultStore, epoch_row, group_key, search_row

CHECKPOINT_FORMAT = "pcdarts-run/1"
#: files under ``<storage>/<name>/`` of a run that writes its own results
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "search_config.json"
GENOTYPE_FILE = "genotype.json"

Echo = Callable[[str], None]


class RunFailed(RuntimeError):
    """The search itself failed (after any retries): not a usage error (exit status 3)."""


def describe(error: BaseException) -> str:
    """One line for a failed search: a ``ValueError``'s own message (a diverged search says "diverged at epoch E
    (loss nan)", a bad checkpoint names its file), else the exception's type and first line."""
    text = str(error).splitlines()[0] if str(error) else ""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return text if isinstance(error, ValueError) and text else f"{type(error).__name__}: {text}".rstrip(": ")


# -- the run -------------------------------------------------------------------------------------------------------
def make_spec(values: Mapping[str, Any], *, name: str, trial_id: str | None = None, run_label: str | None = None,
              lr_reference_batch: int | None = None) -> dict[str, Any]:
    """What every rank needs to run its part of a search: a plain dict (it travels through Ray)."""
    return {"values": _plain(values), "name": name, "trial_id": trial_id or name, "run_label": run_label or name,
            "lr_reference_batch": lr_reference_batch}


class RunCallback:
    """Extension point of the loop (production installs none; tests install fault injectors)."""

    def before_epoch(self, run: "SearchRun") -> None:
        """Called before each epoch this attempt runs (``run.searcher.epoch`` epochs are done)."""


class SearchRun:
    """One search as seen by one rank: this rank's Searcher, resumed from ``state``, and its epochs."""

    def __init__(self, spec: Mapping[str, Any], state: Mapping[str, Any] | None = None, device: str | None = None,
                 echo: Echo | None = None):
        self.spec = dict(spec)
        self.rank, self.world = distributed_world()
        self.global_config = global_config(spec["values"], spec.get("lr_reference_batch"))
        self.config = rank_config(self.global_config, self.world, device)
        self.echo = echo
        self.group = group_key(spec["values"])
        self.searcher = Searcher(self.config)
        self.wall_time_s = 0.0
        self.last_metrics: dict[str, Any] | None = None
        self.resumed_from_epoch = 0
        if state is not None:
            self.load_state_dict(state)

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

    @property
    def done(self) -> bool:
        return self.searcher.done

    def genotype(self) -> Genotype:
        return self.searcher.final_genotype()

    def epochs(self, callbacks: Sequence[RunCallback] = ()) -> Iterator[dict[str, Any]]:
        while not self.searcher.done:
            for callback in callbacks:
                callback.before_epoch(self)
            cpu_start = time.process_time()
            metrics = self.searcher.run_epoch()
            # CPU seconds the epoch took in all ranks together (throughput per CPU-second survives a busy machine)
            (cpu_time,) = all_reduce_sum([time.process_time() - cpu_start], self.searcher.device)
            if not ranks_identical(self.searcher.net, list(self.searcher.net.arch_parameters())):
                raise RuntimeError(f"data-parallel ranks diverged in epoch {metrics['epoch']}: parameters differ "
                                   "between ranks (a bug: every rank must apply the same averaged gradients)")
            self.wall_time_s += float(metrics.get("epoch_time_s") or 0.0)
            throughput = float(metrics.get("throughput") or 0.0)
            # One bilevel step processes a global batch: its mean time, validation excluded (unless the core
            # measured it itself).
            metrics.setdefault("step_time_s", self.config.batch_size * self.world / throughput if throughput else None)
            done = self.searcher.done
            metrics.update(trial_id=self.spec["trial_id"], world_size=self.world, ranks_identical=True,
                           resumed_from_epoch=self.resumed_from_epoch,
                           steps=min(len(self.searcher.train_loader), self.config.steps_per_epoch or 2**62),
                           cpu_time_s=cpu_time, wall_time_s=self.wall_time_s,
                           seed=self.global_config.seed, epochs_total=self.global_config.epochs, search_done=done,
                           final_genotype=self.genotype().to_json() if done else metrics.get("genotype"))
            self.last_metrics = _plain(metrics)
            if self.rank == 0:
                record_epoch(metrics, run=self.spec["run_label"], trial=self.spec["trial_id"])
                if self.echo is not None:
                    self.echo(format_epoch(metrics, self.global_config.epochs))
            yield self.last_metrics


class Reporter:
    """What differs between the places a search runs (see the module docstring). The defaults do nothing."""

    def restore(self) -> Mapping[str, Any] | None:
        """The state to resume from, or None for a fresh start."""
        return None

    def epoch(self, run: SearchRun, metrics: Mapping[str, Any]) -> None:
        """One epoch is done: ``run.state_dict()`` resumes after it."""

    def finish(self, run: SearchRun) -> None:
        """The search is done (also called when a finished run is started again)."""

    def failed(self, run: SearchRun | None, error: BaseException) -> None:
        """The attempt ended with ``error`` (which is raised on after this)."""


def run_search(spec: Mapping[str, Any], reporter: Reporter, *, device: str | None = None, echo: Echo | None = None,
               callbacks: Sequence[RunCallback] = ()) -> SearchRun:
    """Run (or resume) one search to its end on this rank, reporting every epoch through ``reporter``."""
    run = None
    try:
        run = SearchRun(spec, reporter.restore(), device=device, echo=echo)
        if echo is not None and run.rank == 0 and run.resumed_from_epoch:
            echo(f"resuming {spec['name']} after epoch {run.resumed_from_epoch}/{run.global_config.epochs}")
        for metrics in run.epochs(callbacks):
            reporter.epoch(run, metrics)
        reporter.finish(run)
    except BaseException as err:
        reporter.failed(run, err)
        raise
    return run


# -- a run that writes its own results --------------------------------------------------------------------------------
class StoreReporter(Reporter):
    """Rank 0 writes the run's rows, genotype and settings record under ``<storage>/<name>/``; with
    ``checkpoints`` (one process) it also keeps ``checkpoint.pt`` there, and resumes from it."""

    def __init__(self, store: ResultStore, spec: Mapping[str, Any], checkpoints: bool = True):
        self.store, self.spec, self.checkpoints = store, dict(spec), checkpoints
        self._recorded = False

    def restore(self) -> Mapping[str, Any] | None:
        data = self.store.read_file(CHECKPOINT_FILE)
        if data is None:
            return None
        return load_checkpoint(data, name=f"{self.store.root}/{CHECKPOINT_FILE}")

    def record_settings(self, run: SearchRun, finished: bool = False) -> None:
        """``search_config.json``: written only once this attempt has state that these settings describe."""
        self.store.write_json(CONFIG_FILE, {"format": CHECKPOINT_FORMAT, "values": self.spec["values"],
                                            "config": _plain(run.global_config.to_dict()), "finished": finished,
                                            "epochs_done": run.searcher.epoch})

    def epoch(self, run: SearchRun, metrics: Mapping[str, Any]) -> None:
        if run.rank != 0:
            return
        if self.checkpoints:
            self.store.write_file(CHECKPOINT_FILE, serialize(run.state_dict()))
        if not self._recorded:
            self.record_settings(run)
            self._recorded = True
        self.store.upsert("epochs", [epoch_row(self.spec["trial_id"], run.group, run.global_config.seed, metrics)])
        self._row(run, "running")

    def finish(self, run: SearchRun) -> None:
        if run.rank != 0:
            return
        self.store.write_file(GENOTYPE_FILE, (run.genotype().to_json() + "\n").encode("utf-8"))
        self._row(run, "done")
        self.record_settings(run, finished=True)
        self.compact()

    def failed(self, run: SearchRun | None, error: BaseException) -> None:
        if run is None or run.rank != 0:
            return  # nothing ran: nothing to record (a corrected command starts clean)
        self._row(run, "failed", describe(error))
        self.compact()

    def compact(self) -> None:
        for kind in ("epochs", "trials"):
            self.store.compact(kind)

    def _row(self, run: SearchRun, status: str, error: str | None = None) -> None:
        m = dict(run.last_metrics or {})
        m.update(epoch=run.searcher.epoch, wall_time_s=run.wall_time_s)
        if status != "done":
            m.pop("final_genotype", None)
        self.store.upsert("trials", [search_row(self.spec["trial_id"], self.spec["values"], status, m, error=error,
                                                world_size=m.get("world_size"))])


@dataclass
class RunResult:
    name: str
    root: str
    genotype: Genotype
    epochs_done: int
    resumed: bool


def finished_result(store: ResultStore, meta: Mapping[str, Any] | None, cfg: SearchConfig,
                    echo: Echo | None) -> RunResult | None:
    """The stored result when the run of this name finished with these settings (nothing left to do)."""
    if not meta or not meta.get("finished") or meta["config"].get("epochs") != cfg.epochs:
        return None
    text = store.read_file(GENOTYPE_FILE)
    if text is None:
        return None
    if echo:
        echo(f"{store.name} already finished its {cfg.epochs} epochs")
    return RunResult(store.name, store.root, parse_genotype(text.decode("utf-8")),
                     int(meta.get("epochs_done") or cfg.epochs), True)


def run_named(values: Mapping[str, Any], storage: str, name: str, launch: Callable[..., RunResult], *,
              resume: bool = False, lr_reference_batch: int | None = None, echo: Echo | None = print) -> RunResult:
    """A run that writes its own results under ``<storage>/<name>/`` (one process, or Ray Train): one writer at a
    time, refused with settings that may not resume it, a finished run just reports its result; otherwise
    ``launch(store, spec, resuming)`` runs it."""
    cfg = global_config(values, lr_reference_batch)
    store = ResultStore(storage, name)
    check_storage(store)
    with experiment_lock(store):
        meta = store.read_json(CONFIG_FILE)  # the settings record of an earlier attempt under this name
        if meta is None and resume:  # a mistyped --name does not start afresh
            raise ValueError(f"--resume: there is no run named {store.name!r} under {store.storage}")
        if meta is not None and (not isinstance(meta, dict) or not isinstance(meta.get("config"), dict)):
            raise ValueError(f"{store.root}/{CONFIG_FILE} is not a search config of this project")
        changed = incompatible_settings(meta["config"], cfg.to_dict()) if meta else []
        if changed:
            raise ValueError(f"cannot resume run {store.name!r}: it was made with different settings "
                             f"({', '.join(changed)}); pick another --name or the same settings")
        done = finished_result(store, meta, cfg, echo)
        if done is not None:
            return done
        return launch(store, make_spec(values, name=name, lr_reference_batch=lr_reference_batch), meta is not None)


def run_single(values: Mapping[str, Any], storage: str, name: str, *, resume: bool = False,
               lr_reference_batch: int | None = None, echo: Echo | None = print,
               callbacks: Sequence[RunCallback] = ()) -> RunResult:
    """One search in this process; a checkpoint after every epoch; rerunning resumes (exactly, on CPU)."""
    from pcdarts_core.data import check_dataset

    cfg = global_config(values, lr_reference_batch)
    check_dataset(cfg.dataset, cfg.data_dir)  # before anything is written (a distributed run checks on workers)

    def launch(store: ResultStore, spec: dict[str, Any], resuming: bool) -> RunResult:
        try:
            run = run_search(spec, StoreReporter(store, spec), echo=echo, callbacks=callbacks)
        except CheckpointError:
            raise  # an unreadable checkpoint.pt: bad input, named in one line (exit 2); nothing ran
        except Exception as err:  # noqa: BLE001 - the search failed (its row keeps the error); Ctrl-C passes
            raise RunFailed(f"search {name!r} failed: {describe(err)} (see {store.uri('trials')})") from None
        return RunResult(name, store.root, run.genotype(), run.searcher.epoch, run.resumed_from_epoch > 0)

    return run_named(values, storage, name, launch, resume=resume, lr_reference_batch=lr_reference_batch, echo=echo)


# -- small helpers ------------------------------------------------------------------------------------------------
def serialize(state: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """Plain JSON values (they go into checkpoints read with ``weights_only=True``, and through Ray); non-finite
    floats become None."""
    return json.loads(json.dumps(dict(values), default=str), parse_constant=lambda _: None)


def format_epoch(m: Mapping[str, Any], epochs: int) -> str:
    def num(key: str, fmt: str) -> str:
        value = m.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"

    return (f"epoch {m.get('epoch')}/{epochs}  lr {num('lr', '.4g')}  train_acc {num('train_acc', '.3f')}  "
            f"val_acc {num('val_acc', '.3f')}  arch_entropy {num('arch_entropy', '.3f')}  "
            f"skip {m.get('n_skip_normal')}  {num('throughput', '.1f')} img/s  {num('epoch_time_s', '.1f')} s"
            + (f"  [{m.get('world_size')} workers]" if (m.get("world_size") or 1) > 1 else ""))
