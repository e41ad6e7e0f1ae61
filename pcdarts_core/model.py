"""The evaluation networks that retrain a derived cell from scratch (DARTS Sec. 3.3 and Appendix A.2; PC-DARTS
Sec. 4.2 and 4.3 use the same ones).

The searched cell is stacked ``layers`` times with reduction cells at 1/3 and 2/3 of the depth; every op gets an
affine BatchNorm (unlike the search network). Regularizers of the evaluation recipe live here as well: drop path
(per sample, on every non-identity op) and the auxiliary classifier after the second reduction cell.

Everything a node does is read from ``genotype.nodes(cell)``, so a node may take any number (>= 1) of inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .genotypes import Genotype
from .ops import FactorizedReduce, Identity, ReLUConvBN, make_op
from .supernet import reduction_layers


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples of one path with probability ``drop_prob``, rescaling the survivors by 1/keep so the
    expectation is unchanged (DARTS Appendix A.2, after FractalNet/NASNet's ScheduledDropPath)."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class EvalCell(nn.Module):
    """One cell of the retrained network, built from the genotype's ``cell`` ('normal' or 'reduce').

    Inputs c_{k-2} and c_{k-1} are brought to ``c`` channels (FactorizedReduce on c_{k-2} when the previous
    cell halved the resolution, so both inputs agree); edges leaving them stride 2 in a reduction cell.
    """

    def __init__(self, genotype: Genotype, c_prev_prev: int, c_prev: int, c: int, reduction: bool,
                 reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        cell = "reduce" if reduction else "normal"
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(c_prev_prev, c, affine=True)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, c, 1, 1, 0, affine=True)
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0, affine=True)

        self.node_inputs: list[list[int]] = []
        self.ops = nn.ModuleList()
        for node in genotype.nodes(cell):
            ops = nn.ModuleList()
            for name, inp in node:
                ops.append(make_op(name, c, 2 if reduction and inp < 2 else 1, affine=True))
            self.ops.append(ops)
            self.node_inputs.append([inp for _, inp in node])
        self.concat: list[int] = list(getattr(genotype, f"{cell}_concat"))
        if reduction and any(i < 2 for i in self.concat):
            # The cell inputs keep their resolution in a reduction cell, so they cannot join the reduced nodes.
            raise ValueError(f"genotype reduce_concat {self.concat} includes a cell input; a reduction cell can "
                             f"only concatenate intermediate nodes (2..{len(self.node_inputs) + 1})")
        self.multiplier = len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        use_drop = self.training and drop_prob > 0.0
        for ops, inputs in zip(self.ops, self.node_inputs):
            total = None
            for op, inp in zip(ops, inputs):
                h = op(states[inp])
                if use_drop and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                total = h if total is None else total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """Auxiliary classifier on the output of the second reduction cell (DARTS Appendix A.2, weight 0.4).

    The paper-sized map pools with AvgPool 5 (stride ``pool_stride``) to 2x2 and a 2x2 conv then leaves 1x1.
    On maps smaller than the pooling window (tiny test inputs) the pool becomes adaptive to 2x2, and anything
    still larger than 1x1 after the 2x2 conv is averaged, so the head never fails on a shape.
    """

    def __init__(self, c: int, num_classes: int, pool_stride: int, bn_after_768: bool):
        super().__init__()
        self.pool = nn.AvgPool2d(5, stride=pool_stride, padding=0, count_include_pad=False)
        self.relu = nn.ReLU(inplace=False)
        layers: list[nn.Module] = [nn.Conv2d(c, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
                                   nn.Conv2d(128, 768, 2, bias=False)]
        if bn_after_768:
            layers.append(nn.BatchNorm2d(768))
        layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        x = self.pool(x) if min(x.shape[-2:]) >= 5 else F.adaptive_avg_pool2d(x, 2)
        x = self.features(x)
        if x.shape[-2:] != (1, 1):
            x = F.adaptive_avg_pool2d(x, 1)
        return self.classifier(x.flatten(1))


class AuxiliaryHeadCIFAR(AuxiliaryHead):
    """CIFAR head, for an 8x8 map: AvgPool 5 stride 3 -> 2x2, conv 1x1 128, BN, ReLU, conv 2x2 768, BN, ReLU."""

    def __init__(self, c: int, num_classes: int):
        super().__init__(c, num_classes, pool_stride=3, bn_after_768=True)


class AuxiliaryHeadImageNet(AuxiliaryHead):
    """ImageNet head. Official DARTS comments say 14x14, but after the second reduction the map is 7x7 at 224
    input; AvgPool 5 stride 2 takes that to 2x2. As in the official code (kept "for consistency with the
    experiments in the paper"), there is no BN after the 768-channel conv."""

    def __init__(self, c: int, num_classes: int):
        super().__init__(c, num_classes, pool_stride=2, bn_after_768=False)


class _EvalNetwork(nn.Module):
    """The shared cell stack: reductions at layers//3 and 2*layers//3 double the channels; the auxiliary head
    sits after cell 2*layers//3 and only runs in training mode."""

    auxiliary: bool
    drop_path_prob: float  # the training loop raises it linearly over the epochs (DARTS Appendix A.2)

    def _build_cells(self, genotype: Genotype, C: int, layers: int, num_classes: int, c_pp: int, c_p: int,
                     reduction_prev: bool, aux_cls: type[AuxiliaryHead]) -> None:
        if layers < 3:
            raise ValueError(f"layers must be at least 3 so the two reduction cells are distinct, got {layers}")
        self._layers = layers
        c_curr = C
        self.cells = nn.ModuleList()
        c_aux = None
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            if reduction:
                c_curr *= 2
            cell = EvalCell(genotype, c_pp, c_p, c_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_pp, c_p = c_p, cell.multiplier * c_curr
            if i == self.aux_position:
                c_aux = c_p
        self.auxiliary_head: AuxiliaryHead | None = None
        if self.auxiliary:
            assert c_aux is not None
            self.auxiliary_head = aux_cls(c_aux, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)

    @property
    def aux_position(self) -> int:
        return 2 * self._layers // 3

    def _run_cells(self, s0: torch.Tensor, s1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits_aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_position and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return logits, logits_aux


def _check_args(C: int, num_classes: int, layers: int, drop_path_prob: float) -> None:
    if C < 1 or num_classes < 1 or layers < 1:
        raise ValueError(f"C, num_classes and layers must be positive, got C={C}, num_classes={num_classes}, "
                         f"layers={layers}")
    if not 0.0 <= drop_path_prob < 1.0:
        raise ValueError(f"drop_path_prob must be in [0, 1), got {drop_path_prob}")


class NetworkCIFAR(_EvalNetwork):
    """CIFAR evaluation network (DARTS Sec. 3.3: C=36, 20 cells, auxiliary head; 3.3M parameters for DARTS_V2).

    Stem: 3x3 conv to 3C and BN. ``forward`` returns (logits, logits_aux), logits_aux being None unless the
    network is training with ``auxiliary`` on. ``drop_path_prob`` is read on every forward.
    """

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype,
                 drop_path_prob: float = 0.0):
        super().__init__()
        _check_args(C, num_classes, layers, drop_path_prob)
        self.auxiliary = auxiliary
        self.drop_path_prob = drop_path_prob
        stem_multiplier = 3
        c_stem = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, c_stem, 3, padding=1, bias=False), nn.BatchNorm2d(c_stem))
        self._build_cells(genotype, C, layers, num_classes, c_stem, c_stem, False, AuxiliaryHeadCIFAR)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.stem(x)
        return self._run_cells(s, s)


class NetworkImageNet(_EvalNetwork):
    """ImageNet evaluation network (DARTS Sec. 3.4 "mobile setting": C=48, 14 cells, 224x224 input).

    Three stride-2 3x3 convs bring 224 to 28 before the first cell: stem0 (two of them, to C/2 then C) feeds
    c_{k-2}, stem1 (the third) feeds c_{k-1}, so the first cell sees a reduction before it. The final 7x7 map
    is averaged (adaptively, which equals the paper's AvgPool 7 at 224 input).
    """

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype,
                 drop_path_prob: float = 0.0):
        super().__init__()
        _check_args(C, num_classes, layers, drop_path_prob)
        if C % 2:
            raise ValueError(f"the ImageNet stem needs an even C, got {C}")
        self.auxiliary = auxiliary
        self.drop_path_prob = drop_path_prob
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2), nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
        self._build_cells(genotype, C, layers, num_classes, C, C, True, AuxiliaryHeadImageNet)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s0 = self.stem0(x)
        s1 = self.stem1(s0)
        return self._run_cells(s0, s1)
