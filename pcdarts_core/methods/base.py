"""The hooks a search method may change. The defaults are PC-DARTS (Xu et al., ICLR 2020).

A method subclasses :class:`SearchMethod` and overrides only the hooks its paper changes: the arch weighting
(how alphas become op/edge weights), the network it builds, the per-epoch schedule, the arch and weight steps,
the lr schedule, or the final derivation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import MethodOptions, SearchConfig
from ..genotypes import Genotype
from ..ops import PRIMITIVES
from ..supernet import ArchWeighting, SearchNetwork

if TYPE_CHECKING:
    from ..search import Searcher

Batch = tuple[torch.Tensor, torch.Tensor]


class SearchMethod:
    name = "pcdarts"
    options_type: type[MethodOptions] = MethodOptions
    #: one line for the README's methods table
    summary = "partial channels (1/K) + channel shuffle, edge normalization, first-order bilevel, warm-up"

    # -- configuration ---------------------------------------------------------------------------------------
    def defaults(self, dataset: str) -> dict[str, Any]:
        """Overrides of the PC-DARTS defaults that this method's paper uses on ``dataset``."""
        return {}

    def validate(self, cfg: SearchConfig) -> None:
        """Reject settings that make no sense for this method (one-line ``ValueError``)."""

    # -- the supernet ----------------------------------------------------------------------------------------
    def primitives(self, cfg: SearchConfig) -> tuple[str, ...]:
        return PRIMITIVES

    def weighting(self, cfg: SearchConfig) -> ArchWeighting:
        return ArchWeighting()

    def static_graph(self, cfg: SearchConfig) -> bool:
        """Whether the supernet's forward is the same computation every step (no sampling, no Python-level
        value that changes during a stage), so ``compile`` may capture it as one graph; otherwise only its
        fixed regions are compiled (see compilation.py)."""
        return cfg.k == 1 or cfg.channel_sampling == "fixed"

    def build_network(self, cfg: SearchConfig, num_classes: int) -> SearchNetwork:
        return SearchNetwork(cfg.init_channels, num_classes, cfg.layers, k=cfg.k, edge_norm=cfg.edge_norm,
                             primitives=self.primitives(cfg), channel_sampling=cfg.channel_sampling,
                             stem="imagenet" if cfg.dataset == "imagenet" else "cifar",
                             weighting=self.weighting(cfg), seed=cfg.seed)

    # -- schedules -------------------------------------------------------------------------------------------
    def lr_factor(self, cfg: SearchConfig, epoch: int) -> float:
        """Weight lr of ``epoch`` as a multiple of ``cfg.lr``: linear warm-up, then cosine to ``lr_min``
        (SGDR without restarts, as DARTS and PC-DARTS use)."""
        warm = cfg.lr_warmup_epochs
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        span = max(1, cfg.epochs - warm)
        t = epoch - warm
        floor = cfg.lr_min / cfg.lr
        return floor + (1 - floor) * (1 + math.cos(math.pi * t / span)) / 2

    def arch_active(self, searcher: "Searcher") -> bool:
        """Whether this epoch updates the arch: after ``warmup_epochs`` weights-only epochs (PC-DARTS Sec. 4.1)."""
        return searcher.epoch >= searcher.config.warmup_epochs

    def on_epoch_start(self, searcher: "Searcher", epoch: int) -> None:
        """Per-epoch schedules (temperatures, dropout rates, stage changes). Nothing for PC-DARTS."""

    def epoch_metrics(self, searcher: "Searcher") -> dict[str, Any]:
        """Extra per-epoch metrics of this method (temperature, stage, ...)."""
        return {}

    # -- steps -----------------------------------------------------------------------------------------------
    def arch_step(self, searcher: "Searcher", train: Batch, val: Batch) -> float:
        """First-order (PC-DARTS default) or second-order (DARTS unrolled) update of the arch parameters."""
        from ..architect import first_order_step, second_order_step

        if searcher.config.order == "second":
            return second_order_step(searcher, train, val)
        return first_order_step(searcher, val)

    def weight_step(self, searcher: "Searcher", train: Batch) -> tuple[float, torch.Tensor]:
        """One SGD step of the supernet weights; returns (loss, logits)."""
        from ..architect import weight_step

        return weight_step(searcher, train)

    # -- derivation and state --------------------------------------------------------------------------------
    def genotype(self, net: SearchNetwork) -> Genotype:
        return net.genotype()

    def state(self, searcher: "Searcher") -> dict[str, Any]:
        """What must be saved, beyond model and optimizers, to resume (e.g. the P-DARTS stage)."""
        return {}

    def restore(self, searcher: "Searcher", state: dict[str, Any]) -> None:
        """Rebuild whatever ``state`` describes before the model's weights are loaded."""

    def criterion(self, cfg: SearchConfig) -> nn.Module:
        return nn.CrossEntropyLoss()
