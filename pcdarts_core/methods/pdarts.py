"""P-DARTS (Chen et al., ICCV 2019, arXiv 1904.12760): progressive deepening with search-space approximation.

The search runs in stages on ever deeper supernets (5, 11, 17 cells) while the candidate ops of each edge shrink
(8 -> 5 -> 3): after stages 1 and 2 the lowest-weighted ops of every edge are dropped by weight alone, `none`
included like any other op (official ``get_min_k``), so `none` can survive into stage 3 and take softmax mass there;
only the final choice after the last stage excludes `none` (``get_min_k_no_zero``, then the DARTS edge rule on the
stage's softmax with `none` zeroed). Each stage trains the weights alone for its first ``warmup_epochs`` epochs
(10 of 25), with a fresh network, fresh optimizers and its own cosine lr. Search-space regularization: dropout
after every skip-connect, at a per-stage base rate that decays during the stage, and at most M=2 skip-connects in
the final normal cell (the weakest selected skip is zeroed and the cell re-derived until the cap holds).

Checked against the official code (chenxin061/pdarts ``train_search.py``, ``model_search.py``, README):

* pruning: ``get_min_k`` after stages 1-2, ``get_min_k_no_zero`` only at the end (see above);
* arch step: the arch gradients are clipped at norm ``grad_clip`` (5) before the Adam step;
* lr: ``scheduler.step()`` runs at the start of each epoch, so epoch e of a stage runs at the cosine's t = e + 1
  of E (the last epoch at ``lr_min`` = 0);
* dropout after skip-connect (stride-1 identities only): p = rate (E - e - 1) / E in the weights-only epochs, then
  rate exp(-0.2 (e - warm-up)); base rates 0.1/0.4/0.7 on CIFAR-10 (the README's search command; the paper's text
  says 0.0/0.4/0.7: the code wins) and 0.1/0.2/0.3 on CIFAR-100 (the paper; the README only says "add
  --cifar100"), CIFAR-10's elsewhere;
* batch 96, lr 0.025 -> 0, arch Adam lr 6e-4 (betas 0.5/0.999, wd 1e-3), 25 epochs per stage, 10 of them
  weights-only, cells 5/11/17, C=16; the skip-connect cap as ``delete_min_sk_prob``/``keep_1_on``/``keep_2_branches``.

Everything else (K=1, softmax over ops, first-order updates) is DARTS. ``epochs`` is spread evenly over the stages
(earlier stages take the remainder) unless ``stage_epochs`` is given, so P-DARTS runs under every preset: with fewer
epochs than stages the last stages do not run, and a spread stage too short for ``warmup_epochs`` trains the arch
in its last epoch. ``warmup_epochs`` counts per stage; ``layers`` of the config is unused (the stages set the depth).

Host syncs: a step reads nothing back (its forward differs between epochs only by the dropout rate, a Python value
set at the epoch's start). The pruning between stages reads the stage's arch weights to the host, at that stage
boundary, with the new network and optimizers built there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..architect import StepContext, first_order_step
from ..config import MethodOptions, SearchConfig
from ..genotypes import Genotype, derive_cell, edge_op_weights
from ..ops import PRIMITIVES
from ..supernet import CELL_TYPES, SearchNetwork, validate_supernet_shape
from .base import Batch, SearchContext, SearchMethod


@dataclass(frozen=True)
class PdartsOptions(MethodOptions):
    stage_layers: tuple[int, ...] = (5, 11, 17)  # cells of each stage's supernet
    stage_epochs: tuple[int, ...] | None = None  # epochs of each stage (sum = the config's epochs); None: spread
    stage_ops: tuple[int, ...] = (8, 5, 3)  # candidate ops per edge in each stage
    skip_dropout: tuple[float, ...] = (0.1, 0.4, 0.7)  # base dropout rate after skip-connect, per stage (CIFAR-10)
    dropout_decay: float = 0.2  # p = rate * exp(-decay * (e - warmup)) once the arch trains
    max_skip: int = 2  # M: skip-connects allowed in the final normal cell

    def __post_init__(self) -> None:
        if self.stage_epochs is not None and not isinstance(self.stage_epochs, tuple):  # a YAML/CLI list
            object.__setattr__(self, "stage_epochs", tuple(self.stage_epochs))


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


#: base dropout rates after skip-connect per stage, by dataset (see the module docstring); others use CIFAR-10's
SKIP_DROPOUT: dict[str, tuple[float, ...]] = {"cifar10": (0.1, 0.4, 0.7), "cifar100": (0.1, 0.2, 0.3)}


@dataclass(frozen=True)
class Stage:
    """One P-DARTS stage of a search: its first global epoch, its epochs and its weights-only epochs."""

    index: int
    start: int
    epochs: int
    warmup: int


def stage_plan(cfg: SearchConfig) -> list[Stage]:
    """The stages that run: ``stage_epochs``, or ``epochs`` spread evenly (earlier stages take the remainder, stages
    left with no epoch do not run; a stage shorter than ``warmup_epochs`` + 1 trains the arch in its last epoch)."""
    o: PdartsOptions = cfg.options  # type: ignore[assignment]
    n = len(o.stage_layers)
    if o.stage_epochs is not None:
        lengths, warm = list(o.stage_epochs), [cfg.warmup_epochs] * n
    else:
        base, extra = divmod(cfg.epochs, n)
        lengths = [base + (i < extra) for i in range(n)]
        warm = [min(cfg.warmup_epochs, max(e - 1, 0)) for e in lengths]
    plan, start = [], 0
    for i, (e, w) in enumerate(zip(lengths, warm)):
        if e > 0:
            plan.append(Stage(i, start, e, w))
        start += e
    return plan


class Pdarts(SearchMethod):
    name = "pdarts"
    options_type = PdartsOptions
    summary = ("stages of 5/11/17 cells with 8/5/3 ops per edge (pruned by weight, `none` only excluded at the "
               "end), skip-connect dropout decaying per stage, at most 2 skip-connects in the normal cell")

    def defaults(self, dataset: str) -> dict[str, Any]:
        d: dict[str, Any] = {"k": 1, "edge_norm": False, "batch_size": 96, "lr": 0.025, "lr_min": 0.0,
                             "arch_lr": 6e-4, "epochs": 75, "warmup_epochs": 10, "layers": 5,
                             "options": {"skip_dropout": SKIP_DROPOUT.get(dataset, SKIP_DROPOUT["cifar10"])}}
        if dataset == "synthetic":
            # Three stages of 3/4/5 cells and 2 epochs each (1 weights-only): a quick CPU run of the mechanism.
            d.update(batch_size=64, lr=0.05, arch_lr=3e-3, epochs=6, warmup_epochs=1, layers=3)
            d["options"]["stage_layers"] = (3, 4, 5)
        return d

    def validate(self, cfg: SearchConfig) -> None:
        o: PdartsOptions = cfg.options  # type: ignore[assignment]
        n = len(o.stage_layers)
        lengths = [n if o.stage_epochs is None else len(o.stage_epochs), len(o.stage_ops), len(o.skip_dropout)]
        if n < 1 or lengths != [n] * 3:
            raise ValueError(f"P-DARTS stage_layers, stage_epochs, stage_ops and skip_dropout must have one entry "
                             f"per stage, got {n}, {lengths[0]}, {lengths[1]}, {lengths[2]}")
        if o.stage_epochs is not None:
            if not all(isinstance(e, int) and e >= 1 for e in o.stage_epochs):
                raise ValueError(f"P-DARTS stage_epochs must be positive integers, got {list(o.stage_epochs)}")
            if sum(o.stage_epochs) != cfg.epochs:
                raise ValueError(f"P-DARTS epochs={cfg.epochs} must equal the sum of stage_epochs "
                                 f"{list(o.stage_epochs)} = {sum(o.stage_epochs)} (or leave stage_epochs unset)")
            if any(e <= cfg.warmup_epochs for e in o.stage_epochs):
                raise ValueError(f"warmup_epochs={cfg.warmup_epochs} counts per P-DARTS stage and must be below "
                                 f"every stage's epochs {list(o.stage_epochs)}")
        if cfg.k != 1:
            raise ValueError(f"P-DARTS uses all channels (k=1), got k={cfg.k}")
        if o.stage_ops[0] != len(PRIMITIVES) or any(b > a for a, b in zip(o.stage_ops, o.stage_ops[1:])):
            raise ValueError(f"P-DARTS stage_ops must start at {len(PRIMITIVES)} and never grow, got "
                             f"{list(o.stage_ops)}")
        if o.stage_ops[-1] < 2:
            raise ValueError("P-DARTS needs at least two ops per edge in the last stage (`none` may be one of them)")
        if not all(0 <= p < 1 for p in o.skip_dropout) or o.dropout_decay < 0 or o.max_skip < 0:
            raise ValueError("P-DARTS skip_dropout must be in [0, 1), dropout_decay >= 0 and max_skip >= 0")
        for layers in o.stage_layers:
            validate_supernet_shape(cfg.init_channels, layers, cfg.k)

    # -- stages ----------------------------------------------------------------------------------------------
    @staticmethod
    def stage_of(cfg: SearchConfig, epoch: int) -> tuple[Stage, int]:
        """(stage, epoch within the stage) of a global epoch."""
        plan = stage_plan(cfg)
        stage = next((s for s in plan if epoch < s.start + s.epochs), plan[-1])
        return stage, epoch - stage.start

    def static_graph(self, cfg: SearchConfig) -> bool:
        return False  # the skip-connect dropout rate changes every epoch

    def build_network(self, cfg: SearchConfig, num_classes: int, stage: int = 0,
                      primitives: dict[str, Sequence[Sequence[str]]] | None = None) -> SearchNetwork:
        o: PdartsOptions = cfg.options  # type: ignore[assignment]
        return StageNetwork(cfg.init_channels, num_classes, o.stage_layers[stage], k=cfg.k, edge_norm=cfg.edge_norm,
                            primitives=primitives if primitives is not None else PRIMITIVES,
                            stem="imagenet" if cfg.dataset == "imagenet" else "cifar",
                            weighting=self.weighting(cfg), seed=cfg.seed, stage=stage, max_skip=o.max_skip,
                            execution=cfg.execution)

    def arch_active(self, ctx: SearchContext) -> bool:
        """The arch trains after the first weights-only epochs of *each* stage."""
        stage, e = self.stage_of(ctx.config, ctx.epoch)
        return e >= stage.warmup

    def arch_step(self, ctx: StepContext, train: Batch, val: Batch) -> torch.Tensor:
        """The official first-order step clips the arch gradients at norm ``grad_clip`` before Adam."""
        if ctx.config.order == "second":
            return super().arch_step(ctx, train, val)
        return first_order_step(ctx, val, grad_clip=ctx.config.grad_clip)

    def lr_factor(self, cfg: SearchConfig, epoch: int) -> float:
        """Cosine from ``lr`` to ``lr_min`` within each stage, stepped at the start of the epoch as the official
        code does: epoch e of a stage of E epochs runs at t = e + 1 (its last epoch at ``lr_min``)."""
        stage, e = self.stage_of(cfg, epoch)
        floor = cfg.lr_min / cfg.lr
        return floor + (1 - floor) * (1 + math.cos(math.pi * min(e + 1, stage.epochs) / stage.epochs)) / 2

    @staticmethod
    def skip_dropout_rate(cfg: SearchConfig, epoch: int) -> float:
        """As the official code: p = rate (E - e - 1) / E while only the weights train, then
        p = rate exp(-decay (e - warmup)), with e the epoch within the stage and E the stage's epochs."""
        o: PdartsOptions = cfg.options  # type: ignore[assignment]
        stage, e = Pdarts.stage_of(cfg, epoch)
        rate = o.skip_dropout[stage.index]
        if e < stage.warmup:
            return rate * (stage.epochs - e - 1) / stage.epochs
        return rate * math.exp(-o.dropout_decay * (e - stage.warmup))

    def on_epoch_start(self, ctx: SearchContext, epoch: int) -> None:
        """Enter the epoch's stage if it is a new one (prune, deepen, fresh optimizers); set the skip dropout."""
        cfg = ctx.config
        o: PdartsOptions = cfg.options  # type: ignore[assignment]
        stage, _ = self.stage_of(cfg, epoch)
        net = ctx.net
        assert isinstance(net, StageNetwork)
        while net.stage < stage.index:
            nxt = net.stage + 1
            primitives = prune_ops(net, o.stage_ops[nxt])
            net = ctx.build_network(self.build_network(cfg, ctx.num_classes, nxt, primitives))
            assert isinstance(net, StageNetwork)
        set_skip_dropout(net, self.skip_dropout_rate(cfg, epoch))

    def epoch_metrics(self, ctx: SearchContext) -> dict[str, Any]:
        net = ctx.net
        assert isinstance(net, StageNetwork)
        return {"stage": net.stage, "stage_layers": net.layers, "ops_per_edge": net.alphas_normal.shape[1],
                "skip_dropout": self.skip_dropout_rate(ctx.config, ctx.epoch - 1)}

    # -- resume ----------------------------------------------------------------------------------------------
    def state(self, ctx: SearchContext) -> dict[str, Any]:
        net = ctx.net
        assert isinstance(net, StageNetwork)
        return {"stage": net.stage, "stage_epochs": [s.epochs for s in stage_plan(ctx.config)],
                "primitives": {t: [list(p) for p in net.edge_primitives[t]] for t in CELL_TYPES}}

    def restore(self, ctx: SearchContext, state: dict[str, Any]) -> None:
        """Rebuild the saved stage's network with its per-edge ops, so its weights and optimizers load into it."""
        plan = [s.epochs for s in stage_plan(ctx.config)]
        if state.get("stage_epochs", plan) != plan:
            raise ValueError(f"cannot resume: the P-DARTS stages were {state['stage_epochs']} epochs, these settings "
                             f"give {plan} (epochs changed; give stage_epochs to keep the stages)")
        primitives = {t: [tuple(p) for p in state["primitives"][t]] for t in CELL_TYPES}
        ctx.build_network(self.build_network(ctx.config, ctx.num_classes, int(state["stage"]),
                                                  primitives))


def prune_ops(net: SearchNetwork, keep: int) -> dict[str, list[tuple[str, ...]]]:
    """Per edge, the ``keep`` ops with the largest softmax(alpha), `none` ranked like any other op (the official
    ``get_min_k`` between stages; `none` is excluded only by the final derivation). Kept ops stay in their
    original order; ties drop the earlier op, as ``np.argmin`` does."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for t in CELL_TYPES:
        probs = F.softmax(net.alphas(t).detach().float(), dim=-1)
        edges = []
        for e, names in enumerate(net.edge_primitives[t]):
            order = sorted(range(len(names)), key=lambda i: (float(probs[e, i]), i))
            edges.append(tuple(names[i] for i in sorted(order[len(names) - keep:])))
        out[t] = edges
    return out


def set_skip_dropout(net: SearchNetwork, p: float) -> None:
    """Dropout after stride-1 skip-connects only (the identities; the official code leaves FactorizedReduce be)."""
    net.set_skip_dropout(p)


METHOD = Pdarts()
