"""Ray dashboard metrics of running searches: ``record_epoch(metrics, run=..., trial=...)`` once per epoch.

Custom metrics through :mod:`ray.util.metrics`, tagged by ``run`` (the experiment name: a sweep's or HPO run's
``--name``, a single or distributed run's name) and ``trial`` (the trial id; the run name for a single or
distributed run), exported by every node's metrics agent in Prometheus format (the dashboard's Metrics view and
Grafana read them from there; ``ray metrics launch-prometheus`` starts a local Prometheus). Ray 2.60 prefixes
every custom metric with its namespace ``ray_`` and Prometheus adds ``_total`` to counters, so the names a scrape
shows are (checked by scraping a local cluster's endpoint in ``tests/test_failures_core.py``):

================================================  ========  =============================================
exported name                                     kind      value
================================================  ========  =============================================
``ray_pcdarts_epochs_done_total``                 Counter   epochs completed (re-run epochs after a
                                                            restart count again)
``ray_pcdarts_epoch_time_seconds``                Gauge     wall time of the last epoch (incl. validation)
``ray_pcdarts_step_time_seconds``                 Gauge     mean time of one bilevel step (arch + weights, one
                                                            global batch) in the last epoch, validation excluded
``ray_pcdarts_throughput_images_per_second``      Gauge     training images per second over all ranks
``ray_pcdarts_arch_entropy``                      Gauge     mean entropy of the op distributions (nats)
``ray_pcdarts_skip_connect_normal``               Gauge     skip-connects in the current normal cell
``ray_pcdarts_val_accuracy``                      Gauge     supernet accuracy on the arch split
================================================  ========  =============================================

Every runner records them from the core's per-epoch metrics (``step_time_s`` among them): sweep and HPO trials
(``orchestrator.trainable``; ``run`` is the experiment's name, read from the trial's storage path), distributed runs and distributed sweep trials (rank 0). Outside a Ray process (``python -m
orchestrator.search single``) recording is a no-op, so the loops can call it unconditionally. Gauges of a
finished trial disappear from the endpoint about two report intervals after its process stops reporting.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Mapping

TAG_KEYS = ("run", "trial")
#: the trial config key under which a sweep passes its experiment name to its trials
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


def record_epoch(metrics: Mapping[str, Any], *, run: str, trial: str) -> bool:
    """Record one epoch's ``metrics`` (the search loop's dict) under tags ``run`` and ``trial``.

    ``run`` must be the experiment's name and ``trial`` the trial id (``trainable.experiment_name()`` and Tune's trial id in a trial); both
    are keyword-only and must be non-empty strings. Returns False (and records nothing) when this process is not
    connected to Ray. Missing or non-finite values are skipped; the epoch counter is incremented once per call.
    """
    for key, value in (("run", run), ("trial", trial)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"record_epoch needs a non-empty {key} tag, got {value!r}")
    if not _ray_running():
        return False
    tags = {"run": run, "trial": trial}
    for name, metric in instruments().items():
        kind, _, key = DEFINITIONS[name]
        if kind == "counter":
            metric.inc(1.0, tags=tags)
            continue
        value = _number(metrics.get(key))
        if value is not None:
            metric.set(value, tags=tags)
    return True
