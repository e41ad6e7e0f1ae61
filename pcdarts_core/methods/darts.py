"""DARTS (Liu et al., ICLR 2019): PC-DARTS with K=1 and no edge normalization (all channels, softmax over ops).

Sec. 3 / Appendix A: arch Adam lr 3e-4, batch 64, weight lr 0.025 cosine to 0.001, no arch warm-up; the
second-order (unrolled) update is ``order='second'``.
"""

from __future__ import annotations

from typing import Any

from ..config import SearchConfig
from .base import SearchMethod


class Darts(SearchMethod):
    name = "darts"
    summary = "K=1, no edge normalization, softmax over all ops; first or second order (unrolled) updates"

    def defaults(self, dataset: str) -> dict[str, Any]:
        d: dict[str, Any] = {"k": 1, "edge_norm": False, "arch_lr": 3e-4, "batch_size": 64, "lr": 0.025,
                             "lr_min": 0.001, "warmup_epochs": 0}
        if dataset == "synthetic":
            d.update(batch_size=64, lr=0.05, lr_min=0.0, arch_lr=3e-3)
        return d

    def validate(self, cfg: SearchConfig) -> None:
        if cfg.k != 1:
            raise ValueError(f"DARTS uses all channels (k=1), got k={cfg.k}; use method pcdarts for partial channels")


METHOD = Darts()
