"""sharpDARTS (Hundt, Jain and Hager, arXiv 1903.09900, 2019): DARTS with Cosine Power Annealing of the weight lr
and Max-W weighting of the mixed ops, optionally over the SharpSepConv op set.

Cosine Power Annealing: lr_t = lr_min + (lr_max - lr_min) * norm(p^(c_t + 1)),
c_t = (1 + cos(pi t / T)) / 2, norm = min-max normalization over the schedule, so lr_0 = lr_max and lr_T = lr_min;
a larger power p decays faster early, p = 1 is plain cosine annealing.

Max-W regularization: an edge computes sum_o (1 - max_w + w_o) * op_o(x) with w = softmax(alpha): the strongest op gets
weight 1 and the others keep their gap to it, so the weighting no longer scales every path down.

Defaults follow the official search commands: batch 48, lr 0.025 -> 1e-4, p = 2, a 5-epoch lr warm-up, arch lr
3e-4, arch trained from the start, 120 epochs, C=16, 8 cells, K=1, no edge normalization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import MethodOptions, SearchConfig
from ..ops import PRIMITIVES, SHARP_PRIMITIVES
from ..supernet import ArchWeighting
from .base import SearchMethod

PRIMITIVE_SETS: dict[str, tuple[str, ...]] = {"darts": PRIMITIVES, "sharp": SHARP_PRIMITIVES}


@dataclass(frozen=True)
class SharpDartsOptions(MethodOptions):
    power: float = 2.0  # p of Cosine Power Annealing (1 = cosine)
    weighting: str = "max_w"  # 'max_w' (Max-W) or 'softmax' (DARTS's scalar weighting)
    primitives: str = "darts"  # 'darts' or 'sharp' (SharpSepConv in place of the separable convs)


def cosine_power_factor(t: float, total: float, power: float) -> float:
    """norm(p^(c_t + 1)) in [0, 1]: 1 at t = 0, 0 at t = total.

    Over the whole schedule c runs from 1 to 0, so the min-max normalization is
    (p^(c+1) - p) / (p^2 - p) = (p^c - 1) / (p - 1), written with expm1 for p near 1; its limit at p = 1 is c itself.
    """
    c = (1 + math.cos(math.pi * t / total)) / 2
    if power == 1.0:
        return c
    log_p = math.log(power)
    return math.expm1(c * log_p) / math.expm1(log_p)


class MaxWWeighting(ArchWeighting):
    """Max-W: (1 - max_w + w_o) on each op of an edge, w = softmax(alpha) over the edge's ops."""

    def op_weights(self, alphas: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(alphas, dim=-1)
        return 1 - w.max(dim=-1, keepdim=True).values + w


class SharpDarts(SearchMethod):
    name = "sharpdarts"
    options_type = SharpDartsOptions
    summary = "Cosine Power Annealing of the weight lr, Max-W weighting (1 - max w + w), optional SharpSepConv ops"

    def defaults(self, dataset: str) -> dict[str, Any]:
        d: dict[str, Any] = {"k": 1, "edge_norm": False, "batch_size": 48, "lr": 0.025, "lr_min": 1e-4,
                             "lr_warmup_epochs": 5, "arch_lr": 3e-4, "warmup_epochs": 0, "epochs": 120}
        if dataset == "synthetic":
            d.update(batch_size=64, lr=0.05, arch_lr=3e-3, epochs=10, lr_warmup_epochs=1)
        return d

    def validate(self, cfg: SearchConfig) -> None:
        o: SharpDartsOptions = cfg.options  # type: ignore[assignment]
        if o.power < 1:
            raise ValueError(f"sharpDARTS power must be >= 1 (1 is cosine annealing), got {o.power}")
        if o.weighting not in ("max_w", "softmax"):
            raise ValueError(f"sharpDARTS weighting must be 'max_w' or 'softmax', got {o.weighting!r}")
        if o.primitives not in PRIMITIVE_SETS:
            raise ValueError(f"sharpDARTS primitives must be one of {', '.join(PRIMITIVE_SETS)}, got {o.primitives!r}")
        if cfg.lr_warmup_epochs >= cfg.epochs:
            raise ValueError(f"lr_warmup_epochs={cfg.lr_warmup_epochs} leaves no epoch for the annealing "
                             f"(epochs={cfg.epochs})")

    def primitives(self, cfg: SearchConfig) -> tuple[str, ...]:
        return PRIMITIVE_SETS[cfg.options.primitives]  # type: ignore[attr-defined]

    def weighting(self, cfg: SearchConfig) -> ArchWeighting:
        return MaxWWeighting() if cfg.options.weighting == "max_w" else ArchWeighting()  # type: ignore[attr-defined]

    def lr_factor(self, cfg: SearchConfig, epoch: int) -> float:
        """Linear lr warm-up, then Cosine Power Annealing from ``lr`` to ``lr_min`` over the remaining epochs."""
        warm = cfg.lr_warmup_epochs
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        floor = cfg.lr_min / cfg.lr
        power = cfg.options.power  # type: ignore[attr-defined]
        return floor + (1 - floor) * cosine_power_factor(epoch - warm, max(1, cfg.epochs - warm), power)


METHOD = SharpDarts()
