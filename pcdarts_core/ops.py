"""The DARTS operation set (Liu et al., ICLR 2019, Sec. 3.1 and Appendix A.1).

Every op maps ``C`` channels to ``C`` channels; a stride-2 op halves the resolution. The search network builds
them with ``affine=False`` BatchNorm (the arch weights carry the scale), the evaluation networks with
``affine=True``. Ordering is ReLU-Conv-BN throughout, as in the paper.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

#: The eight candidate operations, in the order of the official DARTS/PC-DARTS code (alphas' columns follow it).
PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

#: sharpDARTS's search space (ahundt/sharpDARTS, README's search commands: ``--primitives DARTS_PRIMITIVES`` with the
#: default ``--ops OPS`` table of ``cnn/operations.py``): DARTS's eight op names, but built by sharpDARTS's table, in which
#: three of them differ from DARTS's and so get their own names here (a genotype must say which op it means).
SHARPDARTS_PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "sharp_avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "sharp_dil_conv_3x3",
    "sharp_dil_conv_5x5",
)


class ReLUConvBN(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True,
                 bias: bool = False):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias),
            nn.BatchNorm2d(c_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """One depthwise-separable block: ReLU, depthwise kxk (dilated), pointwise 1x1, BN."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class SepConv(nn.Module):
    """Two stacked depthwise-separable blocks, stride (and ``dilation``) on the first (DARTS Appendix A.1).

    This is also sharpDARTS's SharpSepConv (``cnn/operations.py``) with its middle width equal to ``c_out``, the
    only width the official op table uses for ``sep_conv`` and ``dil_conv``: its ``dil_conv_kxk`` is this block with
    ``dilation=2`` on the first depthwise conv (the second is never dilated).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True,
                 dilation: int = 1):
        super().__init__()
        self.op = nn.Sequential(
            DilConv(c_in, c_in, kernel, stride, padding, dilation, affine),
            DilConv(c_in, c_out, kernel, 1, (kernel - 1) // 2, 1, affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    """The `none` op: zeros of the output shape (kept so its weight competes in the softmax)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class Noise(nn.Module):
    """RobustDARTS's `noise` op (Zela et al., ICLR 2020, space S4; ``NoiseOp(stride, 0., 1.)`` in their
    operations.py): standard normal noise of the output's shape, ignoring the input's values, in training and
    evaluation alike. Drawn from torch's default generator, so a seeded run repeats it."""

    def __init__(self, stride: int, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.stride, self.mean, self.std = stride, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return torch.empty_like(x).normal_(self.mean, self.std)


class FactorizedReduce(nn.Module):
    """Stride-2 skip: two 1x1 stride-2 convs to c_out/2, the second on the input shifted by one pixel."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True):
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        # Shift by one pixel and pad back to the input's size: identical to the official x[:, :, 1:, 1:] on even
        # sizes (the padded row/column is never sampled by the stride-2 1x1 conv) and also right on odd/1x1 maps.
        shifted = nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


OpFactory = Callable[[int, int, bool], nn.Module]

OPS: dict[str, OpFactory] = {
    "none": lambda c, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda c, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda c, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda c, stride, affine: Identity() if stride == 1 else FactorizedReduce(c, c, affine),
    "sep_conv_3x3": lambda c, stride, affine: SepConv(c, c, 3, stride, 1, affine),
    "sep_conv_5x5": lambda c, stride, affine: SepConv(c, c, 5, stride, 2, affine),
    "sep_conv_7x7": lambda c, stride, affine: SepConv(c, c, 7, stride, 3, affine),
    "dil_conv_3x3": lambda c, stride, affine: DilConv(c, c, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda c, stride, affine: DilConv(c, c, 5, stride, 4, 2, affine),
    # sharpDARTS's table: AvgPool2d with its default count_include_pad=True, and dil_conv as two blocks.
    "sharp_avg_pool_3x3": lambda c, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1),
    "sharp_dil_conv_3x3": lambda c, stride, affine: SepConv(c, c, 3, stride, 2, affine, dilation=2),
    "sharp_dil_conv_5x5": lambda c, stride, affine: SepConv(c, c, 5, stride, 4, affine, dilation=2),
    "noise": lambda c, stride, affine: Noise(stride),
    # NAS-Bench-201's convolutions (Dong & Yang, ICLR 2020; xautodl cell_operations.py): ReLU-Conv-BN whose conv
    # carries a bias exactly when the BN has no affine parameters (the search network's).
    "nor_conv_1x1": lambda c, stride, affine: ReLUConvBN(c, c, 1, stride, 0, affine, bias=not affine),
    "nor_conv_3x3": lambda c, stride, affine: ReLUConvBN(c, c, 3, stride, 1, affine, bias=not affine),
}

#: Ops without weights: the ones a collapsed DARTS cell is made of (RobustDARTS, Sec. 3; `none` included).
PARAMETER_FREE_OPS: frozenset[str] = frozenset({"none", "skip_connect", "max_pool_3x3", "avg_pool_3x3", "noise"})


def check_op_name(name: str) -> str:
    """Return ``name`` if it is a known op, else raise ``ValueError`` naming the known ones."""
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; known ops: {', '.join(OPS)}")
    return name


def make_op(name: str, channels: int, stride: int, affine: bool, search: bool = False) -> nn.Module:
    """Build op ``name``. In the search network pools get a non-affine BN so their scale matches the convs'."""
    op = OPS[check_op_name(name)](channels, stride, affine)
    if search and "pool" in name:
        op = nn.Sequential(op, nn.BatchNorm2d(channels, affine=False))
    return op
