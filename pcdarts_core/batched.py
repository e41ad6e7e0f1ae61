"""One candidate op run on many edges at once: the building block of the fused supernet.

The same op on ``n`` edges (each on its own ``c`` input channels) is one op on ``n * c`` channels when its
layers are per-channel or grouped: a depthwise conv stays depthwise, a pointwise (or any grouped) conv becomes a
conv with ``n`` times the groups, pools and BatchNorm are per-channel anyway. :func:`merge_ops` builds that op from
the ``n`` per-edge modules *by concatenating their parameters and buffers along dim 0* (a grouped conv's weight is
exactly the concatenation of its groups' weights), so the batched op computes the same numbers with the same
parameters, and :meth:`BatchedOp.unit_state` / :meth:`BatchedOp.merge_unit_state` map its state 1:1 to the per-edge
modules' state. A contiguous range of the edges can run alone (sampled sub-graphs): it reads narrowed views of
the parameters and running statistics, so BatchNorm updates the right edges' statistics in place.

Ops made of other modules (anything :func:`batchable` does not know, e.g. an op a new search space adds) are kept
as per-edge modules and run edge by edge: slower, never wrong.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops import DilConv, FactorizedReduce, Identity, ReLUConvBN, SepConv

#: containers whose forward is ``self.op(x)``
_CONTAINERS = (ReLUConvBN, DilConv, SepConv)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def batchable(m: nn.Module) -> bool:
    """Whether ``m`` is built only from layers that batch over edges by channel concatenation."""
    if type(m) in _CONTAINERS:
        return batchable(m.op)
    if type(m) is nn.Sequential:
        return all(batchable(c) for c in m)
    return type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, Identity, nn.Identity, FactorizedReduce, *_POOLS)


def merge_ops(mods: Sequence[nn.Module]) -> nn.Module:
    """The op on ``len(mods)`` edges: a copy of ``mods[0]`` whose tensors are the per-edge ones concatenated."""
    merged = copy.deepcopy(mods[0])
    parts = [dict(m.named_modules()) for m in mods]
    n = len(mods)
    for name, sub in merged.named_modules():
        same = [p[name] for p in parts]
        for pname, _ in list(sub.named_parameters(recurse=False)):
            setattr(sub, pname, nn.Parameter(torch.cat([getattr(q, pname).detach() for q in same])))
        for bname, buf in list(sub.named_buffers(recurse=False)):
            if buf.dim() > 0:
                sub._buffers[bname] = torch.cat([q._buffers[bname] for q in same])
        if isinstance(sub, nn.Conv2d):
            sub.in_channels, sub.out_channels, sub.groups = n * sub.in_channels, n * sub.out_channels, n * sub.groups
        elif isinstance(sub, nn.BatchNorm2d):
            sub.num_features *= n
    return merged


def _first_leaf(m: nn.Module) -> nn.Module:
    if type(m) in _CONTAINERS:
        return _first_leaf(m.op)
    if type(m) is nn.Sequential and len(m):
        return _first_leaf(m[0])
    if type(m) is FactorizedReduce:
        return m.relu
    return m


def _narrow(t: torch.Tensor | None, a: int, n: int, total: int) -> torch.Tensor | None:
    if t is None or n == total:
        return t
    size = t.shape[0] // total
    return t.narrow(0, a * size, n * size)


def _batch_norm(m: nn.BatchNorm2d, x: torch.Tensor, a: int, n: int, total: int) -> torch.Tensor:
    """``nn.BatchNorm2d.forward`` on the running statistics of edges a .. a+n-1 (updated in place)."""
    factor = 0.0 if m.momentum is None else m.momentum
    if m.training and m.track_running_stats and m.num_batches_tracked is not None:
        m.num_batches_tracked.add_(1)
        factor = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
    bn_training = m.training or (m.running_mean is None and m.running_var is None)
    track = not m.training or m.track_running_stats
    return F.batch_norm(x, _narrow(m.running_mean, a, n, total) if track else None,
                        _narrow(m.running_var, a, n, total) if track else None,
                        _narrow(m.weight, a, n, total), _narrow(m.bias, a, n, total), bn_training, factor, m.eps)


def _conv(m: nn.Conv2d, x: torch.Tensor, a: int, n: int, total: int) -> torch.Tensor:
    return F.conv2d(x, _narrow(m.weight, a, n, total), _narrow(m.bias, a, n, total), m.stride, m.padding,
                    m.dilation, m.groups // total * n)


def run_merged(m: nn.Module, x: torch.Tensor, a: int, n: int, total: int, skip: nn.Module | None) -> torch.Tensor:
    """Run merged op ``m`` (of ``total`` edges) for edges a .. a+n-1 on their stacked input ``x``; ``skip`` is a
    leading ReLU already applied by the caller (one ReLU shared by all ops that start with it)."""
    if m is skip or isinstance(m, (Identity, nn.Identity)):
        return x
    kind = type(m)
    if kind in _CONTAINERS:
        return run_merged(m.op, x, a, n, total, skip)
    if kind is nn.Sequential:
        for child in m:
            x = run_merged(child, x, a, n, total, skip)
        return x
    if kind is nn.ReLU:
        return F.relu(x)
    if kind in _POOLS:
        return m(x)
    if kind is nn.Conv2d:
        return _conv(m, x, a, n, total)
    if kind is nn.BatchNorm2d:
        return _batch_norm(m, x, a, n, total)
    if kind is FactorizedReduce:
        if m.relu is not skip:
            x = m.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        y1, y2 = _conv(m.conv_1, x, a, n, total), _conv(m.conv_2, shifted, a, n, total)
        # per edge [conv_1 half, conv_2 half], as FactorizedReduce concatenates them
        y = torch.stack([y1.unflatten(1, (n, -1)), y2.unflatten(1, (n, -1))], 2).flatten(1, 3)
        return _batch_norm(m.bn, y, a, n, total)
    if not (m._parameters or m._buffers or m._modules):
        return m(x)  # a parameter-free layer put in after construction (e.g. a smooth activation): per channel
    raise TypeError(f"cannot batch {kind.__name__}")


class BatchedOp(nn.Module):
    """Candidate op ``name`` of the edges (units) ``units`` that read one state, each on ``channels`` channels.

    ``op_index[i]`` is the op's position in unit ``units[i]``'s op list (its key in the per-edge layout).
    """

    def __init__(self, name: str, per_unit: Sequence[nn.Module], units: Sequence[int], op_index: Sequence[int],
                 channels: int):
        super().__init__()
        self.name, self.units, self.op_index, self.channels = name, list(units), list(op_index), channels
        self.identity = all(isinstance(m, (Identity, nn.Identity)) for m in per_unit)
        if all(batchable(m) for m in per_unit):
            self.body: nn.Module | None = merge_ops(per_unit)
            self.per_unit: nn.ModuleList | None = None
        else:  # generic fallback: the per-edge modules themselves, one call per edge
            self.body, self.per_unit = None, nn.ModuleList(per_unit)

    @property
    def starts_with_relu(self) -> bool:
        """Whether the op's first layer is a ReLU (which the caller then applies once for all such ops)."""
        return self.body is not None and type(_first_leaf(self.body)) is nn.ReLU

    def forward(self, x: torch.Tensor, a: int, n: int) -> torch.Tensor:
        """Edges a .. a+n-1 on their stacked inputs (already ReLU'd when :attr:`starts_with_relu`)."""
        if self.body is not None:
            leaf = _first_leaf(self.body)
            skip = leaf if type(leaf) is nn.ReLU else None
            return run_merged(self.body, x, a, n, len(self.units), skip)
        assert self.per_unit is not None
        chunks = x.split(self.channels, 1)
        return torch.cat([self.per_unit[a + i](chunks[i]) for i in range(n)], 1)

    # -- the per-edge layout of the state ----------------------------------------------------------------------
    def unit_state(self, local: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Split this op's state (keys relative to it) into one state per unit, keys relative to the per-edge op."""
        out: list[dict[str, torch.Tensor]] = [{} for _ in self.units]
        for key, value in local.items():
            where, suffix = key.split(".", 1)
            if where == "per_unit":
                i, suffix = suffix.split(".", 1)
                out[int(i)][suffix] = value
            else:
                chunks = value.chunk(len(self.units)) if value.dim() else [value] * len(self.units)
                for i, chunk in enumerate(chunks):
                    out[i][suffix] = chunk
        return out

    def merge_unit_state(self, per_unit: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`unit_state`."""
        if self.per_unit is not None:
            return {f"per_unit.{i}.{k}": v for i, s in enumerate(per_unit) for k, v in s.items()}
        out = {}
        for suffix in per_unit[0]:
            values = [s[suffix] for s in per_unit]
            out[f"body.{suffix}"] = torch.cat(values) if values[0].dim() else values[0]
        return out
