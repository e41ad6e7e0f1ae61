"""Ray Tune function trainables: one search, one evaluation (retraining a genotype), one HPO configuration.

Each reports once per epoch through :func:`ray.tune.report` with a checkpoint of the full loop state (model,
optimizers, epoch, every RNG), written by :func:`pcdarts_core.runtime.save_checkpoint` and read back with
``weights_only=True``. A trial that Tune restarts (a crash retried under ``FailureConfig(max_failures)``, or a
sweep resumed after Ctrl-C) continues from :func:`ray.tune.get_checkpoint`: on CPU exactly the run that was never
interrupted. Torch threads are set to the trial's CPU share.

Testing hook (documented, off unless set; the driver forwards these variables to its Ray job):

- ``PCDARTS_FAIL_AT_EPOCH=N``: a search trial raises :class:`InjectedFailure` when it is about to start epoch
  ``N`` (1-based), i.e. after epoch ``N-1`` was reported and checkpointed; a retry resumes from that checkpoint
  and crashes at the same point again, so the trial ends failed after ``max_failures`` retries;
- ``PCDARTS_FAIL_SEEDS=1,3``: only trials with these seeds crash (default: every trial);
- ``PCDARTS_FAIL_ONCE=1``: crash only in an attempt that did not start from a checkpoint, so the retry succeeds.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from pcdarts_core.config import eval_config, search_config_from_dict
from pcdarts_core.genotypes import parse_genotype
from pcdarts_core.runtime import CheckpointError, claim_device_share, load_checkpoint, save_checkpoint
from pcdarts_core.search import Searcher, search
from pcdarts_core.train import Trainer, train_eval

CHECKPOINT_FILE = "state.pt"
FAIL_AT_EPOCH_ENV = "PCDARTS_FAIL_AT_EPOCH"
FAIL_SEEDS_ENV = "PCDARTS_FAIL_SEEDS"
FAIL_ONCE_ENV = "PCDARTS_FAIL_ONCE"
TEST_HOOK_ENV = (FAIL_AT_EPOCH_ENV, FAIL_SEEDS_ENV, FAIL_ONCE_ENV)

#: per-epoch search metrics that go to Tune unchanged (the rest of the loop's dict goes too)
OBJECTIVE_ACC = "hpo_val_acc_mean"
OBJECTIVE_DISTANCE = "hpo_genotype_distance"
HPO_PROGRESS = "seed_progress"
HPO_RUNNING_ACC = "acc_so_far"


class InjectedFailure(RuntimeError):
    """The crash ``PCDARTS_FAIL_AT_EPOCH`` asks for (a testing hook)."""


# -- helpers shared by the trainables ----------------------------------------------------------------------------
def set_threads_from_trial() -> int:
    """torch threads = the trial's CPU share (at least 1), CUDA memory = its GPU share; returns the thread count."""
    from ray import tune

    cpus, gpus = 1.0, 0.0
    try:
        required = tune.get_context().get_trial_resources().required_resources
        cpus, gpus = float(required.get("CPU", 1.0)), float(required.get("GPU", 0.0))
    except Exception:  # noqa: BLE001 - outside a trial (tests calling the helpers directly)
        pass
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    claim_device_share(gpus)  # fractional GPUs: this trial's share of the GPU's memory
    return threads


def _trial_tags() -> tuple[str, str]:
    from ray import tune

    try:
        ctx = tune.get_context()
        return ctx.get_experiment_name(), ctx.get_trial_id()
    except Exception:  # noqa: BLE001
        return "", ""


def _record_dashboard(metrics: Mapping[str, Any]) -> None:
    """Per-epoch custom metrics for Ray's dashboard, when ``orchestrator.metrics`` is there."""
    try:
        from .metrics import record_epoch
    except ImportError:  # pragma: no cover - the module is optional
        return
    run, trial = _trial_tags()
    try:
        record_epoch(metrics, run=run, trial=trial)
    except Exception:  # noqa: BLE001 - dashboard metrics must never kill a search
        pass


