"""Ray Tune function trainables: one search, one evaluation (retraining a genotype), one HPO configuration.

Each reports once per epoch through :func:`ray.tune.report` with a checkpoint of its whole state (read back with
``weights_only=True``), so a trial Tune restarts continues exactly from :func:`ray.tune.get_checkpoint`. Loop
``callbacks`` (bound with ``tune.with_parameters``) are how tests inject faults.
"""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

import torch

from pcdarts_core.config import eval_config
from pcdarts_core.genotypes import parse_genotype
from pcdarts_core.runtime import CheckpointError, claim_device_share, load_checkpoint, save_checkpoint
from pcdarts_core.train import Trainer, train_eval
from pcdarts_core.stability import pairwise_distance_mean

from .run import Reporter, RunCallback, SearchRun, describe, make_spec, run_search

CHECKPOINT_FILE = "state.pt"

#: per-epoch search metrics that go to Tune unchanged (the rest of the loop's dict goes too)
OBJECTIVE_ACC = "hpo_val_acc_mean"
OBJECTIVE_DISTANCE = "hpo_genotype_distance"
HPO_PROGRESS = "seed_progress"
HPO_RUNNING_ACC = "acc_so_far"
HPO_FORMAT = "pcdarts-hpo/1"


def set_threads_from_trial() -> None:
    """torch threads = the trial's CPU share (at least 1), CUDA memory = its GPU share."""
    from ray import tune

    required = tune.get_context().get_trial_resources().required_resources
    cpus, gpus = float(required.get("CPU", 1.0)), float(required.get("GPU", 0.0))
    torch.set_num_threads(max(1, int(cpus)))
    claim_device_share(gpus)  # fractional GPUs: this trial's share of the GPU's memory


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


def experiment_name() -> str:
    """The sweep's name (the dashboard metrics' ``run`` tag): the folder above Tune's ``search/``, ``hpo/``..."""
    from ray import tune

    return PurePosixPath(tune.get_context().get_storage().experiment_fs_path).parent.name


def _trial_spec(values: Mapping[str, Any]) -> dict[str, Any]:
    from ray import tune

    return make_spec(values, name=tune.get_context().get_trial_id(), run_label=experiment_name())


class TuneReporter(Reporter):
    """The reporter of a sweep's search trial: every epoch to Tune with a resumable checkpoint."""

    def restore(self) -> Mapping[str, Any] | None:
        return restored_state()

    def epoch(self, run: SearchRun, metrics: Mapping[str, Any]) -> None:
        report(metrics, run.state_dict())

    def failed(self, run: SearchRun | None, error: BaseException) -> None:
        if isinstance(error, ValueError):  # deterministic (a diverged search, a bad checkpoint): not retried
            from ray import tune

            tune.report({**((run and run.last_metrics) or {}), "error": describe(error), "search_done": False})


def search_trainable(config: dict[str, Any], callbacks: Sequence[RunCallback] = ()) -> None:
    """One search: ``config = {"search": {SearchConfig fields}, "seed": int}``. A ``ValueError`` (a diverged
    search: "diverged at epoch E (loss nan)") ends the trial with an ``error`` result instead of a crash, so Tune
    does not retry what would fail the same way; the driver records it as failed."""
    set_threads_from_trial()
    try:
        run_search(_trial_spec({**config["search"], "seed": int(config["seed"])}), TuneReporter(),
                   callbacks=callbacks)
    except ValueError:
        return


def eval_trainable(config: dict[str, Any]) -> None:
    """Train one genotype from scratch: ``config = {"eval": {EvalConfig fields}, "spec": {eval_id, source,
    genotype, seed}}``; reports test accuracy every epoch with a resumable checkpoint."""
    spec = config["spec"]
    values = {**config["eval"], "seed": int(spec["seed"])}
    cfg = eval_config(str(values.pop("dataset")), **values)
    genotype = parse_genotype(spec["genotype"])
    set_threads_from_trial()
    base = {"eval_id": spec["eval_id"], "source": spec["source"], "seed": int(spec["seed"]),
            "epochs_total": cfg.epochs}

    def callback(metrics: dict[str, Any], trainer: Trainer) -> None:
        report({**metrics, **base}, trainer.state_dict())

    for _ in train_eval(cfg, genotype, callbacks=[callback], state=restored_state()):
        pass


class HpoReporter(Reporter):
    """The reporter of one seed of an HPO configuration: the epoch, plus the configuration's progress for ASHA
    and, after the last seed, the two objectives; the checkpoint holds the completed seeds and this search."""

    def __init__(self, seeds: Sequence[int], index: int, completed: list[dict[str, Any]],
                 state: Mapping[str, Any] | None):
        self.seeds, self.index, self.completed, self.state = list(seeds), index, completed, state

    def restore(self) -> Mapping[str, Any] | None:
        return self.state

    def epoch(self, run: SearchRun, metrics: Mapping[str, Any]) -> None:
        i, done, epochs = self.index, run.done, run.global_config.epochs
        val = metrics.get("val_acc")
        running = [c["val_acc"] for c in self.completed if c.get("val_acc") is not None] + \
            ([val] if val is not None else [])
        extra: dict[str, Any] = {"seed_index": i, HPO_PROGRESS: i + run.searcher.epoch / epochs,
                                 HPO_RUNNING_ACC: sum(running) / len(running) if running else 0.0,
                                 "seed_done": done, "seed_wall_time_s": run.wall_time_s,
                                 "hpo_epochs_done": i * epochs + run.searcher.epoch}
        if done:
            self.completed.append({k: metrics.get(k) for k in ("val_acc", "train_acc", "val_loss", "train_loss")}
                                  | {"seed": self.seeds[i], "genotype": metrics["final_genotype"],
                                     "epochs_done": run.searcher.epoch, "wall_time_s": run.wall_time_s})
        extra["seeds_done"] = len(self.completed)
        if len(self.completed) == len(self.seeds):  # the last seed is done: the configuration's objectives
            accs = [c["val_acc"] for c in self.completed if c.get("val_acc") is not None]
            extra[OBJECTIVE_ACC] = sum(accs) / len(accs) if accs else 0.0
            extra[OBJECTIVE_DISTANCE] = pairwise_distance_mean([c["genotype"] for c in self.completed])
        state = {"format": HPO_FORMAT, "index": i + 1 if done else i, "completed": self.completed,
                 "run": None if done else run.state_dict()}
        report({**metrics, **extra}, state)


def hpo_trainable(config: dict[str, Any], callbacks: Sequence[RunCallback] = ()) -> None:
    """One Optuna configuration (``config``: ``search`` base settings, sampled ``params``, ``seeds``), its seeds
    searched one after the other; every epoch reported with ASHA's progress and running accuracy, the two
    objectives after the last seed (a trial stopped early never reports them: Optuna records it pruned)."""
    seeds = [int(s) for s in config["seeds"]]
    values = {**config["search"], **config["params"]}
    set_threads_from_trial()
    state = restored_state()
    if state is not None and state.get("format") != HPO_FORMAT:
        raise CheckpointError("not an HPO trial checkpoint of this project (format mismatch)")
    index = int(state["index"]) if state else 0
    completed: list[dict[str, Any]] = list(state["completed"]) if state else []
    for i in range(index, len(seeds)):
        resume = state.get("run") if state is not None and i == index else None
        run_search(_trial_spec({**values, "seed": seeds[i]}), HpoReporter(seeds, i, completed, resume),
                   callbacks=callbacks)

