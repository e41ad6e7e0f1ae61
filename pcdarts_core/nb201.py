"""NAS-Bench-201's networks (Dong & Yang, ICLR 2020): the evaluation network of a cell and the search supernet.

Both share the benchmark's macro skeleton (xautodl ``TinyNetwork`` / ``TinyNetworkDarts``): a 3x3 conv + BN stem
with C channels, three stages of N cells at C, 2C and 4C channels with a ResNet basic block (stride 2, avg-pool +
1x1 conv shortcut) between stages, then BN-ReLU, global average pooling and a linear classifier. The benchmark
trains C=16, N=5, and its papers' DARTS searches use the same skeleton as the supernet.

The supernet has one cell type ('normal', shared by all 3N cells) with a (6, 5) alpha matrix over
:data:`~pcdarts_core.nb201_arch.NB201_OPS`. A method's :class:`~pcdarts_core.supernet.ArchWeighting` turns alphas
into op weights (softmax, sharpDARTS's Max-W); with ``edge_norm`` the betas are normalized over each node's
inputs (PC-DARTS). Partial channels (``k > 1``) run the ops on the first C/K channels and shuffle, as PC-DARTS's
fixed slice; every cell edge has stride 1, so no bypass pooling is needed.

Derivation is the benchmark's own (``TinyNetworkDarts.genotype``): the argmax op of every edge, `none` included,
because in this space `none` is how a cell drops an edge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .nb201_arch import EDGES, N_NODES, NB201_OPS, NB201Arch
from .ops import OPS, ReLUConvBN
from .supernet import ArchWeighting, SearchNetwork, channel_shuffle

CELL_TYPES = ("normal",)


class ResNetBasicBlock(nn.Module):
    """The benchmark's reduction block: two ReLU-Conv-BN 3x3 (the first with the stride) plus a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, affine: bool = True):
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride, 1, affine, bias=not affine)
        self.conv_b = ReLUConvBN(c_out, c_out, 3, 1, 1, affine, bias=not affine)
        if stride == 2:
            self.downsample: nn.Module | None = nn.Sequential(
                nn.AvgPool2d(kernel_size=2, stride=2, padding=0), nn.Conv2d(c_in, c_out, 1, bias=False))
        elif c_in != c_out:
            self.downsample = ReLUConvBN(c_in, c_out, 1, 1, 0, affine, bias=not affine)
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return residual + self.conv_b(self.conv_a(x))


def stage_layout(C: int, N: int) -> list[tuple[int, bool]]:
    """(channels, is_reduction_block) of each of the 3N + 2 blocks."""
    return ([(C, False)] * N + [(2 * C, True)] + [(2 * C, False)] * N + [(4 * C, True)] + [(4 * C, False)] * N)