def restored_state() -> dict[str, Any] | None:
    """The state dict of the trial's latest checkpoint (``tune.get_checkpoint()``), or None on a fresh start."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = Path(directory) / CHECKPOINT_FILE
        if not path.is_file():
            raise CheckpointError(f"trial checkpoint {directory} has no {CHECKPOINT_FILE}")
        return load_checkpoint(path)


def report(result: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """``tune.report(result, checkpoint=...)`` with ``state`` saved by ``save_checkpoint`` into a temp dir."""
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="pcdarts-ckpt-") as tmp:
        save_checkpoint(dict(state), Path(tmp) / CHECKPOINT_FILE)
        tune.report(dict(result), checkpoint=tune.Checkpoint.from_directory(tmp))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def epoch_result(metrics: Mapping[str, Any], searcher: Searcher) -> dict[str, Any]:
    """What a search reports to Tune for one epoch: the loop's metrics (NaN as None), the seed, the epoch count
    and the genotype the search would return if it stopped now (DARTS-ES may return an earlier one)."""
    out = {k: _finite(v) for k, v in metrics.items()}
    out["seed"] = searcher.config.seed
    out["epochs_total"] = searcher.config.epochs
    out["search_done"] = searcher.done
    out["final_genotype"] = searcher.final_genotype().to_json() if searcher.done else metrics.get("genotype")
    return out


def report_epoch(metrics: Mapping[str, Any], searcher: Searcher, extra: Mapping[str, Any] | None = None,
                 state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Report one search epoch to Tune with a resumable checkpoint (``searcher.state_dict()`` unless ``state``
    is given) and record the dashboard metrics; returns the reported dict. A ``search`` callback can be just
    ``lambda m, s: report_epoch(m, s)``."""
    result = epoch_result(metrics, searcher)
    if extra:
        result.update(extra)
    report(result, state if state is not None else searcher.state_dict())
    _record_dashboard(metrics)
    return result


# -- the failure-injection testing hook --------------------------------------------------------------------------
def failure_epoch(seed: int, resumed: bool, env: Mapping[str, str] | None = None) -> int | None:
    """The epoch (1-based) at whose start this attempt must crash, or None (the testing hook is off)."""
    env = os.environ if env is None else env
    text = env.get(FAIL_AT_EPOCH_ENV, "").strip()
    if not text:
        return None
    try:
        epoch = int(text)
    except ValueError:
        raise ValueError(f"{FAIL_AT_EPOCH_ENV} must be an epoch number, got {text!r}") from None
    seeds = env.get(FAIL_SEEDS_ENV, "").strip()
    if seeds and seed not in {int(s) for s in seeds.split(",") if s.strip()}:
        return None
    if env.get(FAIL_ONCE_ENV, "").strip() in ("1", "true", "yes") and resumed:
        return None
    return epoch


def _maybe_fail(fail_at: int | None, next_epoch: int, start_epoch: int) -> None:
    if fail_at is not None and next_epoch == fail_at:
        raise InjectedFailure(f"injected failure before epoch {fail_at} ({FAIL_AT_EPOCH_ENV}); "
                              f"this attempt started from epoch {start_epoch}")


# -- the trainables ----------------------------------------------------------------------------------------------
def search_trainable(config: dict[str, Any]) -> None:
    """One search: ``config = {"search": {SearchConfig fields}, "seed": int}``."""
    cfg = search_config_from_dict({**config["search"], "seed": int(config["seed"])})
    set_threads_from_trial()
    state = restored_state()
    start = int(state["epoch"]) if state is not None else 0
    fail_at = failure_epoch(cfg.seed, resumed=state is not None)
    if start >= cfg.epochs:
        return  # the last checkpoint already holds the finished search
    _maybe_fail(fail_at, start + 1, start)

    def callback(metrics: dict[str, Any], searcher: Searcher) -> None:
        report_epoch(metrics, searcher, extra={"resumed_from_epoch": start})
        if not searcher.done:
            _maybe_fail(fail_at, searcher.epoch + 1, start)

    for _ in search(cfg, callbacks=[callback], state=state):
        pass


def eval_trainable(config: dict[str, Any]) -> None:
    """Train one genotype from scratch: ``config = {"eval": {EvalConfig fields}, "spec": {eval_id, source,
    genotype, seed}}``; reports test accuracy every epoch with a resumable checkpoint."""
    spec = config["spec"]
    values = {**config["eval"], "seed": int(spec["seed"])}
    cfg = eval_config(str(values.pop("dataset")), **values)
    genotype = parse_genotype(spec["genotype"])
    set_threads_from_trial()
    state = restored_state()
    base = {"eval_id": spec["eval_id"], "source": spec["source"], "seed": int(spec["seed"]),
            "epochs_total": cfg.epochs}

    def callback(metrics: dict[str, Any], trainer: Trainer) -> None:
        report({**{k: _finite(v) for k, v in metrics.items()}, **base}, trainer.state_dict())

    for _ in train_eval(cfg, genotype, callbacks=[callback], state=state):
        pass


