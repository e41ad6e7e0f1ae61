"""sharpDARTS: Cosine Power Annealing (official timing), Max-W weighting, the official op table and search data."""

from __future__ import annotations

import math

import pytest
import torch
from methods_testlib import check_genotype, search_and_probe, tiny_config
from torch import nn

from pcdarts_core.config import search_config
from pcdarts_core.methods.sharpdarts import METHOD, MaxWWeighting, cosine_power_factor
from pcdarts_core.ops import OPS, PRIMITIVES, SHARPDARTS_PRIMITIVES, make_op
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


def official_schedule(epochs: int, max_lr: float, min_lr: float, warmup: int, power: float) -> list[float]:
    """``cosine_power_annealing(epochs, max_lr, min_lr, warmup_epochs=warmup, exponent_order=power)`` of
    ahundt/sharpDARTS ``cnn/cosine_power_annealing.py``, step by step in plain Python."""
    ep = list(range(1, epochs + 1))
    max_epoch = epochs
    warm = [False] * epochs
    if warmup > 0:
        warm = [e <= warmup + 1 for e in ep]
        max_epoch -= warmup
        ep = [e - warmup for e in ep]
    cos = [(1 + math.cos(math.pi * e / max_epoch)) / 2 for e in ep]
    prop = cos if power == 1 else [power ** (c + 1) for c in cos]
    lo = min(prop)
    prop = [p - lo for p in prop]
    hi = max(prop)
    prop = [p / hi for p in prop]
    if warmup > 0:
        ramp = [i / (1 + warmup) for i in range(1, warmup + 2)]
        prop = [ramp.pop(0) if w else p for w, p in zip(warm, prop)]
    return [p * (max_lr - min_lr) + min_lr for p in prop]


@pytest.mark.parametrize("epochs,warmup,power", [(120, 5, 2.0), (20, 3, 10.0), (12, 0, 2.0), (30, 2, 1.0)])
def test_lr_is_the_official_cosine_power_annealing_entry_of_each_epoch(epochs, warmup, power):
    cfg = search_config("sharpdarts", "cifar10", epochs=epochs, lr_warmup_epochs=warmup, options={"power": power})
    ours = [cfg.lr * METHOD.lr_factor(cfg, e) for e in range(epochs)]
    assert ours == pytest.approx(official_schedule(epochs, cfg.lr, cfg.lr_min, warmup, power), rel=1e-9, abs=1e-12)
    assert ours[-1] == pytest.approx(cfg.lr_min)  # the last epoch runs at lr_min


def test_power_one_is_cosine_and_larger_powers_decay_faster():
    mid = [cosine_power_factor(25, 50, p) for p in (1.0, 2.0, 10.0)]
    assert mid[0] == pytest.approx(0.5) and mid[0] > mid[1] > mid[2]


def test_sharpdarts_defaults_are_the_official_search_command():
    """README: --batch_size 48 --init_channels 16 --layers_of_cells 8 --epochs 120 --cutout --autoaugment
    --weighting_algorithm max_w --primitives DARTS_PRIMITIVES (ops table OPS); train_search.py's other defaults."""
    cfg = search_config("sharpdarts", "cifar10")
    assert (cfg.batch_size, cfg.init_channels, cfg.layers, cfg.epochs, cfg.lr, cfg.lr_min, cfg.lr_warmup_epochs,
            cfg.arch_lr, cfg.warmup_epochs, cfg.k, cfg.edge_norm) == (48, 16, 8, 120, 0.025, 1e-4, 5, 3e-4, 0, 1, False)
    assert (cfg.augment, cfg.cutout) == ("autoaugment", 16)
    assert (cfg.options.power, cfg.options.weighting, cfg.options.op_table) == (2.0, "max_w", "auto")
    assert search_config("sharpdarts", "synthetic").augment == "standard"  # AutoAugment's policy is for CIFAR
    with pytest.raises(ValueError, match="power"):
        search_config("sharpdarts", "cifar10", options={"power": 0.5})
    with pytest.raises(ValueError, match="autoaugment"):
        search_config("sharpdarts", "synthetic", augment="autoaugment")
    with pytest.raises(ValueError, match="op_table"):
        search_config("sharpdarts", "cifar10", options={"op_table": "sharp"})


def official_sharp_sep_conv(c: int, kernel: int, stride: int, padding: int, dilation: int) -> nn.Sequential:
    """``SharpSepConv(C, C, kernel, stride, padding, dilation, affine=False)`` of sharpDARTS ``cnn/operations.py``
    with ``C_mid = C_out`` (the table's ``sep_conv`` and ``dil_conv`` entries)."""
    return nn.Sequential(
        nn.ReLU(), nn.Conv2d(c, c, kernel, stride, padding, dilation=dilation, groups=c, bias=False),
        nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c, affine=False),
        nn.ReLU(), nn.Conv2d(c, c, kernel, 1, (kernel - 1) // 2, groups=c, bias=False),
        nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c, affine=False))


@pytest.mark.parametrize("name,official", [
    ("sharp_dil_conv_3x3", dict(kernel=3, padding=2, dilation=2)),
    ("sharp_dil_conv_5x5", dict(kernel=5, padding=4, dilation=2)),
    ("sep_conv_3x3", dict(kernel=3, padding=1, dilation=1)),
    ("sep_conv_5x5", dict(kernel=5, padding=2, dilation=1)),
])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_ops_compute_the_official_sharpsepconv(name, official, stride):
    torch.manual_seed(0)
    ours = make_op(name, 6, stride, affine=False, search=True)
    ref = official_sharp_sep_conv(6, stride=stride, **official)
    ours_params, ref_params = list(ours.parameters()), list(ref.parameters())
    assert [p.shape for p in ours_params] == [p.shape for p in ref_params]  # same width throughout: no 2x middle
    with torch.no_grad():
        for a, b in zip(ours_params, ref_params):
            b.copy_(a)
    x = torch.randn(2, 6, 9, 9)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)


def test_op_table_is_the_official_one_and_avg_pool_counts_the_padding():
    assert len(SHARPDARTS_PRIMITIVES) == 8 and all(name in OPS for name in SHARPDARTS_PRIMITIVES)
    assert [n.removeprefix("sharp_") for n in SHARPDARTS_PRIMITIVES] == list(PRIMITIVES)  # DARTS_PRIMITIVES' order
    x = torch.ones(1, 2, 4, 4)
    ours = OPS["sharp_avg_pool_3x3"](2, 1, False)(x)
    assert ours[0, 0, 0, 0] == pytest.approx(4 / 9)  # ResizablePool's AvgPool2d counts the zero padding ...
    assert OPS["avg_pool_3x3"](2, 1, False)(x)[0, 0, 0, 0] == pytest.approx(1.0)  # ... DARTS's does not
    net = Searcher(tiny_config("sharpdarts")).net
    assert net.edge_primitives["normal"][0] == SHARPDARTS_PRIMITIVES
    darts = Searcher(tiny_config("sharpdarts", options={"op_table": "darts"})).net
    assert darts.edge_primitives["normal"][0] == PRIMITIVES


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


def test_short_sharpdarts_search_learns_and_derives_a_genotype():
    _, history, _, _ = search_and_probe("sharpdarts", warmup_epochs=0, epochs=4, lr_warmup_epochs=1)
    # Max-W sums all ops at weight ~1 at the start, so the loss starts high; it must come down
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[0]["arch_active"]  # sharpDARTS trains the arch from the first epoch
    g = check_genotype(history[-1]["genotype"])
    assert {op for op, _ in g.normal + g.reduce} <= set(SHARPDARTS_PRIMITIVES) - {"none"}
