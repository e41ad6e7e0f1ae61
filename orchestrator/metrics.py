"""Ray dashboard metrics of running searches: ``record_epoch(metrics, run=..., trial=...)`` once per epoch.

Custom metrics through :mod:`ray.util.metrics`, tagged by ``run`` (the experiment or run name) and ``trial`` (the
trial id), exported by every node's metrics agent in Prometheus format (the dashboard's Metrics view and Grafana
read them from there; ``ray metrics launch-prometheus`` starts a local Prometheus):

==============================================  ========  =============================================
name                                            kind      value
==============================================  ========  =============================================
``pcdarts_epochs_done``                         Counter   epochs completed (re-run epochs after a
                                                          restart count again)
``pcdarts_epoch_time_seconds``                  Gauge     wall time of the last epoch (incl. validation)
``pcdarts_step_time_seconds``                   Gauge     mean time of one bilevel step (arch + weights, one
                                                          global batch) in the last epoch, validation excluded
``pcdarts_throughput_images_per_second``        Gauge     training images per second over all ranks
``pcdarts_arch_entropy``                        Gauge     mean entropy of the op distributions (nats)
``pcdarts_skip_connect_normal``                 Gauge     skip-connects in the current normal cell
``pcdarts_val_accuracy``                        Gauge     supernet accuracy on the arch split
==============================================  ========  =============================================

Outside a Ray process (``python -m orchestrator.search single``) recording is a no-op, so the search loop can
call it unconditionally. The sweep can call it from its trainable too.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Mapping

TAG_KEYS = ("run", "trial")

#: metric name -> (kind, description, key in the search loop's per-epoch metrics)
DEFINITIONS: dict[str, tuple[str, str, str]] = {
    "pcdarts_epochs_done": ("counter", "Search epochs completed", "epoch"),
    "pcdarts_epoch_time_seconds": ("gauge", "Wall time of the last search epoch (s)", "epoch_time_s"),
    "pcdarts_step_time_seconds": ("gauge", "Mean time of one bilevel step in the last epoch (s)", "step_time_s"),
    "pcdarts_throughput_images_per_second": ("gauge", "Training images per second, all ranks together",
                                             "throughput"),
    "pcdarts_arch_entropy": ("gauge", "Mean entropy of the op distributions (nats)", "arch_entropy"),
    "pcdarts_skip_connect_normal": ("gauge", "Skip-connects in the current normal cell", "n_skip_normal"),
    "pcdarts_val_accuracy": ("gauge", "Supernet top-1 accuracy on the arch split", "val_acc"),
}

_instruments: dict[str, Any] | None = None
_lock = threading.Lock()


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized()


def instruments() -> dict[str, Any]:
    """The metric objects of this process, created once (Ray registers each name once per process)."""
    global _instruments
    with _lock:
        if _instruments is None:
            from ray.util.metrics import Counter, Gauge

            made: dict[str, Any] = {}
            for name, (kind, description, _) in DEFINITIONS.items():
                cls = Counter if kind == "counter" else Gauge
                made[name] = cls(name, description=description, tag_keys=TAG_KEYS)
            _instruments = made
        return _instruments


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def record_epoch(metrics: Mapping[str, Any], run: str, trial: str) -> bool:
    """Record one epoch's ``metrics`` (the search loop's dict) under tags ``run`` and ``trial``.

    Returns False (and records nothing) when this process is not connected to Ray. Missing or non-finite values
    are skipped; the epoch counter is incremented once per call.
    """
    if not _ray_running():
        return False
    tags = {"run": str(run), "trial": str(trial)}
    for name, metric in instruments().items():
        kind, _, key = DEFINITIONS[name]
        if kind == "counter":
            metric.inc(1.0, tags=tags)
            continue
        value = _number(metrics.get(key))
        if value is not None:
            metric.set(value, tags=tags)
    return True
