"""P-DARTS (Chen et al., ICCV 2019, arXiv 1904.12760): progressive deepening with search-space approximation.

The search runs in stages on ever deeper supernets (5, 11, 17 cells) while the candidate ops of each
edge shrink (8 -> 5 -> 3): after a stage the lowest-weighted ops of every edge are dropped, `none` first before the
last stage. Each stage trains the weights alone for its first ``warmup_epochs`` epochs (10 of 25), with a fresh
network, fresh optimizers and its own cosine lr. Search-space regularization: dropout after every
skip-connect, at a per-stage base rate that decays during the stage, and at most M=2 skip-connects in the final
normal cell (the weakest selected skip is zeroed and the cell re-derived until the cap holds).

Everything else (K=1, softmax over ops, first-order updates) is DARTS. ``epochs`` must equal the sum of the stage
epochs; ``warmup_epochs`` counts per stage; ``layers`` of the config is unused (the stages set the depth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from ..config import MethodOptions, SearchConfig
from ..genotypes import Genotype, derive_cell, edge_op_weights
from ..ops import PRIMITIVES, Identity
from ..supernet import CELL_TYPES, SearchNetwork, validate_supernet_shape
from .base import SearchMethod

if TYPE_CHECKING:
    from ..search import Searcher


@dataclass(frozen=True)
class PdartsOptions(MethodOptions):
    stage_layers: tuple[int, ...] = (5, 11, 17)  # cells of each stage's supernet
    stage_epochs: tuple[int, ...] = (25, 25, 25)  # epochs of each stage (their sum is the config's epochs)
    stage_ops: tuple[int, ...] = (8, 5, 3)  # candidate ops per edge in each stage
    skip_dropout: tuple[float, ...] = (0.1, 0.4, 0.7)  # base dropout rate after skip-connect, per stage (CIFAR-10)
    dropout_decay: float = 0.2  # p = rate * exp(-decay * (e - warmup)) once the arch trains
    max_skip: int = 2  # M: skip-connects allowed in the final normal cell


class StageNetwork(SearchNetwork):
    """The supernet of one P-DARTS stage; derivation caps the normal cell's skip-connects at ``max_skip``."""

    def __init__(self, *args: Any, stage: int = 0, max_skip: int = 2, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stage = stage
        self.max_skip = max_skip

    def genotype(self) -> Genotype:
        steps = self.steps
        concat = tuple(range(2, 2 + steps))
        normal = capped_cell(edge_op_weights(self.alphas_normal, self.betas_normal, steps),
                             self.edge_primitives["normal"], steps, self.max_skip)
        reduce = derive_cell(edge_op_weights(self.alphas_reduce, self.betas_reduce, steps),
                             self.edge_primitives["reduce"], steps)
        return Genotype(tuple(normal), concat, tuple(reduce), concat)


def capped_cell(weights: torch.Tensor, op_names: Sequence[Sequence[str]], steps: int,
                max_skip: int) -> list[tuple[str, int]]:
    """Derive, then while more than ``max_skip`` skip-connects are selected zero the weakest selected one and
    derive again. Each round zeroes one positive weight, so it ends."""
    w = weights.clone()
    while True:
        gene = derive_cell(w, op_names, steps)
        skips = _selected_skips(w, gene, op_names, steps)
        if len(skips) <= max_skip:
            return gene
        value, weakest = min(skips)
        if value <= 0.0:  # only zeroed skips are left: the edges offer nothing else
            return gene
        w[weakest, list(op_names[weakest]).index("skip_connect")] = 0.0


def _selected_skips(w: torch.Tensor, gene: list[tuple[str, int]], op_names: Sequence[Sequence[str]],
                    steps: int) -> list[tuple[float, int]]:
    """(weight, edge) of every selected skip-connect of a derived cell."""
    out, start, k = [], 0, 0
    for node in range(steps):
        for _ in range(2):
            op, inp = gene[k]
            k += 1
            if op == "skip_connect":
                e = start + inp
                out.append((float(w[e, list(op_names[e]).index("skip_connect")]), e))
        start += node + 2
    return out


class Pdarts(SearchMethod):
    name = "pdarts"
    options_type = PdartsOptions
    summary = ("stages of 5/11/17 cells with 8/5/3 ops per edge (pruned by weight), skip-connect dropout "
               "decaying per stage, at most 2 skip-connects in the normal cell")

    def defaults(self, dataset: str) -> dict[str, Any]:
        d: dict[str, Any] = {"k": 1, "edge_norm": False, "batch_size": 96, "lr": 0.025, "lr_min": 0.0,
                             "arch_lr": 6e-4, "epochs": 75, "warmup_epochs": 10, "layers": 5}
        if dataset == "synthetic":
            # Three stages of 3/4/5 cells and 2 epochs each (1 weights-only): a quick CPU run of the mechanism.
            d.update(batch_size=64, lr=0.05, arch_lr=3e-3, epochs=6, warmup_epochs=1, layers=3,
                     options={"stage_layers": (3, 4, 5), "stage_epochs": (2, 2, 2)})
        return d

    def validate(self, cfg: SearchConfig) -> None:
        o: PdartsOptions = cfg.options  # type: ignore[assignment]
        n = len(o.stage_layers)
        if n < 1 or not (len(o.stage_epochs) == len(o.stage_ops) == len(o.skip_dropout) == n):
            raise ValueError(f"P-DARTS stage_layers, stage_epochs, stage_ops and skip_dropout must have one entry "
                             f"per stage, got {len(o.stage_layers)}, {len(o.stage_epochs)}, {len(o.stage_ops)}, "
                             f"{len(o.skip_dropout)}")
        if sum(o.stage_epochs) != cfg.epochs:
            raise ValueError(f"P-DARTS epochs={cfg.epochs} must equal the sum of stage_epochs "
                             f"{list(o.stage_epochs)} = {sum(o.stage_epochs)}")
        if any(e <= cfg.warmup_epochs for e in o.stage_epochs):
            raise ValueError(f"warmup_epochs={cfg.warmup_epochs} counts per P-DARTS stage and must be below every "
                             f"stage's epochs {list(o.stage_epochs)}")
        if cfg.k != 1:
            raise ValueError(f"P-DARTS uses all channels (k=1), got k={cfg.k}")
        if o.stage_ops[0] != len(PRIMITIVES) or any(b > a for a, b in zip(o.stage_ops, o.stage_ops[1:])):
            raise ValueError(f"P-DARTS stage_ops must start at {len(PRIMITIVES)} and never grow, got "
                             f"{list(o.stage_ops)}")
        if o.stage_ops[-1] < 1:
            raise ValueError("P-DARTS needs at least one op per edge in the last stage")
        if not all(0 <= p < 1 for p in o.skip_dropout) or o.dropout_decay < 0 or o.max_skip < 0:
            raise ValueError("P-DARTS skip_dropout must be in [0, 1), dropout_decay >= 0 and max_skip >= 0")
        for layers in o.stage_layers:
            validate_supernet_shape(cfg.init_channels, layers, cfg.k)

    # -- stages ----------------------------------------------------------------------------------------------
    @staticmethod
    def stage_of(cfg: SearchConfig, epoch: int) -> tuple[int, int]:
        """(stage, epoch within the stage) of a global epoch."""
        o: PdartsOptions = cfg.options  # type: ignore[assignment]
        start = 0
        for stage, n in enumerate(o.stage_epochs):
            if epoch < start + n:
                return stage, epoch - start
            start += n
        return len(o.stage_epochs) - 1, epoch - (start - o.stage_epochs[-1])

    def static_graph(self, cfg: SearchConfig) -> bool:
        return False  # the skip-connect dropout rate changes every epoch

    def build_network(self, cfg: SearchConfig, num_classes: int, stage: int = 0,
                      primitives: dict[str, Sequence[Sequence[str]]] | None = None) -> SearchNetwork:
        o: PdartsOptions = cfg.options  # type: ignore[assignment]
        return StageNetwork(cfg.init_channels, num_classes, o.stage_layers[stage], k=cfg.k, edge_norm=cfg.edge_norm,
                            primitives=primitives if primitives is not None else PRIMITIVES,
                            stem="imagenet" if cfg.dataset == "imagenet" else "cifar",
                            weighting=self.weighting(cfg), seed=cfg.seed, stage=stage, max_skip=o.max_skip)

    def arch_active(self, searcher: "Searcher") -> bool:
        """The arch trains after the first ``warmup_epochs`` epochs of *each* stage."""
        return self.stage_of(searcher.config, searcher.epoch)[1] >= searcher.config.warmup_epochs

    def lr_factor(self, cfg: SearchConfig, epoch: int) -> float:
        """Cosine from ``lr`` to ``lr_min`` within each stage (each stage gets a fresh optimizer and schedule)."""
        o: PdartsOptions = cfg.options  # type: ignore[assignment]
        stage, t = self.stage_of(cfg, epoch)
        floor = cfg.lr_min / cfg.lr
        return floor + (1 - floor) * (1 + math.cos(math.pi * t / o.stage_epochs[stage])) / 2

    @staticmethod
    def skip_dropout_rate(cfg: SearchConfig, epoch: int) -> float:
        """As the official code: p = rate (E - e - 1) / E while only the weights train, then
        p = rate exp(-decay (e - warmup)), with e the epoch within the stage and E the stage's epochs."""
        o: PdartsOptions = cfg.options  # type: ignore[assignment]
        stage, e = Pdarts.stage_of(cfg, epoch)
        rate, n, warm = o.skip_dropout[stage], o.stage_epochs[stage], cfg.warmup_epochs
        if e < warm:
            return rate * (n - e - 1) / n
        return rate * math.exp(-o.dropout_decay * (e - warm))

    def on_epoch_start(self, searcher: "Searcher", epoch: int) -> None:
        """Enter the epoch's stage if it is a new one (prune, deepen, fresh optimizers); set the skip dropout."""
        cfg = searcher.config
        o: PdartsOptions = cfg.options  # type: ignore[assignment]
        stage, _ = self.stage_of(cfg, epoch)
        net = searcher.net
        assert isinstance(net, StageNetwork)
        while net.stage < stage:
            nxt = net.stage + 1
            primitives = prune_ops(net, o.stage_ops[nxt], drop_none=nxt == len(o.stage_ops) - 1)
            net = searcher.build_network(self.build_network(cfg, searcher.num_classes, nxt, primitives))
            assert isinstance(net, StageNetwork)
        set_skip_dropout(net, self.skip_dropout_rate(cfg, epoch))

    def epoch_metrics(self, searcher: "Searcher") -> dict[str, Any]:
        net = searcher.net
        assert isinstance(net, StageNetwork)
        return {"stage": net.stage, "stage_layers": net.layers, "ops_per_edge": net.alphas_normal.shape[1],
                "skip_dropout": self.skip_dropout_rate(searcher.config, searcher.epoch - 1)}

    # -- resume ----------------------------------------------------------------------------------------------
    def state(self, searcher: "Searcher") -> dict[str, Any]:
        net = searcher.net
        assert isinstance(net, StageNetwork)
        return {"stage": net.stage,
                "primitives": {t: [list(p) for p in net.edge_primitives[t]] for t in CELL_TYPES}}

    def restore(self, searcher: "Searcher", state: dict[str, Any]) -> None:
        """Rebuild the saved stage's network with its per-edge ops, so its weights and optimizers load into it."""
        primitives = {t: [tuple(p) for p in state["primitives"][t]] for t in CELL_TYPES}
        searcher.build_network(self.build_network(searcher.config, searcher.num_classes, int(state["stage"]),
                                                  primitives))


def prune_ops(net: SearchNetwork, keep: int, drop_none: bool) -> dict[str, list[tuple[str, ...]]]:
    """Per edge, the ``keep`` ops with the largest softmax(alpha); with ``drop_none`` `none` goes first
    (official ``get_min_k_no_zero``). Kept ops stay in their original order."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for t in CELL_TYPES:
        probs = F.softmax(net.alphas(t).detach().float(), dim=-1)
        edges = []
        for e, names in enumerate(net.edge_primitives[t]):
            order = sorted(range(len(names)), key=lambda i: (names[i] == "none" and drop_none, -float(probs[e, i])))
            kept = sorted(order[:keep])
            edges.append(tuple(names[i] for i in kept))
        out[t] = edges
    return out


def set_skip_dropout(net: SearchNetwork, p: float) -> None:
    """Dropout after stride-1 skip-connects only (the identities; the official code leaves FactorizedReduce be)."""
    for m in net.mixed_ops():
        identity = m.skip_index is not None and isinstance(m.ops[m.skip_index], Identity)
        m.skip_dropout = p if identity else 0.0


METHOD = Pdarts()
