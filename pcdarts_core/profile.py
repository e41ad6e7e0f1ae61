"""Model size as the papers report it: parameters without the auxiliary head, multiply-adds at test time.

DARTS (Table 1/2) and PC-DARTS (Table 1/3) count parameters of the network that is deployed, so the auxiliary
classifier (a training-only regularizer) is left out; "mult-adds" count the conv and fully connected layers of
one forward pass of a single image in inference mode (no auxiliary head, no drop path).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .model import AuxiliaryHead


def _auxiliary_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryHead) or "auxiliary" in name.split(".")[-1]:
            ids.update(id(p) for p in module.parameters())
    return ids


def count_parameters(model: nn.Module, exclude_auxiliary: bool = True) -> int:
    """Number of parameter elements; the auxiliary head's are left out unless ``exclude_auxiliary`` is False."""
    skip = _auxiliary_param_ids(model) if exclude_auxiliary else set()
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _input_shape(input_size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(input_size, int):
        dims: tuple[int, ...] = (3, input_size, input_size)
    else:
        dims = tuple(int(d) for d in input_size)
        if len(dims) == 2:
            dims = (3, *dims)
    if len(dims) != 3 or any(d < 1 for d in dims):
        raise ValueError(f"input_size must be S, (H, W) or (C, H, W) with positive sizes, got {input_size!r}")
    return dims  # type: ignore[return-value]


def count_madds(model: nn.Module, input_size: int | Sequence[int]) -> int:
    """Multiply-adds of one image's forward pass in eval mode, counted by forward hooks.

    conv: k_h * k_w * (C_in / groups) * C_out * H_out * W_out; linear: in_features * out_features (per sample).
    In eval mode the auxiliary head does not run, so it is excluded as the papers do. The model's training
    mode is restored afterwards.
    """
    shape = _input_shape(input_size)
    total = 0

    def conv_hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        k_h, k_w = module.kernel_size
        h_out, w_out = output.shape[-2:]
        total += k_h * k_w * (module.in_channels // module.groups) * module.out_channels * h_out * w_out

    def linear_hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Linear)
        total += module.in_features * output[0].numel()  # per sample; equals in * out for (N, out) outputs

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)
