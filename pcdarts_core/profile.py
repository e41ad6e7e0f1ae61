"""Model size as the papers report it (parameters without the auxiliary head, multiply-adds at test time), and
what a step costs a device in counts that do not depend on the machine (:class:`DispatchCounts`).

DARTS (Table 1/2) and PC-DARTS (Table 1/3) count parameters of the network that is deployed, so the auxiliary
classifier (a training-only regularizer) is left out; "mult-adds" count the conv and fully connected layers of
one forward pass of a single image in inference mode (no auxiliary head, no drop path).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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


class DispatchCounts(TorchDispatchMode):
    """``with DispatchCounts() as c:`` counts what the code inside costs a device, whatever device it runs on:

    - ``aten``: ATen operator calls (on a GPU each is at least one kernel launch);
    - ``host_reads``: reads of a tensor's value by the host, each a sync that makes the host wait for the device:
      ``aten::_local_scalar_dense`` (``.item()``, ``float()``, ``int()``, ``bool()`` of a tensor), copies from
      a device to the CPU, and ``Tensor.tolist()`` / ``Tensor.numpy()`` (which on the CPU dispatch nothing, so
      they are counted at the Python call). ``read_sites`` names the first few places that read.

    ``host_resident``: tensors that live on the CPU whatever the device (torch's non-capturable Adam keeps its step
    counts there, by design, so that reading them is no sync): their reads are not counted. On a CPU run every
    tensor is a CPU tensor, so the counter cannot tell them apart by their device.
    """

    def __init__(self, host_resident: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self._exempt = {id(t) for t in host_resident}
        self.aten = 0
        self.host_reads = 0
        self.read_sites: list[str] = []
        self._patched: dict[str, Any] = {}

    def _read(self) -> None:
        self.host_reads += 1
        if len(self.read_sites) < 8:
            frame = next((f for f in reversed(traceback.extract_stack()[:-2])
                          if "pcdarts_core" in f.filename and not f.filename.endswith("profile.py")), None)
            self.read_sites.append(f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?")

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.aten += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            if id(args[0]) not in self._exempt:
                self._read()
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else (kwargs or {}).get("device")
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None and \
                    torch.device(dst).type == "cpu":
                self._read()
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> "DispatchCounts":
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def counted(tensor: torch.Tensor, *a: Any, _original: Any = original, **k: Any) -> Any:
                if id(tensor) not in self._exempt:
                    self._read()
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)
