"""The PC-DARTS search network (Xu et al., ICLR 2020) and, with ``k=1, edge_norm=False``, exactly DARTS's.

What a method changes in the supernet is *how arch parameters turn into weights* (softmax, Max-W, Gumbel samples,
thresholds) and *which parts run* (all ops, one sampled op, a derived sub-graph). Those two things live in an
:class:`ArchWeighting` object that a method supplies; the cells, mixed ops and partial channels are shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .genotypes import Genotype, derive_genotype, edge_count, node_edge_slices, normalized_betas
from .batched import BatchedOp
from .ops import PRIMITIVES, FactorizedReduce, Identity, ReLUConvBN, make_op

CELL_TYPES = ("normal", "reduce")
#: ``fused``: each candidate op runs once per state, batched over the edges reading it (:class:`FusedCell`);
#: ``reference``: one mixed op per edge, the official code's structure (:class:`SearchCell`).
EXECUTIONS = ("fused", "reference")


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
    #: tensors derived from these weights once per forward and shared by all cells of the type (fused execution)
    derived: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)


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

    @property
    def n_units(self) -> int:
        """Mixed-op modules (one per edge, or one per source state with feature sharing)."""
        return len(self.mixed)

    def set_skip_dropout(self, p: float) -> None:
        """Dropout after stride-1 skip-connects only (P-DARTS; the official code leaves FactorizedReduce be)."""
        for m in self.mixed:
            identity = m.skip_index is not None and isinstance(m.ops[m.skip_index], Identity)
            m.skip_dropout = p if identity else 0.0

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: CellWeights,
                perms: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        active_edges, active_ops = active_subgraph(self, weights)
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


def active_subgraph(cell: "SearchCell | FusedCell", weights: CellWeights) -> tuple[list[bool] | None, list[int] | None]:
    """(active edges, active op per edge) of this forward; None: all. Transit cells run the derived sub-graph,
    derived once per forward for all transit cells of the type (it is kept in ``weights``)."""
    if cell.transit and weights.active_edges is None:
        if weights.transit is None:
            weights.transit = derived_subgraph(weights, cell.edge_op_names, cell.steps)
        return weights.transit
    return weights.active_edges, weights.active_ops


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
    """The sub-graph the derivation rule would keep now: top-``n_inputs`` inputs per node, argmax op on each
    (the weights read back to the host once)."""
    w = weights.ops.detach()
    if weights.edges is not None:
        w = w * weights.edges.detach().unsqueeze(-1)
    rows_w = w.tolist()
    active = [False] * len(rows_w)
    ops = [0] * len(rows_w)
    for rows in node_edge_slices(steps):
        scored = []
        for e in range(rows.start, rows.stop):
            names, row = edge_op_names[e], rows_w[e]
            best = max((i for i, n in enumerate(names) if n != "none"), key=lambda i: row[i])
            ops[e] = best
            scored.append((row[best], e))
        scored.sort(key=lambda t: -t[0])
        for _, e in scored[:n_inputs]:
            active[e] = True
    return active, ops


class _SourcePlan:
    """What one source state computes for a given active sub-graph: which ops on which of its units (in runs of
    consecutive units of each batched op), and the (slots x edges) positions of the coefficients that turn the
    stacked op outputs into one output per edge."""

    def __init__(self, cell: "FusedCell", j: int, active_edges: list[bool] | None, active_ops: list[int] | None):
        def allowed(e: int, name: str) -> bool:
            names = cell.edge_op_names[e]
            return name in names and (active_ops is None or names[active_ops[e]] == name)

        self.edges = [e for e, s in enumerate(cell.edge_sources)
                      if s == j and (active_edges is None or active_edges[e])]
        self.nodes = [cell.edge_nodes[e] for e in self.edges]
        self.units = sorted({cell.module_of_edge[e] for e in self.edges})
        self.edge_unit_pos = [self.units.index(cell.module_of_edge[e]) for e in self.edges]
        self.runs: list[tuple[str, int, int, tuple[int, ...]]] = []
        slots: list[tuple[int, str]] = []
        for name, op in cell.fused[j].items():
            pos = [i for i, u in enumerate(op.units)
                   if any(cell.module_of_edge[e] == u and allowed(e, name) for e in self.edges)]
            for a, n in _runs(pos):
                self.runs.append((name, a, n, tuple(op.units[a:a + n])))
                slots += [(u, name) for u in op.units[a:a + n]]
        self.n_slots = len(slots)
        sentinel = len(cell.edge_sources) * cell.n_ops
        self._index = torch.tensor(  # (edges, slots)
            [[e * cell.n_ops + cell.edge_op_names[e].index(name)
              if cell.module_of_edge[e] == u and allowed(e, name) else sentinel for u, name in slots]
             for e in self.edges], dtype=torch.long).reshape(len(self.edges), len(slots))
        self._edges = torch.tensor(self.edges, dtype=torch.long)
        self._unit_pos = torch.tensor(self.edge_unit_pos, dtype=torch.long)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """((edges x slots) coefficient positions, edge indices, unit position of each edge) on ``device``.
        Cached per device in eager mode; a compiled graph takes them as constants (a cache filled while tracing
        would change the guards and recompile the next step)."""
        if torch.compiler.is_compiling():
            return self._index.to(device), self._edges.to(device), self._unit_pos.to(device)
        if device not in self._on:
            self._on[device] = (self._index.to(device), self._edges.to(device), self._unit_pos.to(device))
        return self._on[device]


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers as (start, length)."""
    out: list[tuple[int, int]] = []
    for p in positions:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def _channels_last_grad(grad: torch.Tensor) -> torch.Tensor:
    """The gradient of a batched op's output, channels-last: the contraction hands each op a strided slice of its
    own gradient, on which oneDNN's NHWC BatchNorm and convolution backward are much slower than on a copy."""
    return grad.contiguous(memory_format=torch.channels_last)


