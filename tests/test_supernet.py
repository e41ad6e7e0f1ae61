"""The PC-DARTS supernet: sizes, partial channels, edge normalization, DARTS equivalence at K=1."""

import pytest
import torch

from pcdarts_core.config import search_config
from pcdarts_core.supernet import SearchNetwork, channel_shuffle, reduction_layers

torch.set_num_threads(1)


def analytic_weight_count(C: int, layers: int, k: int, classes: int = 10) -> int:
    """Independent count from the DARTS/PC-DARTS definitions (search BN is non-affine; stem BN is affine)."""
    total = 3 * 3 * C * 9 + 2 * 3 * C
    c_pp, c_p, c = 3 * C, 3 * C, C
    red_prev = False
    for i in range(layers):
        red = i in (layers // 3, 2 * layers // 3)
        if red:
            c *= 2
        total += c_pp * c + c_p * c  # preprocess0 (ReLUConvBN or FactorizedReduce: same count) + preprocess1
        cp = c // k
        sep = lambda kk: 2 * (cp * kk * kk + cp * cp)  # noqa: E731
        dil = lambda kk: cp * kk * kk + cp * cp  # noqa: E731
        for node in range(4):
            for j in range(node + 2):
                stride2 = red and j < 2
                total += sep(3) + sep(5) + dil(3) + dil(5) + (cp * cp if stride2 else 0)
        red_prev = red
        c_pp, c_p = c_p, 4 * c
    del red_prev
    return total + c_p * classes + classes


@pytest.mark.parametrize("k, edge_norm, official", [(4, True, 299_578), (1, False, 1_930_618)])
def test_parameter_counts_match_official(k, edge_norm, official):
    """C=16, 10 classes, 8 layers: the official train_search logs print 0.299578MB (PC-DARTS) and 1.930618MB (DARTS)."""
    net = SearchNetwork(16, 10, 8, k=k, edge_norm=edge_norm)
    n_weights = sum(p.numel() for p in net.weight_parameters())
    assert n_weights == official == analytic_weight_count(16, 8, k)
    n_arch = sum(p.numel() for p in net.arch_parameters())
    assert n_arch == 2 * 14 * 8 + (2 * 14 if edge_norm else 0)
    assert net.alphas_normal.shape == (14, 8) and (net.betas_normal is None) == (not edge_norm)


def test_reduction_cells_and_shapes():
    assert reduction_layers(8) == (2, 5)
    net = SearchNetwork(4, 10, 5, k=4)
    assert [c.reduction for c in net.cells] == [False, True, False, True, False]
    out = net(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 10)
    imnet = SearchNetwork(4, 7, 3, k=2, stem="imagenet")
    assert imnet(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_partial_channels_run_ops_on_one_kth():
    net = SearchNetwork(8, 10, 3, k=4, execution="reference")
    mixed = net.cells[0].mixed[0]
    conv = mixed.ops[4].op[0].op[1]  # sep_conv_3x3's first depthwise conv
    assert conv.in_channels == 8 // 4
    # K=1: all channels
    k1 = SearchNetwork(8, 10, 3, k=1, edge_norm=False, execution="reference")
    assert k1.cells[0].mixed[0].ops[4].op[0].op[1].in_channels == 8
    # fused: the same depthwise conv batched over the 4 edges that read state 0, C/K channels each
    fused = SearchNetwork(8, 10, 3, k=4).cells[0].fused[0]["sep_conv_3x3"]
    assert fused.units == [0, 2, 5, 9] and fused.body.op[0].op[1].in_channels == 4 * 8 // 4


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_shuffle(x, 4).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert channel_shuffle(x, 1).flatten().tolist() == list(range(8))


@pytest.mark.parametrize("execution", ["reference", "fused"])
def test_k1_cell_equals_weighted_sum_of_ops(execution):
    """DARTS's mixed op: sum_o softmax(alpha)_o * op_o(x) on every channel, no edge scaling."""
    torch.manual_seed(0)
    net = SearchNetwork(4, 10, 3, k=1, edge_norm=False, execution="reference").eval()
    under_test = SearchNetwork(4, 10, 3, k=1, edge_norm=False, execution=execution).eval()
    under_test.load_state_dict(net.state_dict())
    cell = net.cells[0]
    weights = net.cell_weights()["normal"]
    assert weights.edges is None
    s = torch.randn(2, 12, 8, 8)
    s0, s1 = cell.preprocess0(s), cell.preprocess1(s)
    mixed = cell.mixed[0]
    expected = sum(w * op(s0) for w, op in zip(torch.softmax(net.alphas_normal[0], -1), mixed.ops))
    states = [s0, s1]
    node0 = sum(sum(w * op(states[j]) for w, op in zip(torch.softmax(net.alphas_normal[j], -1), cell.mixed[j].ops))
                for j in range(2))
    out = under_test.cells[0](s, s, weights)
    assert torch.allclose(out[:, :4], node0, atol=1e-6)
    assert expected.shape == s0.shape


def test_edge_normalization_scales_edges():
    net = SearchNetwork(4, 10, 3, k=2)
    with torch.no_grad():
        net.betas_normal.zero_()
        net.betas_normal[0] = 20.0  # node 0 listens only to input 0
    w = net.cell_weights()["normal"]
    assert w.edges[0].item() == pytest.approx(1.0, abs=1e-6) and w.edges[1].item() < 1e-6
    assert torch.allclose(w.edges[2:5].sum(), torch.tensor(1.0))


def test_random_channel_sampling_is_seeded_and_changes_per_step():
    x = torch.randn(2, 3, 16, 16)
    a = SearchNetwork(8, 10, 3, k=4, channel_sampling="random", seed=3).eval()
    b = SearchNetwork(8, 10, 3, k=4, channel_sampling="random", seed=3).eval()
    b.load_state_dict(a.state_dict())
    ya1, yb1 = a(x), b(x)
    assert torch.equal(ya1, yb1)  # same seed: same channel draws (what keeps data-parallel ranks identical)
    assert not torch.allclose(a(x), ya1)  # a new draw next step
    fixed = SearchNetwork(8, 10, 3, k=4, seed=3).eval()
    assert torch.equal(fixed(x), fixed(x))


def test_genotype_follows_arch_weights():
    net = SearchNetwork(4, 10, 3, k=2)
    before = net.genotype()
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[:, 5] = 3.0  # sep_conv_5x5 everywhere
        net.betas_normal.zero_()
        net.betas_normal[[1, 4, 8, 13]] = 5.0  # each node's last input first
    g = net.genotype()
    assert g != before
    assert all(op == "sep_conv_5x5" for op, _ in g.normal)
    assert [node[0][1] for node in g.nodes("normal")] == [1, 2, 3, 4]


@pytest.mark.parametrize("overrides, message", [
    ({"init_channels": 6, "k": 4}, "K=4 does not divide"),
    ({"epochs": 5, "warmup_epochs": 5}, "warmup_epochs"),
    ({"train_portion": 1.5}, "train_portion"),
    ({"channel_sampling": "shuffle"}, "channel_sampling"),
    ({"order": "third"}, "order must be"),
    ({"lr": -1.0}, "lr"),
    ({"early_stop": True}, "hessian_every"),
    ({"layers": 2}, "layers must be at least 3"),
])
def test_impossible_settings_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        search_config("pcdarts", "synthetic", **overrides)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown method 'dartz'"):
        search_config("dartz")
    with pytest.raises(ValueError, match="did you mean 'arch_lr'"):
        search_config("pcdarts", "cifar10", arch_lrr=1e-3)
    with pytest.raises(ValueError, match="dataset must be one of"):
        search_config("pcdarts", "mnist")
    with pytest.raises(ValueError, match="unknown op"):
        SearchNetwork(4, 10, 3, primitives=("none", "conv_9x9"))


def test_papers_defaults():
    c = search_config()
    assert (c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, c.grad_clip, c.init_channels, c.layers,
            c.k, c.warmup_epochs, c.arch_lr, c.arch_betas, c.arch_weight_decay) == (
        50, 256, 0.1, 0.9, 3e-4, 5.0, 16, 8, 4, 15, 6e-4, (0.5, 0.999), 1e-3)
    im = search_config("pcdarts", "imagenet")
    assert (im.k, im.batch_size, im.lr, im.warmup_epochs, im.lr_warmup_epochs, im.arch_lr) == (2, 1024, 0.5, 35, 5, 6e-3)
    d = search_config("darts")
    assert (d.k, d.edge_norm, d.arch_lr, d.batch_size, d.lr, d.lr_min) == (1, False, 3e-4, 64, 0.025, 0.001)
