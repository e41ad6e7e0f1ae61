"""RobustDARTS's indicator: the dominant arch-Hessian eigenvalue, and DARTS-ES's stopping rule."""

from __future__ import annotations

import types

import pytest
import torch
from methods_testlib import tiny_config
from torch.func import functional_call

from pcdarts_core import hessian
from pcdarts_core.genotypes import parse_genotype
from pcdarts_core.hessian import darts_es_should_stop, dominant_eigenvalue
from pcdarts_core.methods import METHOD_NAMES
from pcdarts_core.search import Searcher
from pcdarts_core.supernet import SearchNetwork

torch.set_num_threads(1)


def tiny_problem() -> tuple[types.SimpleNamespace, tuple[torch.Tensor, torch.Tensor]]:
    """2 nodes, 4 ops: 50 arch parameters, few enough to form the Hessian explicitly (in float64)."""
    torch.manual_seed(0)
    net = SearchNetwork(4, 10, 3, k=1, steps=2, multiplier=2,
                        primitives=("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")).double()
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (8,))
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_(0.0, 1.0)  # away from the uniform start, where the curvature is flat and degenerate
        for _ in range(20):  # BatchNorm running statistics of this data, as after some training
            net(x)
    searcher = types.SimpleNamespace(net=net, criterion=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"))
    return searcher, (x, y)


def explicit_hessian(net: SearchNetwork, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    named = net.named_arch_parameters()
    names = list(named)
    sizes = [named[n].numel() for n in names]
    flat0 = torch.cat([named[n].detach().flatten() for n in names])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        params = {n: p.view(named[n].shape) for n, p in zip(names, parts)}
        return torch.nn.functional.cross_entropy(functional_call(net, params, (batch[0],)), batch[1])

    net.eval()
    h = torch.autograd.functional.hessian(loss, flat0)
    net.train()
    return h


def test_power_iteration_finds_the_largest_magnitude_eigenvalue_of_the_explicit_hessian():
    searcher, batch = tiny_problem()
    h = explicit_hessian(searcher.net, batch)
    assert torch.allclose(h, h.T, atol=1e-10)
    eig = torch.linalg.eigvalsh(h)
    expected = float(eig[eig.abs().argmax()])
    # the problem is well posed: the dominant eigenvalue stands clear of the next one
    assert abs(expected) > 1.2 * sorted(eig.abs().tolist())[-2]
    value = dominant_eigenvalue(searcher, batch)  # defaults: 20 Hessian-vector products at most
    assert value == pytest.approx(expected, rel=5e-3)
    # and it leaves the network as it found it
    assert searcher.net.training


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_indicator_runs_for_every_method(method):
    overrides = {"layers": 5} if method == "entrannas" else {}
    if method == "pdarts":
        overrides = {"epochs": 3, "warmup_epochs": 0, "options": {"stage_layers": (3, 3, 3), "stage_epochs": (1, 1, 1)}}
    searcher = Searcher(tiny_config(method, **overrides))
    batch = searcher.to_device(next(iter(searcher.val_loader)))
    rng = torch.get_rng_state()
    value = dominant_eigenvalue(searcher, batch, iters=3)
    assert torch.isfinite(torch.tensor(value))
    assert torch.equal(rng, torch.get_rng_state())  # observing the search does not change it


def test_darts_es_rule_on_hand_made_sequences():
    flat = [1.0] * 12
    assert not any(darts_es_should_stop(flat[:n]) for n in range(1, 13))
    # 5-average grows from 1.0 (evaluations 0-4) to 1.8 (4-8) after four more evaluations: 1.8 > 1.3 * 1.0
    rising = [1.0] * 5 + [2.0] * 4
    assert [darts_es_should_stop(rising[:n]) for n in range(1, 10)] == [False] * 8 + [True]
    # growth of exactly 1.3x is not more than 1.3x
    edge = [1.0] * 5 + [1.375] * 4  # window 4..8 = (1 + 4 * 1.375) / 5 = 1.3
    assert not darts_es_should_stop(edge)
    assert darts_es_should_stop(edge[:-1] + [1.4])
    # only full windows count: one low first value is not a baseline
    assert not darts_es_should_stop([0.1, 1.0, 1.0, 1.0, 1.0])
    # falling or negative curvature never stops the search
    assert not darts_es_should_stop([2.0] * 5 + [1.0] * 4)
    assert not darts_es_should_stop([-1.0] * 5 + [5.0] * 4)
    with pytest.raises(ValueError):
        darts_es_should_stop([1.0], window=0)


def test_early_stopped_search_returns_the_genotype_of_four_evaluations_earlier(monkeypatch):
    """Feed the rule a rising eigenvalue (the search code asks hessian.dominant_eigenvalue each epoch)."""
    values = iter([1.0] * 5 + [2.0] * 10)
    monkeypatch.setattr(hessian, "dominant_eigenvalue", lambda searcher, batch, **kw: next(values))
    cfg = tiny_config("pcdarts", epochs=12, warmup_epochs=0, steps_per_epoch=1, hessian_every=1, early_stop=True,
                      synthetic_samples=16)
    searcher = Searcher(cfg)
    history = []
    while not searcher.done:
        history.append(searcher.run_epoch())
    assert searcher.stopped_early and len(history) == 9 and history[-1].get("early_stopped")
    assert [m["hessian_eigenvalue"] for m in history] == [1.0] * 5 + [2.0] * 4
    final = searcher.final_genotype()
    assert final == parse_genotype(history[4]["genotype"])  # 4 evaluations before the stop
    assert history[4]["genotype"] != history[-1]["genotype"]  # the arch moved on meanwhile: the choice matters