class FusedCell(nn.Module):
    """The cell of :class:`SearchCell`, computed state by state instead of edge by edge.

    All edges that read one state run each candidate op once, batched over those edges (:class:`BatchedOp`:
    inputs stacked on the channel axis, grouped convolutions; one ReLU shared by every op that starts with it);
    the weighted sum over ops and edges is one matrix product per state; `none` is never computed (its weight
    still takes part in the softmax). Partial channels: the untouched C - C/K channels of each edge are weighted
    by the edge weight and each node is shuffled once (shuffle is linear, so the sum of shuffled edges is the
    shuffle of the sums); random channel sampling scatters every edge's channels back with one ``index_add``.

    It is built from a :class:`SearchCell` (so it starts from the same weights, drawn in the same order) and its
    ``state_dict`` uses the reference's per-edge keys (``mixed.<edge>.ops.<op>...``), so checkpoints of either
    execution load into the other; see :meth:`BatchedOp.unit_state` for the 1:1 map of the tensors.
    """

    def __init__(self, ref: SearchCell):
        super().__init__()
        self.reduction, self.cell_type, self.steps = ref.reduction, ref.cell_type, ref.steps
        self.multiplier, self.k, self.transit = ref.multiplier, ref.k, ref.transit
        self.feature_sharing = ref.feature_sharing
        self.edge_sources, self.edge_op_names = ref.edge_sources, ref.edge_op_names
        self.module_of_edge = ref.module_of_edge
        self.edge_nodes = [i for i, rows in enumerate(node_edge_slices(ref.steps))
                           for _ in range(rows.start, rows.stop)]
        self.preprocess0, self.preprocess1 = ref.preprocess0, ref.preprocess1
        self.channels = ref.preprocess1.op[1].out_channels
        self.part = self.channels // self.k
        self.n_ops = len(self.edge_op_names[0])
        self.unit_source = [0] * ref.n_units
        for e, u in enumerate(self.module_of_edge):
            self.unit_source[u] = self.edge_sources[e]
        unit_ops = [m.op_names for m in ref.mixed]
        self.fused = nn.ModuleList()
        for j in range(self.steps + 1):
            units = [u for u, s in enumerate(self.unit_source) if s == j]
            group = nn.ModuleDict()
            for name in dict.fromkeys(n for u in units for n in unit_ops[u] if n != "none"):
                us = [u for u in units if name in unit_ops[u]]
                idx = [unit_ops[u].index(name) for u in us]
                group[name] = BatchedOp(name, [ref.mixed[u].ops[i] for u, i in zip(us, idx)], us, idx, self.part)
            self.fused.append(group)
        self._unit_keys = {(j, name): list(op.unit_state(op.state_dict())[0])
                           for j, group in enumerate(self.fused) for name, op in group.items()}
        self.skip_dropout = 0.0
        self._plans: dict[Any, list[_SourcePlan | None]] = {}
        self._consts: dict[Any, torch.Tensor] = {}
        self._plan(None, None)  # the whole cell's plan, built now: a compiled forward then never sees it change
        self.register_state_dict_post_hook(_save_per_edge_layout)
        self.register_load_state_dict_pre_hook(_load_per_edge_layout)

    @property
    def n_units(self) -> int:
        return len(self.unit_source)

    def set_skip_dropout(self, p: float) -> None:
        """Dropout after stride-1 skip-connects only, as :meth:`SearchCell.set_skip_dropout`."""
        self.skip_dropout = p

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: CellWeights,
                perms: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        plan = self._plan(*active_subgraph(self, weights))
        if "fused" not in weights.derived:
            w = weights.ops if weights.edges is None else weights.ops * weights.edges.unsqueeze(-1)
            weights.derived["fused"] = torch.cat([w.reshape(-1), w.new_zeros(1)])
        coefficients = weights.derived["fused"]
        noise = self._skip_noise(plan, states) if self.training and self.skip_dropout > 0 else {}
        pieces: list[list[tuple[torch.Tensor, torch.Tensor | None, int]]] = [[] for _ in range(self.steps)]
        for j in range(self.steps + 1):
            if j >= 2:
                states.append(self._node(j - 2, pieces[j - 2], perms))
            sp = plan[j]
            if sp is not None:
                self._source(j, states[j], sp, coefficients, weights.edges, perms, noise, pieces)
        states.append(self._node(self.steps - 1, pieces[-1], perms))
        return torch.cat(states[-self.multiplier:], dim=1)

    def _plan(self, active_edges: list[bool] | None, active_ops: list[int] | None) -> list[_SourcePlan | None]:
        key = (None if active_edges is None else tuple(active_edges), None if active_ops is None else tuple(active_ops))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 512:  # sampled sub-graphs: keep the cache bounded
                self._plans.clear()
            plan = [_SourcePlan(self, j, active_edges, active_ops) for j in range(self.steps + 1)]
            self._plans[key] = plan = [sp if sp.edges else None for sp in plan]
        return plan

    def _const(self, name: str, device: torch.device, n: int) -> torch.Tensor:
        if name != "repeat":
            raise KeyError(name)
        if torch.compiler.is_compiling():  # a constant of the graph (see _SourcePlan.tensors)
            return torch.arange(self.part, device=device).repeat(n)
        key = (name, device, n)
        if key not in self._consts:  # the first C/K channels, once per unit
            self._consts[key] = torch.arange(self.part).repeat(n).to(device)
        return self._consts[key]

    def _gather(self, x: torch.Tensor, units: tuple[int, ...], perms: list[torch.Tensor | None] | None) -> torch.Tensor:
        """The op input of ``units`` stacked on the channel axis."""
        if perms is not None:
            return x.index_select(1, torch.cat([perms[u][: self.part] for u in units]))  # type: ignore[index]
        if len(units) == 1:
            return x if self.k == 1 else x.narrow(1, 0, self.part)
        return x.index_select(1, self._const("repeat", x.device, len(units)))

    def _source(self, j: int, x: torch.Tensor, sp: _SourcePlan, coefficients: torch.Tensor,
                edge_weights: torch.Tensor | None, perms: list[torch.Tensor | None] | None,
                noise: dict[int, torch.Tensor],
                pieces: list[list[tuple[torch.Tensor, torch.Tensor | None, int]]]) -> None:
        """Run every op of state ``j`` once for all its active edges; add each edge's output to its node's pieces."""
        index, edges, unit_pos = sp.tensors(x.device)
        c, n_edges, batch = self.part, len(sp.edges), x.shape[0]
        stride2 = self.reduction and j < 2
        inputs: dict[tuple[int, ...], list[torch.Tensor | None]] = {}
        outputs = []
        for name, a, n, units in sp.runs:
            op: BatchedOp = self.fused[j][name]  # type: ignore[assignment]
            if units not in inputs:
                g = self._gather(x, units, perms)
                if g.device.type == "cpu":  # oneDNN's grouped and depthwise convolutions: 2-3x faster in NHWC
                    g = g.contiguous(memory_format=torch.channels_last)
                inputs[units] = [g, None]
            given = inputs[units]
            if op.starts_with_relu:
                if given[1] is None:
                    given[1] = F.relu(given[0])
                y = op(given[1], a, n)
            else:
                y = op(given[0], a, n)
            if noise and op.identity:
                y = y * (noise[units[0]] if n == 1 else torch.cat([noise[u] for u in units], 1))
            if y.requires_grad and y.device.type == "cpu" and not torch.compiler.is_compiling():
                y.register_hook(_channels_last_grad)
            outputs.append(y)
        if outputs:
            stacked = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)
            h, w = stacked.shape[-2:]
            mixed = torch.bmm(coefficients[index].expand(batch, -1, -1), stacked.reshape(batch, sp.n_slots, -1))
            parts = mixed.view(batch, n_edges * c, h, w).split(c, 1)
        else:  # every active edge chose `none`
            h, w = ((x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2) if stride2 else x.shape[-2:]
            parts = (x.new_zeros(batch, c, h, w),) * n_edges
        rests: Sequence[torch.Tensor | None] = (None,) * n_edges
        if self.k > 1:
            if perms is None:
                rest = x.narrow(1, c, self.channels - c)
            else:
                rest = x.index_select(1, torch.cat([perms[u][c:] for u in sp.units]))  # type: ignore[index]
            if stride2:
                rest = F.max_pool2d(rest, 2, 2)
            rest = rest.unflatten(1, (-1, self.channels - c))
            if perms is not None and len(sp.units) != n_edges:
                rest = rest.index_select(1, unit_pos)  # feature sharing: edges of one unit share its channels
            if edge_weights is not None:
                rest = rest * edge_weights.index_select(0, edges).view(1, n_edges, 1, 1, 1)
            rests = rest.unbind(1) if rest.shape[1] == n_edges else rest.unbind(1) * n_edges
        for q, e in enumerate(sp.edges):
            pieces[sp.nodes[q]].append((parts[q], rests[q], e))

    def _node(self, node: int, pieces: list[tuple[torch.Tensor, torch.Tensor | None, int]],
              perms: list[torch.Tensor | None] | None) -> torch.Tensor:
        if not pieces:
            raise RuntimeError(f"node {node} of a {self.cell_type} cell has no active input edge")
        y = _sum([p[0] for p in pieces])
        if self.k == 1:
            return y
        if perms is None:
            return channel_shuffle(torch.cat([y, _sum([p[1] for p in pieces])], 1), self.k)  # type: ignore[misc]
        # random sampling: every edge's channels go back where they came from, summed over the edges
        stacked = torch.cat([t for p in pieces for t in p[:2]], 1)  # type: ignore[misc]
        target = torch.cat([perms[self.module_of_edge[p[2]]] for p in pieces])  # type: ignore[misc]
        out = stacked.new_zeros(stacked.shape[0], self.channels, *stacked.shape[2:])
        return out.index_add_(1, target, stacked)

    def _skip_noise(self, plan: list[_SourcePlan | None], states: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """P-DARTS's dropout masks of the identity skips, drawn in the reference's order (first use of each unit
        in edge order), as ``F.dropout`` draws them."""
        p = self.skip_dropout
        ref = states[1]
        size = ref.shape[-2:] if not self.reduction else ((ref.shape[-2] + 1) // 2, (ref.shape[-1] + 1) // 2)
        noise: dict[int, torch.Tensor] = {}
        for e, j in enumerate(self.edge_sources):
            sp, u = plan[j], self.module_of_edge[e]
            op = self.fused[j]["skip_connect"] if "skip_connect" in self.fused[j] else None
            if sp is None or e not in sp.edges or u in noise or op is None or not op.identity:
                continue
            if not any(name == "skip_connect" and u in units for name, _, _, units in sp.runs):
                continue
            shape = (ref.shape[0], self.part, *(states[j].shape[-2:] if j < 2 else size))
            noise[u] = torch.empty(shape, dtype=ref.dtype, device=ref.device).bernoulli_(1 - p).div_(1 - p)
        return noise


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Left-to-right sum (a chain of adds costs no operator call in backward, unlike stack + sum)."""
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


def _save_per_edge_layout(cell: FusedCell, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict hook: the fused tensors under the reference's per-edge keys (``mixed.<unit>.ops.<op>.*``)."""
    for j, group in enumerate(cell.fused):
        for name, op in group.items():
            base = f"{prefix}fused.{j}.{name}."
            local = {k[len(base):]: state.pop(k) for k in [k for k in state if k.startswith(base)]}
            for u, o, part in zip(op.units, op.op_index, op.unit_state(local)):
                for suffix, value in part.items():
                    state[f"{prefix}mixed.{u}.ops.{o}.{suffix}"] = value


def _load_per_edge_layout(cell: FusedCell, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: per-edge keys (either execution's state_dict) into the fused tensors."""
    for j, group in enumerate(cell.fused):
        for name, op in group.items():
            keys = [[f"{prefix}mixed.{u}.ops.{o}.{s}" for s in cell._unit_keys[(j, name)]]
                    for u, o in zip(op.units, op.op_index)]
            if not all(k in state for unit in keys for k in unit):
                continue  # left to load_state_dict's own missing/unexpected key report
            per_unit = [{s: state.pop(k) for s, k in zip(cell._unit_keys[(j, name)], unit)} for unit in keys]
            for key, value in op.merge_unit_state(per_unit).items():
                state[f"{prefix}fused.{j}.{name}.{key}"] = value


class SearchNetwork(nn.Module):
    """The searched supernet. ``SearchNetwork(16, 10, 8)`` is PC-DARTS's CIFAR supernet, ``k=1,
    edge_norm=False`` DARTS's.

    ``primitives`` is one op list for every edge, or (for P-DARTS's pruned stages) a dict with one list of op
    lists per cell type. ``channel_sampling='random'`` draws a fresh channel subset every step from
    ``channel_generator`` (seeded, so data-parallel ranks draw the same subset). ``execution`` picks the
    cell implementation (:data:`EXECUTIONS`): both give the same numbers from the same parameters and share one
    ``state_dict`` layout.
    """

    def __init__(self, C: int, num_classes: int, layers: int, k: int = 4, edge_norm: bool = True, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3,
                 primitives: Sequence[str] | dict[str, Sequence[Sequence[str]]] = PRIMITIVES,
                 channel_sampling: str = "fixed", stem: str = "cifar", weighting: ArchWeighting | None = None,
                 feature_sharing: bool = False, transit_cells: Sequence[int] = (), seed: int = 0,
                 execution: str = "fused"):
        super().__init__()
        validate_supernet_shape(C, layers, k, stem_multiplier, stem)
        if channel_sampling not in ("fixed", "random"):
            raise ValueError(f"channel_sampling must be 'fixed' or 'random', got {channel_sampling!r}")
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
        self.execution = execution
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
            self.cells.append(FusedCell(cell) if execution == "fused" else cell)
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
        self._channel_seed = seed + 1
        self.channel_generator = torch.Generator().manual_seed(self._channel_seed)

    def place_channel_generator(self, device: torch.device) -> None:
        """Draw the channel samples on ``device`` (a CUDA generator: no host round trip per step), seeded as on
        the CPU; a no-op on the CPU."""
        if torch.device(device).type != self.channel_generator.device.type:
            self.channel_generator = torch.Generator(device).manual_seed(self._channel_seed)

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
        """The per-edge mixed ops (reference execution; the fused cells have none)."""
        return [m for m in self.modules() if isinstance(m, MixedOp)]

    def per_edge_layout(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors named as in ``named_parameters()`` / ``named_buffers()`` (e.g. gradients) under the per-edge
        names of the reference execution, the names ``state_dict()`` uses for both executions."""
        out = dict(tensors)
        for i, cell in enumerate(self.cells):
            if isinstance(cell, FusedCell):
                _save_per_edge_layout(cell, out, f"cells.{i}.", None)
        return out

    def set_skip_dropout(self, p: float) -> None:
        """P-DARTS's dropout after every stride-1 skip-connect (identity) of every cell."""
        for cell in self.cells:
            cell.set_skip_dropout(p)

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

    def _sample_perms(self, cell: SearchCell | FusedCell, device: torch.device) -> list[torch.Tensor | None]:
        c = cell.preprocess1.op[1].out_channels
        gen = self.channel_generator
        return [torch.randperm(c, generator=gen, device=gen.device).to(device) for _ in range(cell.n_units)]

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
