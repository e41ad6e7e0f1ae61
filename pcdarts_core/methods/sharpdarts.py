"""sharpDARTS (Hundt, Jain and Hager, arXiv 1903.09900, 2019): DARTS with Cosine Power Annealing of the weight lr,
Max-W weighting of the mixed ops, and sharpDARTS's own op table.

Cosine Power Annealing: lr_t = lr_min + (lr_max - lr_min) * norm(p^(c_t + 1)),
c_t = (1 + cos(pi t / T)) / 2, norm = min-max normalization over the schedule, so lr_0 = lr_max and lr_T = lr_min;
a larger power p decays faster early, p = 1 is plain cosine annealing.

Max-W regularization: an edge computes sum_o (1 - max_w + w_o) * op_o(x) with w = softmax(alpha): the strongest op gets
weight 1 and the others keep their gap to it, so the weighting no longer scales every path down.

Checked against the official code (ahundt/sharpDARTS: README's "Max-W Regularization Search" command,
``cnn/train_search.py``, ``cnn/operations.py``, ``cnn/model_search.py``, ``cnn/cosine_power_annealing.py``,
``cnn/utils.py``):

* search settings: batch 48, 120 epochs, C=16, 8 cells, 4 nodes, lr 0.025 -> 1e-4 with p = 2 and a 5-epoch warm-up,
  arch Adam lr 3e-4 from the first epoch, weighting ``max_w``;
* search data: ``--cutout --autoaugment``: pad 4 (grey fill 128), random crop, flip, AutoAugment's CIFAR-10 policy,
  normalize, cutout 16 (``augment='autoaugment'``, ``cutout=16``: the defaults on CIFAR here);
* ops: ``--primitives DARTS_PRIMITIVES`` built from the default ``--ops OPS`` table (``op_table='sharpdarts'``): its
  ``sep_conv`` is DARTS's; its ``dil_conv_kxk`` is a two-block SharpSepConv with dilation 2 on the first depthwise
  conv (DARTS's is one block) and its ``avg_pool_3x3`` counts the zero padding (PyTorch's default; DARTS's does not).
  They are named ``sharp_dil_conv_kxk`` / ``sharp_avg_pool_3x3`` here so that a genotype says which op it means.
  ``op_table='darts'`` searches DARTS's own ops instead;
* the lr of epoch i (0-based) is entry i of ``cosine_power_annealing(epochs, ..., warmup_epochs)``: epochs 1..w+1
  (1-based) ramp linearly to lr_max, then epoch j runs at t = j - w of T = epochs - w (t = 1 is skipped), the last
  epoch at lr_min; the normalization is over the t values that occur (without warm-up the first epoch's t = 1).

Difference kept: the official loop draws each arch batch as ``next(iter(valid_queue))`` (a fresh random batch with
replacement); here the arch batches cycle through the arch split, as in DARTS's and P-DARTS's later code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import MethodOptions, SearchConfig
from ..ops import PRIMITIVES, SHARPDARTS_PRIMITIVES
from ..supernet import ArchWeighting
from .base import SearchMethod

OP_TABLES: dict[str, tuple[str, ...]] = {"sharpdarts": SHARPDARTS_PRIMITIVES, "darts": PRIMITIVES}


@dataclass(frozen=True)
class SharpDartsOptions(MethodOptions):
    power: float = 2.0  # p of Cosine Power Annealing (1 = cosine)
    weighting: str = "max_w"  # 'max_w' (Max-W) or 'softmax' (DARTS's scalar weighting)
    # 'sharpdarts' (the official OPS table), 'darts' (DARTS's ops) or 'auto': the official table in the DARTS
    # space, DARTS's ops in the reduced spaces (S1-S4, NB201), whose per-edge op sets are named in DARTS's ops
    op_table: str = "auto"


def _power_curve(c: float, power: float) -> float:
    """p^(c+1) up to the affine map that the min-max normalization removes: (p^c - 1) / (p - 1), or c at p = 1."""
    if power == 1.0:
        return c
    log_p = math.log(power)
    return math.expm1(c * log_p) / math.expm1(log_p)


def cosine_power_factor(t: float, total: float, power: float, t_first: float = 0.0) -> float:
    """norm(p^(c_t + 1)) in [0, 1] with c_t = (1 + cos(pi t / total)) / 2: 0 at t = total, 1 at t = ``t_first``
    (the normalization spans the t values of the schedule, from ``t_first`` to ``total``)."""
    def c(u: float) -> float:
        return (1 + math.cos(math.pi * u / total)) / 2

    top = _power_curve(c(t_first), power)
    return _power_curve(c(t), power) / top if top > 0 else 1.0


def official_lr_factor(epoch: int, epochs: int, warmup: int, power: float) -> float:
    """Entry ``epoch`` (0-based) of the official ``cosine_power_annealing(epochs, warmup_epochs=warmup)``, as a
    fraction of the way from lr_min to lr_max."""
    j = epoch + 1  # the official schedule counts epochs from 1
    if warmup > 0 and j <= warmup + 1:
        return j / (warmup + 1)
    return cosine_power_factor(j - warmup, epochs - warmup, power, t_first=0.0 if warmup > 0 else 1.0)


class MaxWWeighting(ArchWeighting):
    """Max-W: (1 - max_w + w_o) on each op of an edge, w = softmax(alpha) over the edge's ops."""

    def op_weights(self, alphas: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(alphas, dim=-1)
        return 1 - w.max(dim=-1, keepdim=True).values + w


class SharpDarts(SearchMethod):
    name = "sharpdarts"
    options_type = SharpDartsOptions
    summary = ("Cosine Power Annealing of the weight lr, Max-W weighting (1 - max w + w), sharpDARTS's op table "
               "(two-block dilated convs), AutoAugment + cutout on the search data")

    def defaults(self, dataset: str) -> dict[str, Any]:
        d: dict[str, Any] = {"k": 1, "edge_norm": False, "batch_size": 48, "lr": 0.025, "lr_min": 1e-4,
                             "lr_warmup_epochs": 5, "arch_lr": 3e-4, "warmup_epochs": 0, "epochs": 120}
        if dataset in ("cifar10", "cifar100"):
            d.update(augment="autoaugment", cutout=16)
        if dataset == "synthetic":
            d.update(batch_size=64, lr=0.05, arch_lr=3e-3, epochs=10, lr_warmup_epochs=1)
        return d

    def validate(self, cfg: SearchConfig) -> None:
        o: SharpDartsOptions = cfg.options  # type: ignore[assignment]
        if o.power < 1:
            raise ValueError(f"sharpDARTS power must be >= 1 (1 is cosine annealing), got {o.power}")
        if o.weighting not in ("max_w", "softmax"):
            raise ValueError(f"sharpDARTS weighting must be 'max_w' or 'softmax', got {o.weighting!r}")
        if o.op_table not in (*OP_TABLES, "auto"):
            raise ValueError(f"sharpDARTS op_table must be one of auto, {', '.join(OP_TABLES)}, got {o.op_table!r}")
        if cfg.lr_warmup_epochs >= cfg.epochs:
            raise ValueError(f"lr_warmup_epochs={cfg.lr_warmup_epochs} leaves no epoch for the annealing "
                             f"(epochs={cfg.epochs})")

    def primitives(self, cfg: SearchConfig) -> tuple[str, ...]:
        table = cfg.options.op_table  # type: ignore[attr-defined]
        if table == "auto":
            table = "sharpdarts" if cfg.search_space == "darts" else "darts"
        return OP_TABLES[table]

    def weighting(self, cfg: SearchConfig) -> ArchWeighting:
        return MaxWWeighting() if cfg.options.weighting == "max_w" else ArchWeighting()  # type: ignore[attr-defined]

    def lr_factor(self, cfg: SearchConfig, epoch: int) -> float:
        """The official schedule: linear warm-up to ``lr``, then Cosine Power Annealing to ``lr_min``."""
        floor = cfg.lr_min / cfg.lr
        power = cfg.options.power  # type: ignore[attr-defined]
        return floor + (1 - floor) * official_lr_factor(epoch, cfg.epochs, cfg.lr_warmup_epochs, power)


METHOD = SharpDarts()
