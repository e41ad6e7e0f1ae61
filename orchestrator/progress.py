"""Live terminal progress of a Tune experiment with ``rich``: trials running/done/failed, best so far, ETA.

The bar counts *epochs* over all trials (so the ETA moves with the work); finished, failed and retried trials also
get one printed line each (all a log file sees besides the final bar)."""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from pathlib import Path
from typing import Any, Sequence

from ray.tune import Callback
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console: Console | None = None
_live: "weakref.WeakSet[TuneProgress]" = weakref.WeakSet()


def console() -> Console:
    """The console every command of the orchestrator prints on (stdout)."""
    global _console
    if _console is None:
        wide = not Console().is_terminal and "COLUMNS" not in os.environ  # logs and pipes: room for the stability table
        _console = Console(highlight=False, width=140 if wide else None)
    return _console


def stop_all() -> None:
    """Stop every live progress display of this process (idempotent)."""
    for cb in list(_live):
        cb.stop()


class TuneProgress(Callback):
    """``label`` names the experiment; ``total_epochs`` is the work of all trials in epochs (None: unknown);
    ``metric`` (higher is better) picks the "best so far"; ``epoch_key`` is the result key counting a trial's epochs;
    ``grid_keys`` are the search settings a stability sweep varies, which name its trials (``k=2 seed 0``)."""

    def __init__(self, label: str, total_trials: int, total_epochs: int | None, metric: str = "val_acc",
                 epoch_key: str = "epoch", grid_keys: Sequence[str] = ()):
        self.label, self.total_trials, self.total_epochs = label, total_trials, total_epochs
        self.metric, self.epoch_key, self.grid_keys = metric, epoch_key, tuple(grid_keys)
        self._progress: Progress | None = None
        self._done_epochs: dict[str, float] = {}
        self._ends: dict[str, str] = {}  # trial id -> "TERMINATED" or "ERROR", by this callback's own records
        self._best: tuple[float, str] | None = None

    def __reduce__(self) -> tuple[Any, ...]:  # Tune pickles its callbacks: the settings only, not the display
        return type(self), (self.label, self.total_trials, self.total_epochs, self.metric, self.epoch_key,
                            self.grid_keys)

    def stop(self) -> None:
        if self._progress is not None:
            self._refresh(None)
            self._progress.stop()
            self._progress = None
        _live.discard(self)

    def _refresh(self, trials: list[Any] | None) -> None:
        """Start or update the bar and its line (no ``trials`` at the end: the rest are "unfinished")."""
        done, failed = [list(self._ends.values()).count(status) for status in ("TERMINATED", "ERROR")]
        total = max(self.total_trials, len(trials or []), done + failed)
        running = sum(t.status == "RUNNING" and t.trial_id not in self._ends for t in trials or [])
        middle = f"{total - done - failed} unfinished" if trials is None else f"{running} running"
        text = f"{self.label}: {done}/{total} done · {middle} · {failed} failed"
        if self._best is not None:
            text += f" · best {self.metric} {self._best[0]:.4f} ({self._best[1]})"
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                TextColumn("epochs"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=console(), transient=False, refresh_per_second=2)
            self._progress.start()
            self._progress.add_task(self.label, total=self.total_epochs)
            _live.add(self)
        self._progress.update(self._progress.task_ids[0], completed=sum(self._done_epochs.values()), description=text)

    def _record(self, trial: Any, result: dict[str, Any]) -> None:
        self._done_epochs[trial.trial_id] = float(result.get(self.epoch_key) or 0)
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value) and (self._best is None or value > self._best[0]):
            self._best = (float(value), self.name(trial, brackets=False) or str(trial.trial_id))

    def name(self, trial: Any, brackets: bool = True) -> str:
        """What a trial is about, for its lines: :func:`trial_label` of its config."""
        text = escape(trial_label(trial.config, self.grid_keys))  # (a list value is no rich markup)
        return f"({text})" if text and brackets else text

    def _ended(self, trials: list[Any], trial: Any, status: str, line: str) -> None:
        """Print ``line``; a trial that ended before its last epoch (ASHA, failure) takes its remaining work."""
        self._ends[trial.trial_id] = status
        self._refresh(trials)
        console().print(line)
        if self.total_epochs and self.total_trials:
            missing = self.total_epochs / self.total_trials - self._done_epochs.get(trial.trial_id, 0.0)
            task = self._progress.tasks[0]
            if missing > 0:
                self._progress.update(task.id, total=max(task.completed, (task.total or 0) - missing))

    # -- Tune hooks ------------------------------------------------------------------------------------------
    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        for t in trials:  # restored trials count with the epochs they had reported
            if t.trial_id not in self._done_epochs and t.last_result:
                self._record(t, t.last_result)
            if t.status in ("TERMINATED", "ERROR"):
                self._ends[t.trial_id] = t.status
            elif t.status in ("RUNNING", "PENDING") and self._ends.get(t.trial_id) == "ERROR":
                del self._ends[t.trial_id]  # an errored trial resumed on restore
        self._refresh(trials)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        self._record(trial, result)
        self._refresh(trials)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"
        self._ended(trials, trial, "TERMINATED", f"[green]done[/] {trial.trial_id} {self.name(trial)}: "
                                                 f"{self.metric} {shown} in {result.get('time_total_s', 0):.0f} s")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trials, trial, "ERROR", f"[red]failed[/] {trial.trial_id} {self.name(trial)} after "
                                            f"{trial.num_failures} attempt(s): {error_line(trial)}")

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._refresh(trials)
        console().print(f"[yellow]retrying[/] {trial.trial_id} {self.name(trial)} from its last checkpoint "
                        f"(failure {trial.num_failures}): {error_line(trial)}")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.stop()  # (after an interruption Tune has already marked its trials stopped: count them "unfinished")


