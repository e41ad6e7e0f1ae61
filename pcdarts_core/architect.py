"""The bilevel updates: arch parameters on a validation batch, weights on a training batch.

First order (PC-DARTS's default, DARTS Sec. 2.3 with xi = 0): grad_a L_val(w, a).
Second order (DARTS Eq. 7-8): grad_a L_val(w', a) - xi * [grad_a L_train(w+, a) - grad_a L_train(w-, a)] / (2R),
with w' = w - xi * (SGD step direction incl. momentum and weight decay), w± = w ± R * grad_w' L_val(w', a) and
R = 0.01 / ||grad_w' L_val(w', a)||.

During each step the other level's parameters are frozen (``requires_grad=False``) and autograd is asked for the
step's own level only (``torch.autograd.grad``), so neither forward nor backward spends time on gradients that
would be thrown away; the step hands them to the optimizer as a list (``optimizers.update``:
torch's multi-tensor SGD/Adam on the optimizer's state). Nothing in a step reads a value back to the host: the
losses come back as device tensors, so a GPU never waits for the host inside a step, and the static methods' step
can be captured as one graph (``compilation.compile_step``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .optimizers import clip_, current_lr, update

if TYPE_CHECKING:
    from .config import SearchConfig
    from .supernet import SearchNetwork

Batch = tuple[torch.Tensor, torch.Tensor]


class StepContext(Protocol):
    """What one bilevel step needs from the search that runs it, and nothing more: the network, both optimizers,
    the loss (with the device's autocast) and the data-parallel gradient average. ``search.Searcher`` provides
    it; a step never sees the loop, the data or the checkpoints."""

    net: "SearchNetwork"
    config: "SearchConfig"
    criterion: nn.Module
    device: torch.device
    weight_optimizer: torch.optim.Optimizer
    arch_optimizer: torch.optim.Optimizer

    def to_device(self, batch: Batch) -> Batch: ...

    def loss(self, batch: Batch, return_logits: bool = False) -> Any: ...

    def sync_grads(self, grads: Sequence[torch.Tensor]) -> None: ...


@contextmanager
def frozen(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Temporarily stop gradients to ``params`` (they still take part in the forward pass). Inside a captured step
    nothing is toggled: a graph cannot change ``requires_grad`` of its inputs, and it needs not to, since the
    step asks autograd for its own level's gradients only and the compiler drops what nothing uses."""
    if torch.compiler.is_compiling():
        yield
        return
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def gradients(ctx: StepContext, loss: torch.Tensor, params: Sequence[nn.Parameter]
              ) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """(the ``params`` that ``loss`` depends on, d loss / d each), averaged over data-parallel ranks; autograd
    prunes everything that does not lead to them. A parameter the forward did not use (a transit cell's unused
    ops) is left out, so its update is skipped as an optimizer skips a parameter without ``.grad``. The gradients
    are returned, not accumulated in ``.grad``: the update takes them as a list, eagerly and inside a captured
    step alike."""
    params = list(params)
    found = torch.autograd.grad(loss, params, allow_unused=True)
    used = [i for i, g in enumerate(found) if g is not None]
    grads = [found[i] for i in used]
    ctx.sync_grads(grads)
    return [params[i] for i in used], grads


def first_order_step(ctx: StepContext, val: Batch, grad_clip: float | None = None) -> torch.Tensor:
    """Adam step on grad_a L_val(w, a); with ``grad_clip`` the arch gradients are clipped to that norm first.
    Returns the loss as a detached device tensor (reading it is the caller's choice, and a host sync)."""
    with frozen(ctx.net.weight_parameters()):
        loss = ctx.loss(val)
        params, grads = gradients(ctx, loss, ctx.net.arch_parameters())
    if grad_clip is not None:
        clip_(grads, grad_clip)
    update(ctx.arch_optimizer, params, grads)
    return loss.detach()


def weight_step(ctx: StepContext, train: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """SGD step on grad_w L_train(w, a) with gradient clipping (norm 5 in both papers); (loss, logits), detached
    device tensors."""
    with frozen(ctx.net.arch_parameters()):
        loss, logits = ctx.loss(train, return_logits=True)
        params, grads = gradients(ctx, loss, ctx.net.weight_parameters())
    clip_(grads, ctx.config.grad_clip)
    update(ctx.weight_optimizer, params, grads)
    return loss.detach(), logits.detach()


def _sgd_direction(opt: torch.optim.SGD, params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The step SGD would take (before the lr): grad + wd * w + momentum * buffer, as DARTS's virtual step
    (multi-tensor ops)."""
    group = opt.param_groups[0]
    momentum, wd = group["momentum"], group["weight_decay"]
    direction = torch._foreach_add(list(grads), [p.detach() for p in params], alpha=wd)
    buffers = [opt.state.get(p, {}).get("momentum_buffer") for p in params]
    if momentum and all(b is not None for b in buffers):
        torch._foreach_add_(direction, buffers, alpha=momentum)
    return direction


def unrolled_arch_gradients(net: nn.Module, criterion: nn.Module, train: Batch, val: Batch, xi: float,
                            opt: torch.optim.SGD) -> tuple[list[torch.Tensor], torch.Tensor]:
    """DARTS's second-order arch gradient (Eq. 7) with the finite-difference Hessian-vector product (Eq. 8).

    Uses ``torch.func.functional_call`` on copies of the buffers, so the real model's weights and BatchNorm
    statistics are untouched by the virtual step. Multi-tensor arithmetic throughout; R stays on the device.
    Returns (arch gradients, the validation loss at w' as a detached device tensor).
    """
    arch = dict(net.named_arch_parameters())  # type: ignore[operator]
    weights = {n: p for n, p in net.named_parameters() if n not in arch}
    names, w = list(weights), list(weights.values())
    w_detached = [p.detach() for p in w]

    def loss_at(wv: Sequence[torch.Tensor], batch: Batch) -> torch.Tensor:
        params = {**dict(zip(names, wv)), **arch}
        buffers = {n: b.clone() for n, b in net.named_buffers()}
        return criterion(functional_call(net, {**params, **buffers}, (batch[0],)), batch[1])

    # w' = w - xi * direction(grad_w L_train(w, a))
    grads = torch.autograd.grad(loss_at(w, train), w)
    direction = _sgd_direction(opt, w, grads)
    w_prime = [t.requires_grad_(True) for t in torch._foreach_add(w_detached, direction, alpha=-xi)]
    arch_list = list(arch.values())
    val_loss = loss_at(w_prime, val)
    g = torch.autograd.grad(val_loss, arch_list + w_prime)
    d_arch, d_w = list(g[: len(arch_list)]), list(g[len(arch_list):])
    r = 0.01 / torch.nn.utils.get_total_norm(d_w, foreach=True).clamp_min(1e-12)

    def arch_grad_at(sign: float) -> tuple[torch.Tensor, ...]:
        shifted = torch._foreach_add(w_detached, torch._foreach_mul(d_w, sign * r))
        return torch.autograd.grad(loss_at(shifted, train), arch_list)

    g_plus, g_minus = arch_grad_at(1.0), arch_grad_at(-1.0)
    hessian_term = torch._foreach_div(torch._foreach_sub(g_plus, g_minus), 2 * r)
    torch._foreach_mul_(hessian_term, xi)
    return torch._foreach_sub(d_arch, hessian_term), val_loss.detach()


def second_order_step(ctx: StepContext, train: Batch, val: Batch) -> torch.Tensor:
    """Adam step on the unrolled gradient; xi is the current weight lr, as in DARTS."""
    train, val = ctx.to_device(train), ctx.to_device(val)
    grads, val_loss = unrolled_arch_gradients(ctx.net, ctx.criterion, train, val,
                                              current_lr(ctx.weight_optimizer), ctx.weight_optimizer)
    ctx.sync_grads(grads)
    update(ctx.arch_optimizer, ctx.net.arch_parameters(), grads)
    return val_loss
