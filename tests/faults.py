"""Fault injectors for tests: :class:`orchestrator.run.RunCallback` objects that tests hand to a run or a sweep
(``run_stability(..., callbacks=[...])``, ``run_distributed(..., callbacks=[...])``). Production installs none."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray.cloudpickle

from orchestrator.run import RunCallback, SearchRun

# Ray workers cannot import this test module: ship its code with the pickled callbacks.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class InjectedFailure(RuntimeError):
    """The crash a test asked for."""


@dataclass
class FailAtEpoch(RunCallback):
    """Raise before epoch ``epoch`` (1-based) of the searches with these seeds (all when empty); with ``once``,
    only in an attempt that did not resume from a checkpoint (so the retry succeeds)."""

    epoch: int
    seeds: frozenset = field(default_factory=frozenset)
    once: bool = False

    def before_epoch(self, run: SearchRun) -> None:
        if self.seeds and run.global_config.seed not in self.seeds:
            return
        if self.once and run.resumed_from_epoch:
            return
        if run.searcher.epoch + 1 == self.epoch:
            raise InjectedFailure(f"injected failure before epoch {self.epoch}; this attempt started from epoch "
                                  f"{run.resumed_from_epoch}")


@dataclass
class KillRank(RunCallback):
    """Rank ``rank`` exits (``os._exit(1)``) at the start of epoch ``epoch``, once (``marker`` records that it did),
    after three Ray Train health-check intervals, so the controller has registered the previous epoch's checkpoint
    and the restarted group provably resumes from it."""

    rank: int
    epoch: int
    marker: str
    interval_s: float = 0.5

    def before_epoch(self, run: SearchRun) -> None:
        marker = Path(self.marker)
        if run.rank != self.rank or run.searcher.epoch + 1 != self.epoch or marker.exists():
            return
        marker.write_text(f"rank {run.rank} killed in epoch {self.epoch}\n", encoding="utf-8")
        time.sleep(3 * self.interval_s + 1)
        sys.stderr.flush()
        os._exit(1)
