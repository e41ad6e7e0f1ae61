"""EnTranNAS (Yang et al., CVPR 2021, arXiv 2101.11342): Engine-cells and Transit-cells, feature sharing, and
EnTranNAS-DST's differentiable sparsification.

* Engine-cells are ordinary differentiable cells (all mixed ops, PC-DARTS partial channels and edge
  normalization); Transit-cells run only the sub-graph the derivation rule picks *now* (re-derived every forward
  from the current arch parameters), so the searched network is mostly the network that will be evaluated.
  Here the engines are the first cell and the two reduction cells (``engine_cells='auto'``): the first normal
  cell and every reduction cell then see the full mixed ops, and the remaining normal cells, the bulk of the
  compute, are transits. Any other set can be named, e.g. ``engine_cells='0,1'``.
* Feature sharing: a source node computes each candidate op once and every successor reuses that output
  (``feature_sharing=True`` in the supernet), which balances the ops' training and saves compute.
* EnTranNAS-DST (``dst=True``): node j has a threshold t_j = sigmoid(b_j) (extra arch parameters); with
  p the node's edge importance (softmax of the betas over its inputs), the edge weight is
  q = ReLU(p / max p - t_j), renormalized over the node's inputs. Inputs with q = 0 are pruned in search and in
  the derived cell, so a node keeps any number (>= 1: the strongest input has q > 0 whenever t_j < 1) of inputs.

Derivation: top-2 inputs and argmax op (PC-DARTS rule) without DST; with DST every input with q > 0, each with its
argmax non-`none` op. All other settings are PC-DARTS's.

Host syncs: which edges and ops a transit cell runs is decided on the host, so each forward reads the arch
parameters back once per cell type (DST: twice, the kept edges and the alphas), at that step of derivation; the
transit cells of one type share the decision. Nothing else in a step reads a value back.

What was checked where. EnTranNAS has no public code. Its text was looked up in the stored copies of the paper
(search tool, pages corpus: ar5iv.labs.arxiv.org/html/2101.11342 and the SPIQA copy of 2101.11342v1), which give
the abstract and introduction only. Confirmed there: Engine-cells are differentiable, Transit-cells only transit
the sub-graph that architecture derivation picks; a feature-sharing strategy balances the ops' optimization and
saves compute; the derivation is replaced by a differentiable sparsification that keeps the derived cell equal to
the Engine-cell's and lets a node connect to any number of earlier nodes; the standard-space CIFAR-10 search costs
0.06 GPU-day. Not confirmed (the method and experiment sections were not reachable): which cells are engines
(``engine_cells='auto'`` is this project's choice), the exact sparsification formula and the thresholds'
initialization (``threshold_init=0``, t_j = 0.5); both are options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import MethodOptions, SearchConfig
from ..genotypes import Genotype, node_edge_slices
from ..supernet import CELL_TYPES, ArchWeighting, CellWeights, SearchNetwork, reduction_layers
from .base import SearchMethod


@dataclass(frozen=True)
class EnTranNasOptions(MethodOptions):
    engine_cells: str = "auto"  # 'auto' (first + reduction cells) or comma-separated cell indices
    feature_sharing: bool = True
    dst: bool = False  # EnTranNAS-DST: learnable per-node thresholds instead of the top-2 rule
    threshold_init: float = 0.0  # b_j at the start (t_j = sigmoid(b_j) = 0.5)


def engine_cell_indices(spec: str, layers: int) -> tuple[int, ...]:
    """The engine cells named by ``spec`` ('auto': cell 0 and the reduction cells)."""
    if spec.strip() == "auto":
        return tuple(sorted({0, *reduction_layers(layers)}))
    try:
        cells = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"engine_cells must be 'auto' or comma-separated cell indices, got {spec!r}") from None
    if not cells or not all(0 <= c < layers for c in cells):
        raise ValueError(f"engine_cells {spec!r} must name at least one of the cells 0..{layers - 1}")
    return tuple(cells)


def best_ops(alphas: torch.Tensor, op_names: list[tuple[str, ...]]) -> list[int]:
    """The argmax non-`none` op of each edge (the alphas read back to the host once)."""
    out = []
    for names, row in zip(op_names, alphas.tolist()):
        scores = [float("-inf") if n == "none" else a for n, a in zip(names, row)]
        out.append(max(range(len(names)), key=lambda i: scores[i]))
    return out


class SparsifyWeighting(ArchWeighting):
    """EnTranNAS-DST: q = ReLU(p / max p - sigmoid(b_j)) per node, renormalized; transits run the q > 0 inputs."""

    #: keeps t_j < 1 in float32 so the node's strongest input always survives
    max_threshold = 1.0 - 1e-6

    def __init__(self, threshold_init: float = 0.0):
        self.threshold_init = threshold_init

    def extra_parameters(self, net: SearchNetwork) -> dict[str, torch.Tensor]:
        return {f"thresholds_{t}": torch.full((net.steps,), float(self.threshold_init)) for t in CELL_TYPES}

    def edge_weights(self, net: SearchNetwork, cell_type: str) -> torch.Tensor:
        betas = net.betas(cell_type)
        assert betas is not None, "EnTranNAS-DST needs edge parameters (edge_norm=True)"
        thresholds = torch.sigmoid(net.extra_arch[f"thresholds_{cell_type}"]).clamp(max=self.max_threshold)
        parts = []
        for node, rows in enumerate(node_edge_slices(net.steps)):
            p = F.softmax(betas[rows], dim=-1)
            q = F.relu(p / p.max() - thresholds[node])
            parts.append(q / q.sum())
        return torch.cat(parts)

    def cell_weights(self, net: SearchNetwork, cell_type: str) -> CellWeights:
        """The transit sub-graph (inputs with q > 0, each edge's best op) is a host decision: two reads per cell
        type and forward (the edges kept, the alphas)."""
        ops = self.op_weights(net.alphas(cell_type))
        edges = self.edge_weights(net, cell_type)
        keep = (edges.detach() > 0).tolist()
        chosen = best_ops(net.alphas(cell_type).detach(), net.edge_primitives[cell_type])
        return CellWeights(ops, edges, transit=(keep, chosen))


class EnTranNas(SearchMethod):
    name = "entrannas"
    options_type = EnTranNasOptions
    summary = ("engine cells (full mixed ops) + transit cells running only the derived sub-graph, feature "
               "sharing; DST: per-node thresholds, any number of inputs per node")

    def validate(self, cfg: SearchConfig) -> None:
        o: EnTranNasOptions = cfg.options  # type: ignore[assignment]
        engine_cell_indices(o.engine_cells, cfg.layers)
        if o.dst and not cfg.edge_norm:
            raise ValueError("EnTranNAS-DST thresholds act on the edge importance: edge_norm must be true")
        ops = self.edge_primitives(cfg)
        if o.feature_sharing and isinstance(ops, dict) and any(len(set(edges)) > 1 for edges in ops.values()):
            raise ValueError(f"EnTranNAS's feature sharing needs the same ops on every edge; search space "
                             f"{cfg.search_space} has per-edge op sets: set options.feature_sharing: false")

    def weighting(self, cfg: SearchConfig) -> ArchWeighting:
        o: EnTranNasOptions = cfg.options  # type: ignore[assignment]
        return SparsifyWeighting(o.threshold_init) if o.dst else ArchWeighting()

    def static_graph(self, cfg: SearchConfig) -> bool:
        return False  # transit cells re-derive their sub-graph every forward

    def build_network(self, cfg: SearchConfig, num_classes: int) -> SearchNetwork:
        o: EnTranNasOptions = cfg.options  # type: ignore[assignment]
        engines = engine_cell_indices(o.engine_cells, cfg.layers)
        return SearchNetwork(cfg.init_channels, num_classes, cfg.layers, k=cfg.k, edge_norm=cfg.edge_norm,
                             primitives=self.edge_primitives(cfg), channel_sampling=cfg.channel_sampling,
                             stem="imagenet" if cfg.dataset == "imagenet" else "cifar",
                             weighting=self.weighting(cfg), feature_sharing=o.feature_sharing,
                             transit_cells=[i for i in range(cfg.layers) if i not in engines], seed=cfg.seed,
                             execution=cfg.execution)

    def genotype(self, net: SearchNetwork) -> Genotype:
        if isinstance(net.weighting, SparsifyWeighting):
            return sparse_genotype(net, net.weighting)
        return net.genotype()


def sparse_genotype(net: SearchNetwork, weighting: SparsifyWeighting) -> Genotype:
    """EnTranNAS-DST's derived cell: per node every input with q > 0 (strongest first), argmax op on each."""
    cells: dict[str, tuple[tuple[tuple[str, int], ...], tuple[int, ...]]] = {}
    with torch.no_grad():
        for t in CELL_TYPES:
            q = weighting.edge_weights(net, t).float().tolist()
            chosen = best_ops(net.alphas(t).detach(), net.edge_primitives[t])
            edges: list[tuple[str, int]] = []
            counts = []
            for rows in node_edge_slices(net.steps):
                inputs = sorted((j for j in range(rows.stop - rows.start) if q[rows.start + j] > 0),
                                key=lambda j: -q[rows.start + j])
                edges += [(net.edge_primitives[t][rows.start + j][chosen[rows.start + j]], j) for j in inputs]
                counts.append(len(inputs))
            cells[t] = (tuple(edges), tuple(counts))
    concat = tuple(range(2, 2 + net.steps))
    return Genotype(cells["normal"][0], concat, cells["reduce"][0], concat, cells["normal"][1], cells["reduce"][1])


METHOD = EnTranNas()
