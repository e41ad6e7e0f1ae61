"""ROME (Wang et al., arXiv 2011.11233): single-path search with the topology disentangled from the operations.

Every node gets topology parameters over its incoming edges (the supernet's betas, so edge parameters are always
on) and every edge op parameters over its ops (alphas, `none` removed: the topology decides which edges exist).
Each forward samples one sub-network:

* Gumbel-Top2 topology: per node, the two largest of log_softmax(beta) + Gumbel noise pick exactly two distinct
  inputs; a straight-through estimator (hard mask forward, softmax((log_softmax(beta) + g) / tau) backward) gives
  the betas gradients.
* Gumbel-Max ops: per chosen edge, a hard Gumbel-softmax sample of one op, straight-through as well.

Only the chosen ops of the chosen edges run (``CellWeights.active_ops`` / ``active_edges``), so a step holds one
path per edge in memory. Gradient accumulation: both the arch and the weight update average the gradients of K=7
sampled sub-networks on the same batch before stepping. The temperature falls linearly from 10 to 0.1 over the
search (GDAS's schedule; ROME's exact schedule could not be checked here, so both ends are options). The noise comes
from torch's RNG (on the device: no host draw), so resume is exact. In eval mode nothing is sampled: the net runs
the derived cell. Host syncs: the sampled path decides which ops run, so each forward reads its sample back once
per cell type (the op and input indices together), and a sample's gradients name the parameters it used; nothing
else in a step reads a value back.
Derivation: per node the two inputs with the largest topology weight, the argmax op on each.

Search settings (batch 64, lr 0.025 -> 0.001, arch lr 3e-4, no arch warm-up) are DARTS's, which ROME builds on.

What was checked where. ROME has no public code. Its text was looked up in the stored copies of the paper (search
tool, pages corpus: hf.librae.dpdns.org/papers/2011.11233.md and ar5iv.labs.arxiv.org/html/2011.11233), which
give the abstract and introduction only; a review page (liner.com) gives Figure 1's caption. Confirmed there:
single-path search (one sub-model per step), topology search disentangled from operation search, Gumbel-Top2
edge sampling so that every node has in-degree 2, sub-networks run forward and backward independently and their
gradients are accumulated before one update of the supernet. Not confirmed (the experimental sections were not
reachable): K = 7, the temperature schedule and its ends, the search hyper-parameters and removing `none` from the
op set; they stay options (``samples``, ``tau_max``, ``tau_min``) or DARTS's settings, as above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..architect import StepContext, frozen
from ..optimizers import clip_, update
from ..config import MethodOptions, SearchConfig
from ..genotypes import Genotype, derive_cell, node_edge_slices, normalized_betas
from ..ops import PRIMITIVES
from ..supernet import ArchWeighting, CellWeights, SearchNetwork
from .base import Batch, SearchContext, SearchMethod

ROME_PRIMITIVES: tuple[str, ...] = tuple(p for p in PRIMITIVES if p != "none")


@dataclass(frozen=True)
class RomeOptions(MethodOptions):
    samples: int = 7  # K: sub-networks whose gradients one update accumulates
    tau_max: float = 10.0  # Gumbel temperature at the first epoch
    tau_min: float = 0.1  # ... and at the last


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """-log(Exp(1)) samples from torch's default generator (so checkpoints capture them)."""
    return -torch.empty_like(like).exponential_().log()


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """``hard`` forward, gradient of ``soft`` backward."""
    return hard - soft.detach() + soft


class GumbelTop2Weighting(ArchWeighting):
    """Samples the sub-network of each forward: two inputs per node, one op per edge (eval mode: the argmax)."""

    def __init__(self, n_inputs: int = 2):
        self.tau = 1.0
        self.n_inputs = n_inputs

    def cell_weights(self, net: SearchNetwork, cell_type: str) -> CellWeights:
        sample = net.training
        alphas, betas = net.alphas(cell_type), net.betas(cell_type)
        assert betas is not None, "ROME needs the topology parameters (edge_norm=True)"
        logits = alphas + gumbel_noise(alphas) if sample else alphas
        soft = F.softmax(logits / self.tau, dim=-1)
        index = logits.argmax(dim=-1)
        # one-hot by comparison: F.one_hot validates its indices on the host, a sync on every device but CUDA
        one_hot = (index.unsqueeze(-1) == torch.arange(alphas.shape[-1], device=index.device)).to(soft.dtype)
        ops = straight_through(one_hot, soft)
        parts, tops = [], []
        for rows in node_edge_slices(net.steps):
            scores = F.log_softmax(betas[rows], dim=-1)
            if sample:
                scores = scores + gumbel_noise(scores)
            top = torch.topk(scores, self.n_inputs).indices
            hard = torch.zeros_like(scores).scatter(0, top, 1.0)
            parts.append(straight_through(hard, F.softmax(scores / self.tau, dim=-1)))
            tops.append(top + rows.start)
        edges = torch.cat(parts)
        # the sampled path decides which ops run (its shapes): one host read per cell type and forward
        chosen = torch.cat([index, *tops]).tolist()
        active = [False] * betas.shape[0]
        for e in chosen[len(index):]:
            active[e] = True
        return CellWeights(ops, edges, active_ops=chosen[: len(index)], active_edges=active)


