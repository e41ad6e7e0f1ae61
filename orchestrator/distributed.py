"""Data-parallel search on Ray Train (V2): the loop every search runs (:func:`orchestrator.run.run_search`) on each
of N ``TorchTrainer`` workers, with :class:`TrainReporter`; the core does the data-parallel arithmetic.

Rank 0 reports one checkpoint per epoch (``torch.save``, read with ``weights_only=True``); a restarted worker group
or a rerun resumes from it. From the CLI rank 0 also writes the run's results (``run.StoreReporter``); inside a
sweep (:func:`distributed_search_trial`) the driver does. The README's *Data-parallel search on Ray Train* has
the global batch, the lr scaling, fault tolerance and the dashboard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from pcdarts_core.config import global_config, rank_config
from pcdarts_core.runtime import load_checkpoint

from .cluster import cluster_capacity, connect
from .presets import DistributedOptions
from .results import ResultStore
from .run import (CONFIG_FILE, Echo, Reporter, RunCallback, RunFailed, RunResult, SearchRun, StoreReporter,
                  finished_result, make_spec, run_named, run_search, serialize)

RAY_CHECKPOINT_FILE = "search.pt"  # inside each Ray Train checkpoint directory


# -- Ray Train ------------------------------------------------------------------------------------------------------
def check_resources(opts: DistributedOptions, capacity: Mapping[str, float]) -> None:
    """One-line ``ValueError`` when the cluster can never host ``opts``' smallest worker group."""
    n = opts.min_workers
    if opts.use_gpu and capacity.get("GPU", 0) < n:
        have = capacity.get("GPU", 0)
        raise ValueError(f"--gpu asks for {n} GPU workers but the cluster has {have:g} GPU(s)"
                         + (" (no GPU at all: leave out --gpu to run on CPUs)" if not have else ""))
    need_cpu = n * opts.cpus_per_worker
    if capacity.get("CPU", 0) < need_cpu:
        raise ValueError(f"{n} workers x {opts.cpus_per_worker:g} CPU need {need_cpu:g} CPUs but the cluster has "
                         f"{capacity.get('CPU', 0):g}; use fewer --num-workers or --cpus-per-worker")


# -- the reporter of a Train worker -------------------------------------------------------------------------------
SCALAR_TYPES = (bool, int, float, str)


def echo_stdout(line: str) -> None:
    """Print from a Train worker once (Ray Train's print patch would log ``print`` output a second time)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class TrainReporter(Reporter):
    """``ray.train.report`` every epoch (rank 0 with a checkpoint); resumes from ``ray.train.get_checkpoint()``,
    else from a ``single`` run's checkpoint of the same name. ``store``: rank 0 also writes the run's results."""

    def __init__(self, store: StoreReporter | None, echo: Echo = echo_stdout):
        self.store, self.echo = store, echo

    def restore(self) -> Mapping[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                return load_checkpoint(Path(directory) / RAY_CHECKPOINT_FILE)
        return self.store.restore() if self.store is not None else None

    def _metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        if self.store is None:  # a sweep trial sends the arch lists to Tune; the CLI keeps them in Parquet
            return dict(metrics)
        return {k: v for k, v in metrics.items() if v is None or isinstance(v, SCALAR_TYPES)}

    def epoch(self, run: SearchRun, metrics: Mapping[str, Any]) -> None:
        import ray.train
        from ray.train import Checkpoint

        if self.store is not None:
            self.store.epoch(run, metrics)
        if run.rank != 0:
            ray.train.report(self._metrics(metrics))
            return
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / RAY_CHECKPOINT_FILE).write_bytes(serialize(run.state_dict()))
            ray.train.report(self._metrics(metrics), checkpoint=Checkpoint.from_directory(tmp))

    def finish(self, run: SearchRun) -> None:
        import ray.train

        if run.resumed_from_epoch and run.last_metrics and run.done and run.resumed_from_epoch == run.searcher.epoch:
            # A finished run was launched again: report its last epoch once more so Train/Tune see the result.
            ray.train.report(self._metrics(run.last_metrics))
        if self.store is not None:
            self.store.finish(run)
        if run.rank == 0:
            self.echo(f"final genotype: {run.genotype().to_json()}")

    def failed(self, run: SearchRun | None, error: BaseException) -> None:
        if self.store is not None:
            self.store.failed(run, error)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function (``TorchTrainer`` has set up the process group: gloo or NCCL)."""
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker") or 1)))
    device = "cpu"
    if config.get("use_gpu"):
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
        device = "cuda"
    spec = config["spec"]
    store = None
    if config.get("storage"):
        store = StoreReporter(ResultStore(config["storage"], spec["name"]), spec, checkpoints=False)
    lines = config.get(LINES_KEY)  # the driver's queue (the CLI): rank 0's lines reach its terminal
    echo: Echo = echo_stdout if lines is None else lines.put
    run_search(spec, TrainReporter(store, echo), device=device, echo=echo, callbacks=config.get("callbacks") or ())


#: the ``train_loop_config`` key of the queue that carries rank 0's lines (epochs, the final genotype) to the driver
LINES_KEY = "lines"


