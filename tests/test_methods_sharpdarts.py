"""sharpDARTS: Cosine Power Annealing, Max-W weighting, the SharpSepConv op set."""

from __future__ import annotations

import math

import pytest
import torch
from methods_testlib import check_genotype, search_and_probe, tiny_config

from pcdarts_core.config import search_config
from pcdarts_core.methods.base import SearchMethod
from pcdarts_core.methods.sharpdarts import METHOD, MaxWWeighting, cosine_power_factor
from pcdarts_core.ops import SHARP_PRIMITIVES
from pcdarts_core.search import Searcher

torch.set_num_threads(1)


@pytest.mark.parametrize("power", [1.0, 2.0, 10.0, 100.0])
def test_cosine_power_annealing_endpoints_and_shape(power):
    assert cosine_power_factor(0, 50, power) == pytest.approx(1.0)
    assert cosine_power_factor(50, 50, power) == pytest.approx(0.0, abs=1e-12)
    values = [cosine_power_factor(t, 50, power) for t in range(51)]
    assert all(a > b for a, b in zip(values, values[1:]))
    # min-max normalization of p^(c + 1) over the schedule, computed the long way
    raw = [power ** ((1 + math.cos(math.pi * t / 50)) / 2 + 1) for t in range(51)]
    if power != 1.0:
        lo, hi = min(raw), max(raw)
        assert values == pytest.approx([(r - lo) / (hi - lo) for r in raw])


def test_power_one_is_cosine_and_larger_powers_decay_faster():
    cfg = search_config("sharpdarts", "cifar10", options={"power": 1.0})
    base = SearchMethod()
    assert [METHOD.lr_factor(cfg, e) for e in range(cfg.epochs)] == pytest.approx(
        [base.lr_factor(cfg, e) for e in range(cfg.epochs)])
    mid = [cosine_power_factor(25, 50, p) for p in (1.0, 2.0, 10.0)]
    assert mid[0] == pytest.approx(0.5) and mid[0] > mid[1] > mid[2]


def test_sharpdarts_defaults_and_lr_endpoints():
    cfg = search_config("sharpdarts", "cifar10")
    assert (cfg.batch_size, cfg.lr, cfg.lr_min, cfg.lr_warmup_epochs, cfg.arch_lr, cfg.epochs, cfg.k) == (
        48, 0.025, 1e-4, 5, 3e-4, 120, 1)
    assert cfg.options.power == 2.0 and cfg.options.weighting == "max_w"
    lrs = [cfg.lr * METHOD.lr_factor(cfg, e) for e in range(cfg.epochs)]
    assert lrs[:5] == pytest.approx([cfg.lr * (e + 1) / 6 for e in range(5)])  # linear warm-up
    assert lrs[5] == pytest.approx(cfg.lr)  # annealing starts at lr_max ...
    assert cfg.lr * METHOD.lr_factor(cfg, cfg.epochs) == pytest.approx(cfg.lr_min)  # ... and ends at lr_min
    with pytest.raises(ValueError, match="power"):
        search_config("sharpdarts", "cifar10", options={"power": 0.5})


def test_max_w_weighting_formula():
    gen = torch.Generator().manual_seed(0)
    alphas = torch.randn(14, 8, generator=gen)
    w = torch.softmax(alphas, -1)
    expected = 1 - w.max(-1, keepdim=True).values + w
    got = MaxWWeighting().op_weights(alphas)
    assert torch.allclose(got, expected)
    # the strongest op of each edge gets weight exactly 1, the others keep their gap to it
    assert torch.allclose(got.max(-1).values, torch.ones(14))
    assert torch.allclose(got.max(-1, keepdim=True).values - got, w.max(-1, keepdim=True).values - w)
    # and the supernet's cells weight each op of an edge by it
    net = Searcher(tiny_config("sharpdarts")).net
    cw = net.cell_weights()["normal"]
    expected = 1 - torch.softmax(net.alphas_normal, -1).max(-1, keepdim=True).values + torch.softmax(
        net.alphas_normal, -1)
    assert torch.allclose(cw.ops, expected) and cw.edges is None


def test_sharp_primitives_option_builds_sharpsepconv():
    cfg = tiny_config("sharpdarts", options={"primitives": "sharp"})
    net = Searcher(cfg).net
    assert net.edge_primitives["normal"][0] == SHARP_PRIMITIVES
    names = {type(m).__name__ for m in net.modules()}
    assert "SharpSepConv" in names and "SepConv" not in names
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_short_sharpdarts_search_learns_and_derives_a_genotype():
    _, history, _, _ = search_and_probe("sharpdarts", warmup_epochs=0)
    # Max-W sums all ops at weight ~1 at the start, so the loss starts high; it must come down
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[0]["arch_active"]  # sharpDARTS trains the arch from the first epoch
    check_genotype(history[-1]["genotype"])