def hpo_trainable(config: dict[str, Any]) -> None:
    """One Optuna configuration over several seeds, run one after the other in this trial.

    ``config = {"search": base settings, "params": the sampled settings, "seeds": [...]}``. Every epoch of every
    seed is reported (with a checkpoint of the completed seeds and the running search), carrying
    ``seed_progress`` (seeds done + fraction of the current one) and ``acc_so_far`` (mean final val_acc of the
    completed seeds, the current seed's current val_acc counted provisionally) for ASHA. After the last seed the
    two objectives are reported: ``hpo_val_acc_mean`` and ``hpo_genotype_distance`` (mean pairwise distance of
    the seeds' genotypes). A trial stopped early never reports them, which Optuna records as pruned.
    """
    from .stability import pairwise_distance_mean

    seeds = [int(s) for s in config["seeds"]]
    values = {**config["search"], **config["params"]}
    set_threads_from_trial()
    state = restored_state()
    if state is not None and state.get("format") != "pcdarts-hpo/1":
        raise CheckpointError("not an HPO trial checkpoint of this project (format mismatch)")
    index = int(state["index"]) if state else 0
    completed: list[dict[str, Any]] = list(state["completed"]) if state else []
    searcher_state = state.get("searcher") if state else None
    seed_time = float(state.get("seed_time", 0.0)) if state else 0.0

    def summary() -> dict[str, Any]:
        accs = [c["val_acc"] for c in completed if c.get("val_acc") is not None]
        out: dict[str, Any] = {"seeds_done": len(completed)}
        if len(completed) == len(seeds):
            out[OBJECTIVE_ACC] = sum(accs) / len(accs) if accs else 0.0
            out[OBJECTIVE_DISTANCE] = pairwise_distance_mean([c["genotype"] for c in completed])
        return out

    for i in range(index, len(seeds)):
        cfg = search_config_from_dict({**values, "seed": seeds[i]})
        resume = searcher_state if i == index else None
        if i != index:
            seed_time = 0.0
        attempt_start = time.perf_counter()
        time_before = seed_time

        def callback(metrics: dict[str, Any], searcher: Searcher, i: int = i) -> None:
            nonlocal seed_time
            seed_time = time_before + (time.perf_counter() - attempt_start)
            done = searcher.done
            val = _finite(metrics.get("val_acc"))
            finished = [c["val_acc"] for c in completed if c.get("val_acc") is not None]
            running = finished + ([val] if val is not None else [])
            extra: dict[str, Any] = {
                "seed_index": i,
                HPO_PROGRESS: i + searcher.epoch / searcher.config.epochs,
                HPO_RUNNING_ACC: sum(running) / len(running) if running else 0.0,
                "seed_done": done,
                "seed_wall_time_s": seed_time,
                "hpo_epochs_done": i * searcher.config.epochs + searcher.epoch,
            }
            if done:
                completed.append({
                    "seed": seeds[i], "val_acc": val, "train_acc": _finite(metrics.get("train_acc")),
                    "val_loss": _finite(metrics.get("val_loss")), "train_loss": _finite(metrics.get("train_loss")),
                    "genotype": searcher.final_genotype().to_json(), "epochs_done": searcher.epoch,
                    "wall_time_s": seed_time})
                extra.update(summary())
                ckpt = {"format": "pcdarts-hpo/1", "index": i + 1, "completed": completed, "searcher": None,
                        "seed_time": 0.0}
            else:
                extra["seeds_done"] = len(completed)
                ckpt = {"format": "pcdarts-hpo/1", "index": i, "completed": completed,
                        "searcher": searcher.state_dict(), "seed_time": seed_time}
            report_epoch(metrics, searcher, extra=extra, state=ckpt)

        for _ in search(cfg, callbacks=[callback], state=resume):
            pass


TRAINABLES: dict[str, Callable[[dict[str, Any]], None]] = {
    "search": search_trainable,
    "evaluate": eval_trainable,
    "hpo": hpo_trainable,
}
