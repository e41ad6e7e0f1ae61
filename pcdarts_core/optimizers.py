"""The search's two optimizers, stepped by torch's multi-tensor (``foreach``) kernels without a host sync.

The weight SGD (momentum, weight decay) and the arch Adam are ordinary ``torch.optim`` objects: they hold the
hyperparameters and the state, and their ``state_dict`` is what checkpoints save. A step does not go through
``Optimizer.step`` but through torch's own functional form of the same algorithm (``torch.optim.sgd.sgd``,
``torch.optim.adam.adam``) on the optimizer's state, with the gradients handed over as a list:

- one implementation serves eager steps and the captured step (``compilation.compile_step``): ``Optimizer.step``
  forces two graph breaks (its ``_use_grad`` wrapper) and reads ``p.grad``, which a compiled step does not set;
- the state is created up front (:func:`init_state`, zeros: the first step is then exactly torch's lazy first
  step), so no step allocates, and a captured graph sees the same tensors every time;
- ``foreach`` on every device: a handful of multi-tensor kernels per update instead of several per parameter.
  ``capturable`` (captured steps): Adam's step count lives on the device (float64), so its bias correction
  needs no host value; the weight lr is then a 0-dim device tensor that :func:`set_lr` fills in place, so a new epoch's lr
  neither syncs nor recompiles. Eager steps keep a Python-float lr (a tensor lr would be read back per kernel).

Gradient clipping is :func:`clip_` (torch's ``get_total_norm`` with the foreach norm, and
``clip_grad_norm_``'s own coefficient ``max_norm / (norm + 1e-6)`` clamped at 1, multiplied in without a sync).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from .config import SearchConfig


def make_optimizers(weights: Sequence[nn.Parameter], arch: Sequence[nn.Parameter], cfg: SearchConfig,
                    captured: bool = False) -> tuple[torch.optim.SGD, torch.optim.Adam]:
    """(weight SGD, arch Adam) with the config's hyperparameters, multi-tensor, state created; ``captured``: the
    capturable form (device step counts, the weight lr as a device tensor)."""
    device = weights[0].device if weights else torch.device("cpu")
    dtype = weights[0].dtype if weights else torch.float32
    lr = torch.tensor(float(cfg.lr), dtype=dtype, device=device) if captured else cfg.lr
    weight = torch.optim.SGD(weights, lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    arch_opt = torch.optim.Adam(arch, cfg.arch_lr, betas=cfg.arch_betas, weight_decay=cfg.arch_weight_decay,
                                foreach=True, capturable=captured)
    init_state(weight)
    init_state(arch_opt)
    return weight, arch_opt


def load_state(opt: torch.optim.Optimizer, state: dict, captured: bool) -> None:
    """``opt.load_state_dict(state)``, kept in this run's form: a checkpoint of an eager run resumes captured and
    the other way round (the saved groups carry the saving run's lr type and ``capturable``)."""
    opt.load_state_dict(state)
    for group in opt.param_groups:
        if isinstance(opt, torch.optim.SGD):
            lr, p = float(group["lr"]), group["params"][0]
            group["lr"] = torch.tensor(lr, dtype=p.dtype, device=p.device) if captured else lr
        else:
            group["capturable"] = captured
    init_state(opt)


def init_state(opt: torch.optim.Optimizer) -> None:
    """Create the state torch would create lazily at the first step (zeros), keeping any that was loaded; Adam's
    step counts are put where the group's ``capturable`` wants them (device or CPU)."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if isinstance(opt, torch.optim.SGD):
                if group["momentum"] and state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                continue
            # capturable: the count on the device in float64, so that the bias corrections (1 - 0.999^t cancels
            # badly in float32: 1e-5 relative at t = 1) are as exact as the eager step's, computed in Python floats
            where, dtype = (p.device, torch.float64) if group["capturable"] else (torch.device("cpu"), torch.float32)
            if not state:
                state.update(step=torch.zeros((), dtype=dtype, device=where),
                             exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                             exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            elif (state["step"].device, state["step"].dtype) != (where, dtype):
                state["step"] = state["step"].to(where, dtype)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr: in place where it is a device tensor (captured steps), else as a float."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def current_lr(opt: torch.optim.Optimizer) -> float:
    """The first group's lr as a number (reads a device tensor back: for epoch boundaries, not steps)."""
    lr = opt.param_groups[0]["lr"]
    return float(lr) if isinstance(lr, torch.Tensor) else lr


@torch.no_grad()
def update(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """One step of ``opt`` (SGD or Adam, one parameter group) on ``params`` with ``grads``: torch's functional
    algorithm on the optimizer's own state, ``foreach``."""
    params, grads = list(params), list(grads)
    group = opt.param_groups[0]
    states = [opt.state[p] for p in params]
    if not all(states):  # an optimizer made elsewhere: its state as torch's first step would make it
        init_state(opt)
    if isinstance(opt, torch.optim.SGD):
        buffers = [s.get("momentum_buffer") for s in states]
        sgd(params, grads, buffers, foreach=True, weight_decay=group["weight_decay"], momentum=group["momentum"],
            lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"])
        if group["momentum"]:
            for s, b in zip(states, buffers):
                s["momentum_buffer"] = b
    elif isinstance(opt, torch.optim.Adam):
        beta1, beta2 = group["betas"]
        adam(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
             [s["step"] for s in states], foreach=True, capturable=group["capturable"], amsgrad=False, beta1=beta1,
             beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
             maximize=group["maximize"])
    else:
        raise TypeError(f"update() steps SGD and Adam, not {type(opt).__name__}")


@torch.no_grad()
def clip_(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale ``grads`` in place to total 2-norm at most ``max_norm`` (``clip_grad_norm_``'s rule, foreach norm,
    no host read); returns the norm before clipping."""
    grads = list(grads)
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def host_resident(*optimizers: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The state tensors these optimizers keep on the CPU by design (non-capturable Adam's step counts: read as
    Python numbers at each update, which is no device sync)."""
    return [s["step"] for opt in optimizers for s in opt.state.values()
            if "step" in s and s["step"].device.type == "cpu" and not opt.param_groups[0].get("capturable")]
