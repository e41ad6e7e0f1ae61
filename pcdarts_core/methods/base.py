"""The hooks a search method may change. The defaults are PC-DARTS (Xu et al., ICLR 2020).

A method subclasses :class:`SearchMethod` and overrides only the hooks its paper changes: the arch weighting
(how alphas become op/edge weights), the network it builds, the per-epoch schedule, the arch and weight steps,
the lr schedule, or the final derivation.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from .. import architect
from ..architect import StepContext
from ..config import MethodOptions, SearchConfig
from ..genotypes import Genotype
from ..ops import PRIMITIVES
from ..spaces import get_space
from ..supernet import ArchWeighting, SearchNetwork

Batch = tuple[torch.Tensor, torch.Tensor]


class SearchContext(StepContext, Protocol):
    """What the epoch-level hooks need beyond a step's :class:`~pcdarts_core.architect.StepContext`: the epoch,
    the number of classes, and rebuilding the network with fresh optimizers (P-DARTS's stages). ``search.Searcher``
    provides it."""

    epoch: int
    num_classes: int

    def build_network(self, net: SearchNetwork | None = None) -> SearchNetwork: ...


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

    def edge_primitives(self, cfg: SearchConfig) -> Sequence[str] | dict[str, list[tuple[str, ...]]]:
        """The supernet's candidate ops: this method's set, restricted per edge by the search space (S1-S4)."""
        return get_space(cfg.search_space).edge_primitives(self.primitives(cfg))

    def static_graph(self, cfg: SearchConfig) -> bool:
        """Whether the supernet's forward is the same computation every step (no sampling, no Python-level
        value that changes during a stage), so ``compile`` may capture it as one graph; otherwise only its
        fixed regions are compiled (see compilation.py)."""
        return cfg.k == 1 or cfg.channel_sampling == "fixed"

    def capturable(self, cfg: SearchConfig) -> bool:
        """Whether ``compile`` may capture the whole bilevel step as one graph: a static forward and the
        first-order update (the second-order update's virtual step runs the network functionally on copies of
        its buffers, three extra forwards that stay eager; its forward is compiled whole instead)."""
        return self.static_graph(cfg) and cfg.order == "first"

    def build_network(self, cfg: SearchConfig, num_classes: int) -> SearchNetwork:
        """The search space's supernet (PC-DARTS's cells, or NAS-Bench-201's) with this method's weighting."""
        return get_space(cfg.search_space).supernet(self, cfg, num_classes)

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

    def arch_active(self, ctx: SearchContext) -> bool:
        """Whether this epoch updates the arch: after ``warmup_epochs`` weights-only epochs (PC-DARTS Sec. 4.1)."""
        return ctx.epoch >= ctx.config.warmup_epochs

    def on_epoch_start(self, ctx: SearchContext, epoch: int) -> None:
        """Per-epoch schedules (temperatures, dropout rates, stage changes). Nothing for PC-DARTS."""

    def epoch_metrics(self, ctx: SearchContext) -> dict[str, Any]:
        """Extra per-epoch metrics of this method (temperature, stage, ...)."""
        return {}

    # -- steps -----------------------------------------------------------------------------------------------
    def arch_step(self, ctx: StepContext, train: Batch, val: Batch) -> torch.Tensor:
        """First-order (PC-DARTS default) or second-order (DARTS unrolled) update of the arch parameters; the
        loss as a detached device tensor (a step never reads a value back to the host)."""
        if ctx.config.order == "second":
            return architect.second_order_step(ctx, train, val)
        return architect.first_order_step(ctx, val)

    def weight_step(self, ctx: StepContext, train: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step of the supernet weights; returns (loss, logits), detached device tensors."""
        return architect.weight_step(ctx, train)

    # -- derivation and state --------------------------------------------------------------------------------
    def genotype(self, net: SearchNetwork) -> Genotype:
        return net.genotype()

    def state(self, ctx: SearchContext) -> dict[str, Any]:
        """What must be saved, beyond model and optimizers, to resume (e.g. the P-DARTS stage)."""
        return {}

    def restore(self, ctx: SearchContext, state: dict[str, Any]) -> None:
        """Rebuild whatever ``state`` describes before the model's weights are loaded."""

    def criterion(self, cfg: SearchConfig) -> nn.Module:
        return nn.CrossEntropyLoss()