#: the key of an HPO trial's config holding its Optuna trial number (the ``#`` of the final Pareto table)
OPTUNA_TRIAL_KEY = "optuna_trial"


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trial_label(config: Any, grid_keys: Sequence[str] = ()) -> str:
    """A trial's identity in a few characters: a stability search's grid values and seed (``k=2 seed 0``), an HPO
    configuration's Optuna number and parameters (``#3 arch_lr=0.001 k=4``), an evaluation's source and seed."""
    config = config if isinstance(config, dict) else {}
    params, spec, search = config.get("params"), config.get("spec"), config.get("search")
    if isinstance(params, dict):
        number = config.get(OPTUNA_TRIAL_KEY)
        parts = ([] if number is None else [f"#{number}"]) + [f"{k}={_value(v)}" for k, v in sorted(params.items())]
    elif isinstance(spec, dict):
        parts = [str(spec.get("source", "")), f"seed {spec.get('seed')}"]
    else:
        grid = [f"{k}={_value(search.get(k))}" for k in grid_keys] if isinstance(search, dict) else []
        parts = grid + ([f"seed {config['seed']}"] if "seed" in config else [])
    return " ".join(parts)


def error_line(trial: Any) -> str:
    """The last line of a trial's latest error (``ExceptionType: message``), or a placeholder."""
    readers = (lambda: Path(trial.error_file).read_text(encoding="utf-8", errors="replace"),  # the driver's copy
               lambda: trial.get_error())  # (written before callbacks run), else storage's: maybe an older failure
    for read in readers:
        with contextlib.suppress(Exception):  # missing, unreadable or remote
            if text := read():
                return last_error_line(text)
    return "unknown error (see the trial's error.txt)"


def last_error_line(text: str) -> str:
    """``ExceptionType: message`` from a traceback text (the last line that looks like one)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head and " " not in head and (head.endswith(("Error", "Exception", "Failure", "Interrupt"))
                                         or head.split(".")[-1][:1].isupper() and ":" in line):
            return line[:500]
    return lines[-1][:500] if lines else "unknown error"
