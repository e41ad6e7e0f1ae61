"""Ray dashboard metrics of running searches: ``record_epoch(metrics, run=..., trial=...)`` once per epoch.

Re-run epochs after a restart count again; the epoch time includes validation, the step time (arch + weights, one
global batch) does not. A finished trial's gauges leave the endpoint about two report intervals after it stops."""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Mapping

#: metric name -> (kind, description, key in the search loop's per-epoch metrics)
DEFINITIONS: dict[str, tuple[str, str, str]] = {
    "pcdarts_epochs_done": ("counter", "Search epochs completed", "epoch"),
    "pcdarts_epoch_time_seconds": ("gauge", "Wall time of the last search epoch (s)", "epoch_time_s"),
    "pcdarts_step_time_seconds": ("gauge", "Mean time of one bilevel step in the last epoch (s)", "step_time_s"),
    "pcdarts_throughput_images_per_second": ("gauge", "Training images per second, all ranks together", "throughput"),
    "pcdarts_arch_entropy": ("gauge", "Mean entropy of the op distributions (nats)", "arch_entropy"),
    "pcdarts_skip_connect_normal": ("gauge", "Skip-connects in the current normal cell", "n_skip_normal"),
    "pcdarts_val_accuracy": ("gauge", "Supernet top-1 accuracy on the arch split", "val_acc"),
}

_instruments: dict[str, Any] = {}
_lock = threading.Lock()


def record_epoch(metrics: Mapping[str, Any], *, run: str, trial: str) -> bool:
    """Record one epoch's ``metrics`` tagged ``run`` and ``trial`` (missing, non-finite: skipped); False outside Ray."""
    import ray

    tags = {"run": run, "trial": trial}
    for key, value in tags.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"record_epoch needs a non-empty {key} tag, got {value!r}")
    if not ray.is_initialized():
        return False
    with _lock:  # Ray registers each name once per process
        if not _instruments:
            from ray.util.metrics import Counter, Gauge

            made = {name: (Counter if kind == "counter" else Gauge)(name, description=about, tag_keys=tuple(tags))
                    for name, (kind, about, _) in DEFINITIONS.items()}
            _instruments.update(made)
    for name, (kind, _, key) in DEFINITIONS.items():
        value = metrics.get(key)
        with contextlib.suppress(TypeError, ValueError):  # None or text: skipped too (left as they are)
            value = math.nan if isinstance(value, bool) else float(value)
        if kind == "counter":
            _instruments[name].inc(1.0, tags=tags)
        elif isinstance(value, float) and math.isfinite(value):
            _instruments[name].set(value, tags=tags)
    return True
