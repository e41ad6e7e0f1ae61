"""The bilevel updates: arch parameters on a validation batch, weights on a training batch.

First order (PC-DARTS's default, DARTS Sec. 2.3 with xi = 0): grad_a L_val(w, a).
Second order (DARTS Eq. 7-8): grad_a L_val(w', a) - xi * [grad_a L_train(w+, a) - grad_a L_train(w-, a)] / (2R),
with w' = w - xi * (SGD step direction incl. momentum and weight decay), w± = w ± R * grad_w' L_val(w', a) and
R = 0.01 / ||grad_w' L_val(w', a)||.

During each step the other level's parameters are frozen (``requires_grad=False``) so backward does not spend time
on gradients that would be thrown away.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

import torch
from torch import nn
from torch.func import functional_call

if TYPE_CHECKING:
    from .config import SearchConfig
    from .supernet import SearchNetwork

Batch = tuple[torch.Tensor, torch.Tensor]


class StepContext(Protocol):
    """What one bilevel step needs from the search that runs it, and nothing more: the network, both optimizers,
    the loss (with the device's autocast), backward, the data-parallel gradient sync and the optimizer step (with
    any loss scaling). ``search.Searcher`` provides it; a step never sees the loop, the data or the checkpoints."""

    net: "SearchNetwork"
    config: "SearchConfig"
    criterion: nn.Module
    device: torch.device
    weight_optimizer: torch.optim.Optimizer
    arch_optimizer: torch.optim.Optimizer

    def to_device(self, batch: Batch) -> Batch: ...

    def loss(self, batch: Batch, return_logits: bool = False) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def sync_grads(self, params: Sequence[nn.Parameter]) -> None: ...

    def unscale(self, optimizer: torch.optim.Optimizer) -> None: ...

    def step_optimizer(self, optimizer: torch.optim.Optimizer) -> None: ...


@contextmanager
def frozen(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Temporarily stop gradients to ``params`` (they still take part in the forward pass)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def first_order_step(ctx: StepContext, val: Batch, grad_clip: float | None = None) -> float:
    """Adam step on grad_a L_val(w, a); with ``grad_clip`` the arch gradients are clipped to that norm first."""
    net, opt = ctx.net, ctx.arch_optimizer
    opt.zero_grad(set_to_none=True)
    with frozen(net.weight_parameters()):
        loss = ctx.loss(val)
        ctx.backward(loss)
    ctx.sync_grads(net.arch_parameters())
    if grad_clip is not None:
        ctx.unscale(opt)
        nn.utils.clip_grad_norm_(net.arch_parameters(), grad_clip)
    ctx.step_optimizer(opt)
    return float(loss.detach())


def weight_step(ctx: StepContext, train: Batch) -> tuple[float, torch.Tensor]:
    """SGD step on grad_w L_train(w, a) with gradient clipping (norm 5 in both papers)."""
    net, opt = ctx.net, ctx.weight_optimizer
    opt.zero_grad(set_to_none=True)
    with frozen(net.arch_parameters()):
        loss, logits = ctx.loss(train, return_logits=True)
        ctx.backward(loss)
    params = net.weight_parameters()
    ctx.sync_grads(params)
    ctx.unscale(opt)
    nn.utils.clip_grad_norm_(params, ctx.config.grad_clip)
    ctx.step_optimizer(opt)
    return float(loss.detach()), logits.detach()


def _sgd_direction(opt: torch.optim.SGD, params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The step SGD would take (before the lr): momentum * buffer + grad + wd * w, as DARTS's virtual step."""
    group = opt.param_groups[0]
    momentum, wd = group["momentum"], group["weight_decay"]
    out = []
    for p, g in zip(params, grads):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        d = g + wd * p.detach()
        if buf is not None and momentum:
            d = d + momentum * buf
        out.append(d)
    return out


def unrolled_arch_gradients(net: nn.Module, criterion: nn.Module, train: Batch, val: Batch, xi: float,
                            opt: torch.optim.SGD) -> tuple[list[torch.Tensor], float]:
    """DARTS's second-order arch gradient (Eq. 7) with the finite-difference Hessian-vector product (Eq. 8).

    Uses ``torch.func.functional_call`` on copies of the buffers, so the real model's weights and BatchNorm
    statistics are untouched by the virtual step.
    """
    arch = dict(net.named_arch_parameters())  # type: ignore[operator]
    weights = {n: p for n, p in net.named_parameters() if n not in arch}
    names, w = list(weights), list(weights.values())

    def loss_at(wv: Sequence[torch.Tensor], batch: Batch) -> torch.Tensor:
        params = {**dict(zip(names, wv)), **arch}
        buffers = {n: b.clone() for n, b in net.named_buffers()}
        return criterion(functional_call(net, {**params, **buffers}, (batch[0],)), batch[1])

    # w' = w - xi * direction(grad_w L_train(w, a))
    grads = torch.autograd.grad(loss_at(w, train), w)
    direction = _sgd_direction(opt, w, grads)
    w_prime = [(p.detach() - xi * d).requires_grad_(True) for p, d in zip(w, direction)]
    arch_list = list(arch.values())
    val_loss = loss_at(w_prime, val)
    g = torch.autograd.grad(val_loss, arch_list + w_prime)
    d_arch, d_w = g[: len(arch_list)], g[len(arch_list):]
    r = 0.01 / torch.sqrt(sum((t * t).sum() for t in d_w)).clamp_min(1e-12)

    def arch_grad_at(sign: float) -> tuple[torch.Tensor, ...]:
        shifted = [p.detach() + sign * r * t for p, t in zip(w, d_w)]
        return torch.autograd.grad(loss_at(shifted, train), arch_list)

    g_plus, g_minus = arch_grad_at(1.0), arch_grad_at(-1.0)
    grads = [da - xi * (gp - gm) / (2 * r) for da, gp, gm in zip(d_arch, g_plus, g_minus)]
    return grads, float(val_loss.detach())


def second_order_step(ctx: StepContext, train: Batch, val: Batch) -> float:
    """Adam step on the unrolled gradient; xi is the current weight lr, as in DARTS."""
    net, opt = ctx.net, ctx.arch_optimizer
    xi = ctx.weight_optimizer.param_groups[0]["lr"]
    train, val = ctx.to_device(train), ctx.to_device(val)
    grads, val_loss = unrolled_arch_gradients(net, ctx.criterion, train, val, xi, ctx.weight_optimizer)
    opt.zero_grad(set_to_none=True)
    for p, g in zip(net.arch_parameters(), grads):
        p.grad = g.detach()
    ctx.sync_grads(net.arch_parameters())
    ctx.step_optimizer(opt)
    return val_loss