class _Skeleton(nn.Module):
    """Stem, 3 stages of cells with residual blocks between them, BN-ReLU, pooling, classifier."""

    def __init__(self, C: int, N: int, num_classes: int, make_cell) -> None:
        super().__init__()
        if C < 1 or N < 1:
            raise ValueError(f"NAS-Bench-201 networks need C >= 1 and N >= 1, got C={C}, N={N}")
        self.C, self.N = C, N
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cells = nn.ModuleList()
        c_prev = C
        for c, reduction in stage_layout(C, N):
            self.cells.append(ResNetBasicBlock(c_prev, c, 2) if reduction else make_cell(c))
            c_prev = c
        self.lastact = nn.Sequential(nn.BatchNorm2d(c_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.global_pooling(self.lastact(x)).flatten(1))


# -- evaluation ------------------------------------------------------------------------------------------------
class InferCell(nn.Module):
    """A derived cell: node j is the sum of its six-edge ops (all of them, `none` included, as the benchmark)."""

    def __init__(self, arch: NB201Arch, C: int):
        super().__init__()
        self.edges = nn.ModuleList(OPS[op](C, 1, True) for op in arch.ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for dst in range(1, N_NODES):
            nodes.append(sum(self.edges[e](nodes[src]) for e, (src, d) in enumerate(EDGES) if d == dst))
        return nodes[-1]


class NB201Network(_Skeleton):
    """The benchmark's ``TinyNetwork(C, N, arch, num_classes)``. ``forward`` returns ``(logits, None)`` like the
    DARTS evaluation networks (there is no auxiliary head); ``drop_path_prob`` is accepted and unused."""

    def __init__(self, C: int, num_classes: int, N: int, arch: NB201Arch):
        super().__init__(C, N, num_classes, lambda c: InferCell(arch, c))
        self.arch = arch
        self.drop_path_prob = 0.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        return self.head(x), None


# -- search ----------------------------------------------------------------------------------------------------
class SearchCell(nn.Module):
    """Every edge holds all five ops (non-affine BN), on C/K channels when ``k > 1``."""

    def __init__(self, C: int, k: int):
        super().__init__()
        self.k = k
        self.edges = nn.ModuleList(
            nn.ModuleList(OPS[op](C // k, 1, False) for op in NB201_OPS) for _ in EDGES)

    def edge(self, e: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        part = x if self.k == 1 else x[:, : x.shape[1] // self.k]
        y = sum(w[o] * op(part) for o, op in enumerate(self.edges[e]))
        if self.k == 1:
            return y
        return channel_shuffle(torch.cat([y, x[:, x.shape[1] // self.k:]], dim=1), self.k)

    def forward(self, x: torch.Tensor, ops: torch.Tensor, edges: torch.Tensor | None) -> torch.Tensor:
        nodes = [x]
        for dst in range(1, N_NODES):
            terms = []
            for e, (src, d) in enumerate(EDGES):
                if d == dst:
                    y = self.edge(e, nodes[src], ops[e])
                    terms.append(y if edges is None else edges[e] * y)
            nodes.append(sum(terms[1:], terms[0]))
        return nodes[-1]


def node_softmax(betas: torch.Tensor) -> torch.Tensor:
    """PC-DARTS's edge normalization on this cell: softmax of the betas over each node's input edges."""
    out = torch.empty_like(betas)
    for dst in range(1, N_NODES):
        idx = [e for e, (_, d) in enumerate(EDGES) if d == dst]
        out[idx] = F.softmax(betas[idx], dim=-1)
    return out


class NB201SearchNetwork(_Skeleton):
    """The supernet, with the arch interface the search loop and methods use (``alphas``, ``betas``,
    ``arch_parameters``, ``weight_parameters``, ``genotype``, ``weighting``, ``edge_primitives``)."""

    cell_types = CELL_TYPES
    steps = N_NODES - 1

    def __init__(self, C: int, num_classes: int, N: int, k: int = 1, edge_norm: bool = False,
                 weighting: ArchWeighting | None = None, seed: int = 0):
        if k < 1 or C % k:
            raise ValueError(f"K={k} does not divide the channel count C={C}: partial channels take C/K of them")
        super().__init__(C, N, num_classes, lambda c: SearchCell(c, k))
        self.k, self.layers, self.edge_norm = k, N, edge_norm
        self.weighting = weighting or ArchWeighting()
        self.edge_primitives = {"normal": [NB201_OPS] * len(EDGES)}
        gen = torch.Generator().manual_seed(seed)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(len(EDGES), len(NB201_OPS), generator=gen))
        self.betas_normal = nn.Parameter(1e-3 * torch.randn(len(EDGES), generator=gen)) if edge_norm else None
        self.extra_arch = nn.ParameterDict()
        self.channel_generator = torch.Generator().manual_seed(seed + 1)  # unused: fixed channel slice only

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas_normal] + ([self.betas_normal] if self.betas_normal is not None else [])

    # everything but the arch parameters, and the arch parameters by name: exactly PC-DARTS's supernet's
    weight_parameters = SearchNetwork.weight_parameters
    named_arch_parameters = SearchNetwork.named_arch_parameters

    def alphas(self, cell_type: str = "normal") -> torch.Tensor:
        return self.alphas_normal

    def betas(self, cell_type: str = "normal") -> torch.Tensor | None:
        return self.betas_normal

    def mixed_ops(self) -> list:
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self.weighting.op_weights(self.alphas_normal)
        edges = None if self.betas_normal is None else node_softmax(self.betas_normal)
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x, ops, edges) if isinstance(cell, SearchCell) else cell(x)
        return self.head(x)

    def genotype(self) -> NB201Arch:
        """The benchmark's derivation: the argmax op of each edge, `none` included."""
        best = self.alphas_normal.detach().argmax(dim=-1).tolist()
        return NB201Arch(tuple(NB201_OPS[i] for i in best))