class Rome(SearchMethod):
    name = "rome"
    options_type = RomeOptions
    summary = ("topology params per node with Gumbel-Top2 edge sampling, one Gumbel-sampled op per edge, "
               "no `none`, gradients accumulated over K=7 sub-networks")

    def defaults(self, dataset: str) -> dict[str, Any]:
        d: dict[str, Any] = {"k": 1, "edge_norm": True, "batch_size": 64, "lr": 0.025, "lr_min": 0.001,
                             "arch_lr": 3e-4, "warmup_epochs": 0}
        if dataset == "synthetic":
            d.update(batch_size=32, lr=0.05, arch_lr=3e-3, options={"samples": 2})
        return d

    def validate(self, cfg: SearchConfig) -> None:
        o: RomeOptions = cfg.options  # type: ignore[assignment]
        if not cfg.edge_norm:
            raise ValueError("ROME's topology parameters are the edge parameters: edge_norm must be true")
        if cfg.order != "first":
            raise ValueError("ROME samples sub-networks; the unrolled second-order update is not defined for it")
        if o.samples < 1 or not 0 < o.tau_min <= o.tau_max:
            raise ValueError(f"ROME needs samples >= 1 and 0 < tau_min <= tau_max, got {o.samples}, "
                             f"{o.tau_min}, {o.tau_max}")

    # -- the supernet ----------------------------------------------------------------------------------------
    def primitives(self, cfg: SearchConfig) -> tuple[str, ...]:
        return ROME_PRIMITIVES

    def static_graph(self, cfg: SearchConfig) -> bool:
        return False  # a Gumbel-sampled sub-network every forward, at a temperature that changes every epoch

    def weighting(self, cfg: SearchConfig) -> ArchWeighting:
        return GumbelTop2Weighting()

    @staticmethod
    def temperature(cfg: SearchConfig, epoch: int) -> float:
        """Linear from ``tau_max`` at the first epoch to ``tau_min`` at the last."""
        o: RomeOptions = cfg.options  # type: ignore[assignment]
        frac = epoch / max(1, cfg.epochs - 1)
        return o.tau_max - (o.tau_max - o.tau_min) * min(1.0, frac)

    def on_epoch_start(self, ctx: SearchContext, epoch: int) -> None:
        weighting = ctx.net.weighting
        assert isinstance(weighting, GumbelTop2Weighting)
        weighting.tau = self.temperature(ctx.config, epoch)

    def epoch_metrics(self, ctx: SearchContext) -> dict[str, Any]:
        return {"tau": self.temperature(ctx.config, ctx.epoch - 1)}

    # -- steps: gradient accumulation over K sampled sub-networks ---------------------------------------------
    def arch_step(self, ctx: StepContext, train: Batch, val: Batch) -> torch.Tensor:
        net, k = ctx.net, ctx.config.options.samples  # type: ignore[attr-defined]
        with frozen(net.weight_parameters()):
            params, grads, loss, _ = accumulate_samples(ctx, val, net.arch_parameters(), k)
        update(ctx.arch_optimizer, params, grads)
        return loss

    def weight_step(self, ctx: StepContext, train: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        net, k = ctx.net, ctx.config.options.samples  # type: ignore[attr-defined]
        with frozen(net.arch_parameters()):
            params, grads, loss, logits = accumulate_samples(ctx, train, net.weight_parameters(), k)
        clip_(grads, ctx.config.grad_clip)
        update(ctx.weight_optimizer, params, grads)
        return loss, logits

    # -- derivation ------------------------------------------------------------------------------------------
    def genotype(self, net: SearchNetwork) -> Genotype:
        """Per node the two inputs with the largest topology weight, each with its argmax op."""
        cells = []
        for t in ("normal", "reduce"):
            alphas, betas = net.alphas(t).detach().float(), net.betas(t)
            assert betas is not None
            one_hot = F.one_hot(alphas.argmax(dim=-1), alphas.shape[-1]).float()
            weights = one_hot * normalized_betas(betas.detach().float(), net.steps).unsqueeze(-1)
            cells.append(derive_cell(weights, net.edge_primitives[t], net.steps))
        concat = tuple(range(2, 2 + net.steps))
        return Genotype(tuple(cells[0]), concat, tuple(cells[1]), concat)


METHOD = Rome()


def accumulate_samples(ctx: StepContext, batch: Batch, params: list[nn.Parameter], k: int
                       ) -> tuple[list[nn.Parameter], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Forward and backward of ``k`` sampled sub-networks on ``batch``, one after the other (one path in memory at
    a time), their gradients of loss/k summed as ``.grad`` would accumulate them. Returns the parameters that some
    sample used with their gradients (the others are left out of the update, as an optimizer skips a parameter
    without ``.grad``), the mean loss and the mean logits (detached device tensors). Which parameters a sample
    used is known on the host once the sub-network is drawn: ROME's sampled path syncs there, at each sample."""
    total: list[torch.Tensor | None] = [None] * len(params)
    loss_sum = logits_sum = None
    for _ in range(k):
        loss, logits = ctx.loss(batch, return_logits=True)
        for i, g in enumerate(torch.autograd.grad(loss / k, params, allow_unused=True)):
            if g is not None:
                total[i] = g if total[i] is None else total[i] + g
        loss_sum = loss.detach().double() if loss_sum is None else loss_sum + loss.detach().double()
        logits_sum = logits.detach() if logits_sum is None else logits_sum + logits.detach()
    used = [i for i, g in enumerate(total) if g is not None]
    grads = [total[i] for i in used]
    ctx.sync_grads(grads)  # type: ignore[arg-type]
    assert loss_sum is not None and logits_sum is not None
    return [params[i] for i in used], grads, loss_sum / k, logits_sum / k  # type: ignore[return-value]
