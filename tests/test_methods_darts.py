"""DARTS: the K=1, beta-free supernet and the second-order (unrolled) arch gradient."""

from __future__ import annotations

import pytest
import torch
from methods_testlib import check_genotype, search_and_probe, tiny_config
from torch import nn
from torch.func import functional_call

from pcdarts_core.architect import unrolled_arch_gradients
from pcdarts_core.search import Searcher
from pcdarts_core.supernet import SearchNetwork

torch.set_num_threads(1)


def test_darts_supernet_uses_all_channels_and_no_betas():
    cfg = tiny_config("darts")
    assert (cfg.k, cfg.edge_norm, cfg.warmup_epochs > 0) == (1, False, True)  # synthetic keeps a short warm-up
    net = Searcher(cfg).net
    assert net.betas_normal is None and net.betas_reduce is None
    assert net.arch_parameters() == [net.alphas_normal, net.alphas_reduce]
    assert all(cell.k == 1 for cell in net.cells)
    reference = Searcher(tiny_config("darts", execution="reference")).net
    assert reference.mixed_ops() and all(m.k == 1 and m.bypass_pool is None for m in reference.mixed_ops())
    assert net.cell_weights()["normal"].edges is None
    assert tiny_config("darts", warmup_epochs=0).warmup_epochs == 0
    with pytest.raises(ValueError, match="k=1"):
        tiny_config("darts", k=2)


def test_second_order_gradient_matches_the_unrolled_objective():
    """grad_a of f(a) = L_val(w - xi (grad_w L_train(w, a) + wd w), a), by central differences and by autograd.

    A fresh optimizer (no momentum buffer yet) makes the virtual step exactly that. DARTS's Hessian-vector
    product is a central difference of arch gradients at w +- R d (||R d|| = 0.01). On a network this small that
    step crosses ReLU and max-pool kinks, where the gradient jumps, and the difference quotient is off by several
    times its size; so the test swaps ReLU for Softplus and uses no max pool: the function is smooth, and in
    float64 only the O(R^2) error of the approximation is left (measured: 3e-4 relative).
    """
    torch.manual_seed(0)
    net = SearchNetwork(4, 10, 3, k=1, edge_norm=False,
                        primitives=("none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3"))
    _smooth(net)
    net = net.double()
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_(0.0, 0.5)
    train = (torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (8,)))
    val = (torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (8,)))
    xi, wd = 0.05, 3e-4
    opt = torch.optim.SGD(net.weight_parameters(), xi, momentum=0.9, weight_decay=wd)
    criterion = nn.CrossEntropyLoss()
    grads, _ = unrolled_arch_gradients(net, criterion, train, val, xi, opt)

    arch_names = list(net.named_arch_parameters())
    weights = {n: p.detach() for n, p in net.named_parameters() if n not in arch_names}
    buffers = dict(net.named_buffers())

    def f(arch: list[torch.Tensor], create_graph: bool = False) -> torch.Tensor:
        def loss(w: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            state = {**w, **dict(zip(arch_names, arch)), **{n: b.clone() for n, b in buffers.items()}}
            return criterion(functional_call(net, state, (batch[0],)), batch[1])

        w = {n: p.clone().requires_grad_(True) for n, p in weights.items()}
        g = torch.autograd.grad(loss(w, train), list(w.values()), create_graph=create_graph)
        stepped = {n: p - xi * (gi + wd * p) for (n, p), gi in zip(w.items(), g)}
        return loss(stepped, val)

    arch0 = [p.detach().clone() for p in net.arch_parameters()]
    # the exact gradient of the unrolled objective, through the inner gradient (second derivatives)
    leaves = [a.clone().requires_grad_(True) for a in arch0]
    exact = torch.autograd.grad(f(leaves, create_graph=True), leaves)
    flat = torch.cat([g.flatten() for g in grads])
    flat_exact = torch.cat([g.flatten() for g in exact])
    assert float(torch.linalg.norm(flat - flat_exact) / torch.linalg.norm(flat_exact)) < 2e-3

    # and along random directions, by central differences of f itself
    gen = torch.Generator().manual_seed(1)
    h = 1e-4
    for _ in range(2):
        v = [torch.randn(a.shape, generator=gen, dtype=torch.float64) for a in arch0]
        plus = f([a + h * d for a, d in zip(arch0, v)])
        minus = f([a - h * d for a, d in zip(arch0, v)])
        numeric = float((plus - minus).detach() / (2 * h))
        analytic = float(sum((g * d).sum() for g, d in zip(grads, v)))
        assert analytic == pytest.approx(numeric, rel=2e-3, abs=1e-6)
    # unrolling matters here: the first-order gradient grad_a L_val(w, a) is measurably different
    leaves = [a.clone().requires_grad_(True) for a in arch0]
    state = {**weights, **dict(zip(arch_names, leaves)), **{n: b.clone() for n, b in buffers.items()}}
    first = torch.autograd.grad(criterion(functional_call(net, state, (val[0],)), val[1]), leaves)
    assert not torch.allclose(torch.cat([g.flatten() for g in first]), flat, rtol=1e-3)


def _smooth(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Softplus())
        else:
            _smooth(child)


def test_short_darts_search_learns_and_derives_a_genotype():
    searcher, history, before, after = search_and_probe("darts")
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert after < before
    assert not history[0]["arch_active"] and history[-1]["arch_active"]
    check_genotype(history[-1]["genotype"])


class BareStepContext:
    """Exactly ``architect.StepContext``: a network, two optimizers and the loss, with no loop, data or checkpoints."""

    def __init__(self, method: str, order: str):
        self.config = tiny_config(method, order=order)
        self.net = SearchNetwork(4, 10, 3, k=1, edge_norm=False)
        self.criterion = nn.CrossEntropyLoss()
        self.device = torch.device("cpu")
        self.weight_optimizer = torch.optim.SGD(self.net.weight_parameters(), 0.05, momentum=0.9)
        self.arch_optimizer = torch.optim.Adam(self.net.arch_parameters(), 0.01)

    def to_device(self, batch):
        return batch

    def loss(self, batch, return_logits=False):
        logits = self.net(batch[0])
        loss = self.criterion(logits, batch[1])
        return (loss, logits) if return_logits else loss

    def backward(self, loss):
        loss.backward()

    def sync_grads(self, params):
        pass

    def unscale(self, optimizer):
        pass

    def step_optimizer(self, optimizer):
        optimizer.step()


@pytest.mark.parametrize("method,order", [("darts", "first"), ("darts", "second"), ("pdarts", "first")])
def test_steps_need_only_the_step_context_not_a_searcher(method, order):
    from pcdarts_core.methods import get_method

    ctx = BareStepContext(method, order)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    arch = [p.detach().clone() for p in ctx.net.arch_parameters()]
    weights = [p.detach().clone() for p in ctx.net.weight_parameters()]
    m = get_method(method)
    m.arch_step(ctx, batch, batch)
    m.weight_step(ctx, batch)
    assert any(not torch.equal(a, p) for a, p in zip(arch, ctx.net.arch_parameters()))
    assert any(not torch.equal(w, p) for w, p in zip(weights, ctx.net.weight_parameters()))
