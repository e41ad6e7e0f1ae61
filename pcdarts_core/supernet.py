"""The PC-DARTS search network (Xu et al., ICLR 2020) and, with ``k=1, edge_norm=False``, exactly DARTS's.

What a method changes in the supernet is *how arch parameters turn into weights* (softmax, Max-W, Gumbel samples,
thresholds) and *which parts run* (all ops, one sampled op, a derived sub-graph). Those two things live in an
:class:`ArchWeighting` object that a method supplies; the cells, mixed ops and partial channels are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .genotypes import Genotype, derive_genotype, edge_count, node_edge_slices, normalized_betas
from .ops import PRIMITIVES, FactorizedReduce, ReLUConvBN, make_op

CELL_TYPES = ("normal", "reduce")


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle; PC-DARTS (Sec. 3.2) uses K groups so that every channel is sampled in time."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


@dataclass
class CellWeights:
    """Weights for one cell type, computed once per forward and shared by all cells of that type.

    ``ops``: (edges, ops) weights of each op on each edge. ``edges``: (edges,) scale of each edge or None.
    ``active_ops``: one op index per edge to run alone (single-path methods), or None to run all.
    ``active_edges``: which edges run at all (sampled or derived sub-graphs), or None for all.
    ``transit``: the (active_edges, active_ops) sub-graph that transit cells run, when the method derives it by a
    rule of its own (EnTranNAS-DST's thresholds); None: the top-2 rule of :func:`derived_subgraph`.
    """

    ops: torch.Tensor
    edges: torch.Tensor | None = None
    active_ops: list[int] | None = None
    active_edges: list[bool] | None = None
    transit: tuple[list[bool], list[int]] | None = None


class ArchWeighting:
    """PC-DARTS: softmax over ops per edge, and the node-wise softmax of betas when edge normalization is on.

    Methods subclass this and override :meth:`cell_weights` (and :meth:`extra_parameters` when they add arch
    parameters of their own, e.g. EnTranNAS-DST thresholds).
    """

    def extra_parameters(self, net: "SearchNetwork") -> dict[str, torch.Tensor]:
        return {}

    def op_weights(self, alphas: torch.Tensor) -> torch.Tensor:
        return F.softmax(alphas, dim=-1)

    def edge_weights(self, net: "SearchNetwork", cell_type: str) -> torch.Tensor | None:
        betas = net.betas(cell_type)
        return None if betas is None else normalized_betas(betas, net.steps)

    def cell_weights(self, net: "SearchNetwork", cell_type: str) -> CellWeights:
        return CellWeights(self.op_weights(net.alphas(cell_type)), self.edge_weights(net, cell_type))


class MixedOp(nn.Module):
    """All candidate ops of one edge (or, with feature sharing, of one source node) on C/K channels."""

    def __init__(self, channels: int, stride: int, op_names: Sequence[str], k: int):
        super().__init__()
        self.k = k
        self.op_names = tuple(op_names)
        self.ops = nn.ModuleList(make_op(name, channels // k, stride, affine=False, search=True) for name in op_names)
        self.bypass_pool = nn.MaxPool2d(2, 2) if (stride == 2 and k > 1) else None
        self.skip_index = self.op_names.index("skip_connect") if "skip_connect" in self.op_names else None
        self.skip_dropout = 0.0  # P-DARTS's dropout after skip-connect; 0 elsewhere

    def run(self, part: torch.Tensor, index: int) -> torch.Tensor:
        y = self.ops[index](part)
        if index == self.skip_index and self.skip_dropout > 0:
            y = F.dropout(y, self.skip_dropout, self.training)
        return y


class SearchCell(nn.Module):
    """Two inputs, ``steps`` intermediate nodes, one mixed op per edge; output = concat of the nodes."""

    def __init__(self, steps: int, multiplier: int, c_prev_prev: int, c_prev: int, c: int, reduction: bool,
                 reduction_prev: bool, edge_primitives: Sequence[Sequence[str]], k: int, feature_sharing: bool,
                 transit: bool):
        super().__init__()
        self.reduction = reduction
        self.cell_type = "reduce" if reduction else "normal"
        self.steps, self.multiplier, self.k = steps, multiplier, k
        self.transit = transit  # EnTranNAS: run only the derived sub-graph
        self.feature_sharing = feature_sharing
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(c_prev_prev, c, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, c, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0, affine=False)
        self.edge_sources: list[int] = [j for i in range(steps) for j in range(i + 2)]
        self.edge_op_names = [tuple(p) for p in edge_primitives]
        if feature_sharing:
            # One op set per source state, shared by all its successors (EnTranNAS, Sec. 3.3).
            if len({names for names in self.edge_op_names}) != 1:
                raise ValueError("feature sharing needs the same candidate ops on every edge")
            n_sources = steps + 1
            self.mixed = nn.ModuleList(
                MixedOp(c, 2 if reduction and s < 2 else 1, self.edge_op_names[0], k) for s in range(n_sources))
            self.module_of_edge = [min(s, n_sources - 1) for s in self.edge_sources]
        else:
            self.mixed = nn.ModuleList(
                MixedOp(c, 2 if reduction and src < 2 else 1, names, k)
                for src, names in zip(self.edge_sources, self.edge_op_names))
            self.module_of_edge = list(range(len(self.edge_sources)))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: CellWeights,
                perms: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        active_edges, active_ops = weights.active_edges, weights.active_ops
        if self.transit and active_edges is None:
            if weights.transit is not None:
                active_edges, active_ops = weights.transit
            else:
                active_edges, active_ops = derived_subgraph(weights, self.edge_op_names, self.steps)
        cache: dict[tuple[int, int], torch.Tensor] = {}
        splits: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for node, rows in enumerate(node_edge_slices(self.steps)):
            terms = []
            for e in range(rows.start, rows.stop):
                if active_edges is not None and not active_edges[e]:
                    continue
                src = self.edge_sources[e]
                m = self.module_of_edge[e]
                mixed: MixedOp = self.mixed[m]  # type: ignore[assignment]
                perm = None if perms is None else perms[m]
                x = states[src]
                if m not in splits:
                    splits[m] = _split(x, self.k, perm)
                part, rest = splits[m]
                ops = [active_ops[e]] if active_ops is not None else range(len(mixed.ops))
                y = None
                for o in ops:
                    if (m, o) not in cache:
                        cache[(m, o)] = mixed.run(part, o)
                    term = weights.ops[e, o] * cache[(m, o)]
                    y = term if y is None else y + term
                assert y is not None
                y = _merge(x, y, rest, self.k, perm, mixed.bypass_pool)
                if weights.edges is not None:
                    y = weights.edges[e] * y
                terms.append(y)
            if not terms:
                raise RuntimeError(f"node {node} of a {self.cell_type} cell has no active input edge")
            states.append(sum(terms[1:], terms[0]))
        return torch.cat(states[-self.multiplier:], dim=1)


def _split(x: torch.Tensor, k: int, perm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if k == 1:
        return x, None
    c = x.shape[1] // k
    if perm is None:  # the official fixed slice: the first C/K channels
        return x[:, :c], x[:, c:]
    return x[:, perm[:c]], x[:, perm[c:]]


def _merge(x: torch.Tensor, y: torch.Tensor, rest: torch.Tensor | None, k: int, perm: torch.Tensor | None,
           pool: nn.Module | None) -> torch.Tensor:
    if rest is None:
        return y
    if pool is not None and y.shape[-1] != x.shape[-1]:
        rest = pool(rest)
    if perm is None:
        return channel_shuffle(torch.cat([y, rest], dim=1), k)
    # Random sampling: put every channel back where it came from, so channel identity is stable and no shuffle
    # is needed (the sampling itself is what spreads the op over all channels).
    out = torch.cat([y, rest], dim=1)
    return out.index_select(1, torch.argsort(perm))


def derived_subgraph(weights: CellWeights, edge_op_names: Sequence[Sequence[str]], steps: int,
                     n_inputs: int = 2) -> tuple[list[bool], list[int]]:
    """The sub-graph the derivation rule would keep now: top-``n_inputs`` inputs per node, argmax op on each."""
    w = weights.ops.detach()
    if weights.edges is not None:
        w = w * weights.edges.detach().unsqueeze(-1)
    active = [False] * w.shape[0]
    ops = [0] * w.shape[0]
    for rows in node_edge_slices(steps):
        scored = []
        for e in range(rows.start, rows.stop):
            names = edge_op_names[e]
            masked = torch.tensor([float("-inf") if n == "none" else 0.0 for n in names], device=w.device)
            best = int(torch.argmax(w[e] + masked))
            ops[e] = best
            scored.append((float(w[e, best]), e))
        scored.sort(key=lambda t: -t[0])
        for _, e in scored[:n_inputs]:
            active[e] = True
    return active, ops


class SearchNetwork(nn.Module):
    """The searched supernet. ``SearchNetwork(16, 10, 8)`` is PC-DARTS's CIFAR supernet, ``k=1,
    edge_norm=False`` DARTS's.

    ``primitives`` is one op list for every edge, or (for P-DARTS's pruned stages) a dict with one list of op
    lists per cell type. ``channel_sampling='random'`` draws a fresh channel subset every step from
    ``channel_generator`` (seeded, so data-parallel ranks draw the same subset).
    """

    def __init__(self, C: int, num_classes: int, layers: int, k: int = 4, edge_norm: bool = True, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3,
                 primitives: Sequence[str] | dict[str, Sequence[Sequence[str]]] = PRIMITIVES,
                 channel_sampling: str = "fixed", stem: str = "cifar", weighting: ArchWeighting | None = None,
                 feature_sharing: bool = False, transit_cells: Sequence[int] = (), seed: int = 0):
        super().__init__()
        validate_supernet_shape(C, layers, k, stem_multiplier, stem)
        if channel_sampling not in ("fixed", "random"):
            raise ValueError(f"channel_sampling must be 'fixed' or 'random', got {channel_sampling!r}")
        self.C, self.num_classes, self.layers, self.k = C, num_classes, layers, k
        self.steps, self.multiplier, self.edge_norm = steps, multiplier, edge_norm
        self.channel_sampling = channel_sampling
        self.weighting = weighting or ArchWeighting()
        n_edges = edge_count(steps)
        self.edge_primitives: dict[str, list[tuple[str, ...]]] = {}
        for t in CELL_TYPES:
            if isinstance(primitives, dict):
                per_edge = [tuple(p) for p in primitives[t]]
                if len(per_edge) != n_edges or len({len(p) for p in per_edge}) != 1:
                    raise ValueError(f"primitives[{t!r}] must list the same number of ops for each of {n_edges} edges")
            else:
                per_edge = [tuple(primitives)] * n_edges
            self.edge_primitives[t] = per_edge

        if stem == "cifar":
            c_curr = stem_multiplier * C
            self.stem = nn.Sequential(nn.Conv2d(3, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
            self.stem1 = None
            c_pp, c_p, c_curr = c_curr, c_curr, C
            reduction_prev = False
        elif stem == "imagenet":  # three stride-2 convs, 224 -> 28 (PC-DARTS ImageNet search)
            self.stem = nn.Sequential(
                nn.Conv2d(3, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2), nn.ReLU(),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
            self.stem1 = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                                       nn.BatchNorm2d(C))
            c_pp, c_p, c_curr = C, C, C
            reduction_prev = True
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")

        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            if reduction:
                c_curr *= 2
            cell = SearchCell(steps, multiplier, c_pp, c_p, c_curr, reduction, reduction_prev,
                              self.edge_primitives["reduce" if reduction else "normal"], k, feature_sharing,
                              transit=i in set(transit_cells))
            self.cells.append(cell)
            reduction_prev = reduction
            c_pp, c_p = c_p, multiplier * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)

        # Arch parameters: 1e-3 * randn, as the official code initializes them.
        gen = torch.Generator().manual_seed(seed)
        n_ops = len(self.edge_primitives["normal"][0])
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(n_edges, n_ops, generator=gen))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges, n_ops, generator=gen))
        if edge_norm:
            self.betas_normal: nn.Parameter | None = nn.Parameter(1e-3 * torch.randn(n_edges, generator=gen))
            self.betas_reduce: nn.Parameter | None = nn.Parameter(1e-3 * torch.randn(n_edges, generator=gen))
        else:
            self.betas_normal = self.betas_reduce = None
        self.extra_arch = nn.ParameterDict(
            {n: nn.Parameter(t) for n, t in self.weighting.extra_parameters(self).items()})
        self.channel_generator = torch.Generator().manual_seed(seed + 1)

    # -- parameters ------------------------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        params = [self.alphas_normal, self.alphas_reduce]
        if self.betas_normal is not None and self.betas_reduce is not None:
            params += [self.betas_normal, self.betas_reduce]
        return params + list(self.extra_arch.values())

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def named_arch_parameters(self) -> dict[str, torch.Tensor]:
        arch = {id(p) for p in self.arch_parameters()}
        return {n: p for n, p in self.named_parameters() if id(p) in arch}

    def alphas(self, cell_type: str) -> torch.Tensor:
        return self.alphas_normal if cell_type == "normal" else self.alphas_reduce

    def betas(self, cell_type: str) -> torch.Tensor | None:
        return self.betas_normal if cell_type == "normal" else self.betas_reduce

    def mixed_ops(self) -> list[MixedOp]:
        return [m for m in self.modules() if isinstance(m, MixedOp)]

    def set_skip_dropout(self, p: float) -> None:
        for m in self.mixed_ops():
            m.skip_dropout = p

    # -- forward ---------------------------------------------------------------------------------------------
    def cell_weights(self) -> dict[str, CellWeights]:
        return {t: self.weighting.cell_weights(self, t) for t in CELL_TYPES}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.cell_weights()
        s0 = self.stem(x)
        s1 = s0 if self.stem1 is None else self.stem1(s0)
        for cell in self.cells:
            perms = self._sample_perms(cell, s1.device) if self.channel_sampling == "random" and self.k > 1 else None
            s0, s1 = s1, cell(s0, s1, weights[cell.cell_type], perms)
        return self.classifier(self.global_pooling(s1).flatten(1))

    def _sample_perms(self, cell: SearchCell, device: torch.device) -> list[torch.Tensor | None]:
        c = cell.preprocess1.op[1].out_channels
        return [torch.randperm(c, generator=self.channel_generator).to(device) for _ in cell.mixed]

    # -- derivation ------------------------------------------------------------------------------------------
    def genotype(self) -> Genotype:
        """The PC-DARTS derivation (softmax(alpha) times normalized betas; top-2 inputs; argmax op)."""
        return derive_genotype(self.alphas_normal, self.alphas_reduce, self.betas_normal, self.betas_reduce,
                               self.edge_primitives["normal"], self.edge_primitives["reduce"])


def reduction_layers(layers: int) -> tuple[int, ...]:
    """Reduction cells sit at 1/3 and 2/3 of the depth (DARTS Sec. 3)."""
    return (layers // 3, 2 * layers // 3)


def validate_supernet_shape(C: int, layers: int, k: int, stem_multiplier: int = 3, stem: str = "cifar") -> None:
    """Reject channel counts that partial channels or FactorizedReduce cannot split, with a one-line reason."""
    if C < 1 or layers < 1 or k < 1:
        raise ValueError(f"C, layers and k must be positive, got C={C}, layers={layers}, k={k}")
    if layers < 3:
        raise ValueError(f"layers must be at least 3 so the two reduction cells are distinct, got {layers}")
    if C % k:
        raise ValueError(f"K={k} does not divide the channel count C={C}: partial channels take C/K of them; "
                         f"choose C as a multiple of K")
    if stem == "imagenet" and C % 2:
        raise ValueError(f"the ImageNet stem needs an even C, got {C}")
