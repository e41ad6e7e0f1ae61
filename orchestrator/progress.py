"""Live terminal progress of a Tune experiment with ``rich``: trials running/done/failed, best so far, ETA.

:class:`TuneProgress` is a Tune :class:`~ray.tune.Callback` on the driver. The bar counts *epochs* over all
trials (so the ETA moves with the work, not with whole trials), and its line shows the trial counts and the best
value of the tracked metric. Finished and failed trials also get one printed line each, which is all a
non-terminal (a log file, CI) sees besides the final bar.

Tune pickles its callbacks into the experiment state and hands the unpickled copies back on ``Tuner.restore``,
so the callback keeps only plain settings there; the ``rich`` objects are made on first use and dropped on
pickling. :func:`stop_all` ends every live display of this process (after ``fit`` returns, whichever copy ran).
"""

from __future__ import annotations

import math
import os
import time
import weakref
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

try:
    from ray.tune import Callback
except ImportError:  # pragma: no cover - ray is a dependency
    Callback = object  # type: ignore[misc,assignment]

_console: Console | None = None
_live: "weakref.WeakSet[TuneProgress]" = weakref.WeakSet()


def console() -> Console:
    """The console every command of the orchestrator prints on (stdout)."""
    global _console
    if _console is None:
        _console = Console(highlight=False)
        if not _console.is_terminal and "COLUMNS" not in os.environ:
            _console = Console(highlight=False, width=140)  # logs and pipes: room for the stability table
    return _console


def stop_all() -> None:
    """Stop every live progress display of this process (idempotent)."""
    for cb in list(_live):
        cb.stop()