@contextlib.contextmanager
def echo_from_workers(echo: Echo | None) -> Iterator[Any]:
    """A Ray queue whose lines a driver thread passes to ``echo`` while the block runs (None without ``echo``): the
    workers' own stdout reaches the driver only with ``--verbose``, among Ray's and Train's log lines."""
    if echo is None:
        yield None
        return
    from ray.util.queue import Empty, Queue

    lines, done = Queue(actor_options={"num_cpus": 0}), threading.Event()

    def pump() -> None:
        while True:
            try:
                echo(lines.get(timeout=0.5))
            except Empty:
                if done.is_set():
                    return
            except Exception:  # noqa: BLE001 - the queue's actor is gone (Ray shut down): nothing more to show
                return

    thread = threading.Thread(target=pump, name="pcdarts-echo", daemon=True)
    thread.start()
    try:
        yield lines
    finally:
        done.set()
        thread.join(timeout=10)
        lines.shutdown()


#: Ray 2.60 shows Train V2 runs in the dashboard's Train view only with this set where the trainer is created.
STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"


def trainer(config: Mapping[str, Any], opts: DistributedOptions, run_config: Any) -> Any:
    """The ``TorchTrainer`` of one data-parallel search."""
    from ray.train import CheckpointConfig, FailureConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault(STATE_TRACKING_ENV, "1")  # read by the TorchTrainer we are about to build
    run_config = dataclasses.replace(run_config, failure_config=FailureConfig(max_failures=opts.max_failures),
                                     checkpoint_config=CheckpointConfig(num_to_keep=opts.checkpoints_to_keep))
    return TorchTrainer(train_loop_per_worker, train_loop_config={**config, "cpus_per_worker": opts.cpus_per_worker,
                                                                  "use_gpu": opts.use_gpu},
                        scaling_config=opts.scaling_config(), run_config=run_config)


def run_distributed(values: Mapping[str, Any], opts: DistributedOptions, storage: str, name: str, *,
                    resume: bool = False, echo: Echo | None = print, address: str | None = None,
                    callbacks: Sequence[RunCallback] = ()) -> RunResult:
    """The same search on ``opts.num_workers`` Ray Train workers (``TorchTrainer``, gloo on CPUs, NCCL on GPUs)."""
    cfg = global_config(values, opts.lr_reference_batch)
    rank_config(cfg, opts.max_workers)  # every worker count of the group must get at least one sample

    def launch(store: ResultStore, spec: dict[str, Any], resuming: bool) -> RunResult:
        import ray.train
        from ray.train import RunConfig

        connect(address, store=store)
        check_resources(opts, cluster_capacity())
        if echo:
            echo(f"{'resuming' if resuming else 'starting'} {name}: {opts.num_workers} worker(s)"
                 f"{' with a GPU each' if opts.use_gpu else ''}, global batch {cfg.batch_size}, lr {cfg.lr:g}")
        try:
            with echo_from_workers(echo) as lines:
                trainer({"spec": spec, "storage": storage, "callbacks": list(callbacks), LINES_KEY: lines}, opts,
                        RunConfig(name=name, storage_path=storage)).fit()
        except ray.train.TrainingFailedError as err:
            detail = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
            message = " ".join(detail[:1] + detail[-1:]) if detail else type(err).__name__
            raise RunFailed(f"distributed search {name!r} failed after {opts.max_failures} restart(s): {message}") \
                from None
        result = finished_result(store, store.read_json(CONFIG_FILE), cfg, None)
        if result is None:
            raise RunFailed(f"distributed search {name!r} ended without writing its genotype")
        return dataclasses.replace(result, resumed=resuming)

    return run_named(values, storage, name, launch, resume=resume, lr_reference_batch=opts.lr_reference_batch,
                     echo=echo)


# -- inside a Tune sweep ---------------------------------------------------------------------------------------------
TRIAL_DISTRIBUTED_KEY = "distributed"


def distributed_search_trial(config: Mapping[str, Any], callbacks: Sequence[RunCallback] = ()) -> None:
    """A Tune trainable whose trial is a data-parallel search: ``config`` is a search trial's plus
    ``"distributed"`` (the preset's section); rank 0 reports to the trial (``TuneReportCallback``) and keeps its
    checkpoints in the trial's directory. Ray Train reserves the workers itself: bound ``max_concurrent_trials``."""
    import ray.tune
    from ray.train import RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from .trainable import experiment_name

    opts = DistributedOptions.from_mapping(config.get(TRIAL_DISTRIBUTED_KEY) or {})
    values = {**config["search"], "seed": int(config["seed"])}
    rank_config(global_config(values, opts.lr_reference_batch), opts.max_workers)
    context = ray.tune.get_context()
    storage = context.get_storage()
    spec = make_spec(values, name="distributed-search", trial_id=context.get_trial_id(),
                     run_label=experiment_name(), lr_reference_batch=opts.lr_reference_batch)
    trainer({"spec": spec, "callbacks": list(callbacks)}, opts,
            RunConfig(name="distributed-search", storage_path=storage.trial_fs_path,
                      storage_filesystem=storage.storage_filesystem, callbacks=[TuneReportCallback()])).fit()