class TuneProgress(Callback):
    """``label`` names the experiment; ``total_epochs`` is the work of all trials in epochs (None: unknown);
    ``metric``/``mode`` pick the "best so far"; ``epoch_key`` is the result key counting a trial's epochs;
    ``describe`` turns a trial's config into a short label for the printed lines."""

    def __init__(self, label: str, total_trials: int, total_epochs: int | None, metric: str = "val_acc",
                 mode: str = "max", epoch_key: str = "epoch", steps_per_trial_key: str | None = None):
        self.label = label
        self.total_trials = total_trials
        self.total_epochs = total_epochs
        self.metric = metric
        self.mode = mode
        self.epoch_key = epoch_key
        self.steps_per_trial_key = steps_per_trial_key
        self._init_runtime()

    # -- pickling: plain settings only ------------------------------------------------------------------------
    def _init_runtime(self) -> None:
        self._progress: Progress | None = None
        self._task: Any = None
        self._done_epochs: dict[str, float] = {}
        self._finished: set[str] = set()
        self._failed: set[str] = set()
        self._best: tuple[float, str] | None = None
        self._last_draw = 0.0

    def __getstate__(self) -> dict[str, Any]:
        keep = ("label", "total_trials", "total_epochs", "metric", "mode", "epoch_key", "steps_per_trial_key")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- drawing ---------------------------------------------------------------------------------------------
    def _ensure(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                TextColumn("epochs"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=console(), transient=False, refresh_per_second=2)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total_epochs,
                                                 completed=sum(self._done_epochs.values()))
            _live.add(self)
        return self._progress

    def stop(self) -> None:
        if self._progress is not None:
            self._refresh(force=True)
            self._progress.stop()
            self._progress = None
        _live.discard(self)

    def _describe(self, trials: list[Any] | None) -> str:
        """Counts from this callback's own records (Tune marks interrupted trials stopped before the end)."""
        done, failed = len(self._finished), len(self._failed)
        total = max(self.total_trials, len(trials or []), done + failed)
        if trials is None:
            middle = f"{total - done - failed} unfinished"
        else:
            running = sum(1 for t in trials if t.status == "RUNNING"
                          and t.trial_id not in self._finished and t.trial_id not in self._failed)
            middle = f"{running} running"
        text = f"{self.label}: {done}/{total} done · {middle} · {failed} failed"
        if self._best is not None:
            text += f" · best {self.metric} {self._best[0]:.4f} ({self._best[1]})"
        return text

    def _refresh(self, trials: list[Any] | None = None, force: bool = False) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.5:
            return
        self._last_draw = now
        self._progress.update(self._task, completed=sum(self._done_epochs.values()),
                              description=self._describe(trials))

    def _epochs_of(self, trial: Any) -> float:
        result = trial.last_result or {}
        value = result.get(self.epoch_key)
        if self.steps_per_trial_key and result.get(self.steps_per_trial_key) is not None:
            value = result.get(self.steps_per_trial_key)
        return float(value or 0)

    def _track_best(self, trial: Any, result: dict[str, Any]) -> None:
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        better = self._best is None or (value > self._best[0] if self.mode == "max" else value < self._best[0])
        if better:
            self._best = (float(value), str(trial.trial_id))

    # -- Tune hooks ------------------------------------------------------------------------------------------
    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._ensure()
        for t in trials:  # restored trials count with the epochs they had reported
            if t.trial_id not in self._done_epochs and t.last_result:
                self._done_epochs[t.trial_id] = self._epochs_of(t)
                self._track_best(t, t.last_result)
            if t.status == "TERMINATED":
                self._finished.add(t.trial_id)
            elif t.status == "ERROR":
                self._failed.add(t.trial_id)
            elif t.status in ("RUNNING", "PENDING"):
                self._failed.discard(t.trial_id)  # an errored trial resumed on restore
        self._refresh(trials)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        self._ensure()
        value = result.get(self.epoch_key)
        if self.steps_per_trial_key and result.get(self.steps_per_trial_key) is not None:
            value = result.get(self.steps_per_trial_key)
        self._done_epochs[trial.trial_id] = float(value or 0)
        self._track_best(trial, result)
        self._refresh(trials)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ensure()
        self._finished.add(trial.trial_id)
        result = trial.last_result or {}
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"
        console().print(f"[green]done[/] {trial.trial_id} {_short(trial.config)}: {self.metric} {shown} "
                        f"in {result.get('time_total_s', 0):.0f} s")
        self._drop_remaining(trial)
        self._refresh(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ensure()
        self._failed.add(trial.trial_id)
        console().print(f"[red]failed[/] {trial.trial_id} {_short(trial.config)} after "
                        f"{trial.num_failures} attempt(s): {error_line(trial)}")
        self._drop_remaining(trial)
        self._refresh(trials, force=True)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ensure()
        console().print(f"[yellow]retrying[/] {trial.trial_id} {_short(trial.config)} from its last checkpoint "
                        f"(failure {trial.num_failures}): {error_line(trial)}")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # (after an interruption Tune has already marked its trials stopped: keep the last description)
        self._refresh(None, force=True)
        self.stop()

    def _drop_remaining(self, trial: Any) -> None:
        """A trial that ended before its last epoch (stopped by ASHA, failed) takes its remaining work along."""
        if self._progress is None or not self.total_epochs or not self.total_trials:
            return
        per_trial = self.total_epochs / self.total_trials
        missing = per_trial - self._done_epochs.get(trial.trial_id, 0.0)
        if missing > 0:
            task = self._progress.tasks[0]
            self._progress.update(self._task, total=max(task.completed, (task.total or 0) - missing))


def _short(config: dict[str, Any]) -> str:
    """A trial's identity in a few characters: its seed and evaluation source, where it has them."""
    parts = []
    spec = config.get("spec") if isinstance(config, dict) else None
    params = config.get("params") if isinstance(config, dict) else None
    if isinstance(params, dict):
        parts.extend(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
    elif isinstance(spec, dict):
        parts.append(str(spec.get("source", "")))
        parts.append(f"seed {spec.get('seed')}")
    elif isinstance(config, dict) and "seed" in config:
        parts.append(f"seed {config['seed']}")
    return "(" + ", ".join(parts) + ")" if parts else ""


def error_line(trial: Any) -> str:
    """The last line of a trial's latest error (``ExceptionType: message``), or a placeholder."""
    text = None
    path = getattr(trial, "error_file", None)  # the driver's own copy, written before callbacks run
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            text = None
    if not text:
        try:
            text = trial.get_error()  # from storage (synced later, so possibly an older failure)
        except Exception:  # noqa: BLE001 - the error file may be unreadable or remote
            text = None
    if not text:
        return "unknown error (see the trial's error.txt)"
    return last_error_line(text)


def last_error_line(text: str) -> str:
    """``ExceptionType: message`` from a traceback text (the last line that looks like one)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head and " " not in head and (head.endswith(("Error", "Exception", "Failure", "Interrupt"))
                                         or head.split(".")[-1][:1].isupper() and ":" in line):
            return line[:500]
    return lines[-1][:500] if lines else "unknown error"
