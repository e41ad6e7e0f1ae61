"""Evaluation networks (DARTS Sec. 3.3/3.4, Appendix A.2) and their size as the papers count it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pcdarts_core.genotypes import PUBLISHED, Genotype
from pcdarts_core.model import (AuxiliaryHeadCIFAR, AuxiliaryHeadImageNet, EvalCell, NetworkCIFAR,
                                NetworkImageNet, drop_path)
from pcdarts_core.profile import count_madds, count_parameters


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


#: Nodes with 1 and 3 inputs (EnTranNAS-style), a stride-2 skip (FactorizedReduce) and pools in the reduce cell.
ODD = Genotype(
    normal=(("sep_conv_3x3", 0), ("skip_connect", 0), ("dil_conv_3x3", 1), ("avg_pool_3x3", 2),
            ("sep_conv_5x5", 2), ("skip_connect", 3), ("dil_conv_5x5", 4), ("max_pool_3x3", 0)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("skip_connect", 1), ("sep_conv_3x3", 0), ("dil_conv_3x3", 2),
            ("skip_connect", 2), ("sep_conv_5x5", 3), ("avg_pool_3x3", 1)),
    reduce_concat=(2, 3, 4, 5),
    normal_counts=(1, 3, 2, 2),
    reduce_counts=(3, 1, 1, 2),
)


@pytest.mark.parametrize("genotype", [PUBLISHED["PC_DARTS_CIFAR"], ODD], ids=["pc_darts", "1_and_3_inputs"])
def test_cifar_shapes_train_and_eval(genotype: Genotype) -> None:
    net = NetworkCIFAR(6, 10, 5, True, genotype, drop_path_prob=0.2)
    x = torch.randn(2, 3, 16, 16)
    net.train()
    logits, aux = net(x)
    assert logits.shape == (2, 10) and aux is not None and aux.shape == (2, 10)
    (logits.sum() + aux.sum()).backward()
    net.eval()
    logits, aux = net(x)
    assert logits.shape == (2, 10) and aux is None
    no_aux = NetworkCIFAR(6, 10, 5, False, genotype).train()
    assert no_aux(x)[1] is None and no_aux.auxiliary_head is None


@pytest.mark.parametrize("genotype", [PUBLISHED["PC_DARTS_IMAGENET"], ODD], ids=["pc_darts", "1_and_3_inputs"])
def test_imagenet_shapes_train_and_eval(genotype: Genotype) -> None:
    # Five stride-2 steps (3 stem convs, 2 reduction cells): 32x32 is the smallest input that keeps a 1x1 map.
    net = NetworkImageNet(8, 7, 5, True, genotype)
    x = torch.randn(2, 3, 32, 32)
    logits, aux = net.train()(x)
    assert logits.shape == (2, 7) and aux is not None and aux.shape == (2, 7)
    logits, aux = net.eval()(x)
    assert logits.shape == (2, 7) and aux is None


def test_auxiliary_heads_on_paper_sized_maps() -> None:
    """8x8 (CIFAR, 32 input) and 7x7 (ImageNet, 224 input) maps use the fixed AvgPool 5 path."""
    assert AuxiliaryHeadCIFAR(16, 10)(torch.randn(2, 16, 8, 8)).shape == (2, 10)
    assert AuxiliaryHeadImageNet(16, 10)(torch.randn(2, 16, 7, 7)).shape == (2, 10)
    assert AuxiliaryHeadImageNet(16, 10)(torch.randn(2, 16, 14, 14)).shape == (2, 10)
    assert AuxiliaryHeadCIFAR(16, 10)(torch.randn(2, 16, 2, 2)).shape == (2, 10)  # tiny: adaptive pooling


def test_drop_path_zeroes_samples_and_rescales() -> None:
    y = drop_path(torch.ones(400, 2, 3, 3), 0.5)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # whole samples dropped, survivors divided by keep
    assert (per_sample == per_sample[:, :1]).all()
    assert torch.equal(drop_path(torch.ones(3, 1, 2, 2), 0.0), torch.ones(3, 1, 2, 2))


def _drop_cell() -> EvalCell:
    # Node 0: a single Identity input (never dropped); nodes 1-3: convs only (dropped).
    g = Genotype(normal=(("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("dil_conv_3x3", 2),
                         ("sep_conv_3x3", 3), ("dil_conv_3x3", 0)),
                 normal_concat=(2, 3, 4, 5), reduce=PUBLISHED["DARTS_V2"].reduce,
                 reduce_concat=(2, 3, 4, 5), normal_counts=(1, 2, 1, 2))
    return EvalCell(g, 4, 4, 4, reduction=False, reduction_prev=False)


def test_drop_path_in_cell_training_only() -> None:
    cell = _drop_cell()
    s0, s1 = torch.randn(64, 4, 6, 6), torch.randn(64, 4, 6, 6)
    cell.train()
    out = cell(s0, s1, drop_prob=0.9)
    node = out.view(64, 4, 4, 6, 6).abs().flatten(2).sum(-1)  # (sample, node)
    assert (node[:, 0] > 0).all(), "Identity edges must never be dropped"
    assert (node[:, 2] == 0).sum() > 30, "a node with one conv input is zero for ~90% of samples at p=0.9"
    assert (node[:, 1] == 0).sum() > 20  # both conv inputs dropped for ~81% of samples
    cell.eval()
    assert torch.equal(cell(s0, s1, drop_prob=0.9), cell(s0, s1, drop_prob=0.0))


def test_network_drop_path_is_a_no_op_in_eval() -> None:
    net = NetworkCIFAR(4, 10, 3, True, PUBLISHED["DARTS_V2"]).eval()
    x = torch.randn(2, 3, 16, 16)
    ref, _ = net(x)
    net.drop_path_prob = 0.9  # what the training loop does each epoch
    assert torch.equal(net(x)[0], ref)


def test_reduce_concat_of_a_cell_input_is_rejected() -> None:
    g = Genotype(normal=PUBLISHED["DARTS_V2"].normal, normal_concat=(2, 3, 4, 5),
                 reduce=PUBLISHED["DARTS_V2"].reduce, reduce_concat=(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="reduce_concat"):
        NetworkCIFAR(4, 10, 3, False, g)


# -- sizes -----------------------------------------------------------------------------------------------------
# Measured here; the rounded values are the papers' (DARTS Table 1/2, PC-DARTS Table 1/3, P-DARTS Table 1).
CIFAR_PARAMS = {"DARTS_V2": (3_349_342, 3.3), "PC_DARTS_CIFAR": (3_634_678, 3.6), "PDARTS": (3_433_798, 3.4)}
IMAGENET = {"DARTS_V2": (4_718_752, 4.7, 529_911_552, 574e6), "PC_DARTS_IMAGENET": (5_342_464, 5.3, 581_627_328, 597e6)}


@pytest.mark.parametrize("name", sorted(CIFAR_PARAMS))
def test_published_cifar_parameter_counts(name: str) -> None:
    exact, paper = CIFAR_PARAMS[name]
    net = NetworkCIFAR(36, 10, 20, True, PUBLISHED[name])
    n = count_parameters(net)
    assert n == exact and round(n / 1e6, 1) == paper
    assert count_parameters(net, exclude_auxiliary=False) > n  # the head exists but is not counted


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_published_imagenet_parameters_and_madds(name: str) -> None:
    exact, paper, madds_exact, madds_paper = IMAGENET[name]
    net = NetworkImageNet(48, 1000, 14, True, PUBLISHED[name]).train()
    n = count_parameters(net)
    assert n == exact and round(n / 1e6, 1) == paper
    madds = count_madds(net, 224)
    assert madds == madds_exact
    assert net.training, "count_madds restores the training mode"
    # Conv+linear multiply-adds fall below the papers' figures (574M, 597M): DARTS's own counting script was
    # never released and others measuring conv+fc get ~523-530M for DARTS_V2 (quark0/darts issue #46). We keep
    # the stated formula and check the gap stays under 10% and the mobile setting's 600M bound holds.
    assert 0.9 * madds_paper < madds < madds_paper < 600e6


def test_count_madds_formula_on_a_hand_counted_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),      # 9*3*4 * 4*4 = 1728
                          nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),      # 9*1*4 * 4*4 = 576
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))  # 4*5 = 20
    assert count_madds(model, 8) == 1728 + 576 + 20
    assert count_madds(model, (3, 8, 8)) == count_madds(model, (8, 8))


def _analytic_params(genotype: Genotype, C: int, classes: int, layers: int, imagenet: bool) -> int:
    """Parameter count worked out from the layer definitions in the papers, independently of the model code."""

    def bn(c: int) -> int:
        return 2 * c

    def op(name: str, c: int, stride: int) -> int:
        if name.startswith("sep_conv"):
            k = int(name[-1])
            return 2 * (c * k * k + c * c + bn(c))  # (dw kxk, pw 1x1, BN) twice
        if name.startswith("dil_conv"):
            k = int(name[-1])
            return c * k * k + c * c + bn(c)
        if name == "skip_connect" and stride == 2:
            return 2 * c * (c // 2) + bn(c)  # FactorizedReduce: two 1x1 convs to c/2, BN
        return 0  # pools, identity

    if imagenet:
        total = 27 * (C // 2) + bn(C // 2) + 9 * (C // 2) * C + bn(C) + 9 * C * C + bn(C)
        c_pp, c_p = C, C
    else:
        total = 27 * 3 * C + bn(3 * C)
        c_pp, c_p = 3 * C, 3 * C
    c = C
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        c = 2 * c if reduction else c
        total += c_pp * c + bn(c) + c_p * c + bn(c)  # preprocess0 (1x1 conv or FactorizedReduce) + preprocess1
        cell = "reduce" if reduction else "normal"
        total += sum(op(name, c, 2 if reduction and j < 2 else 1) for name, j in getattr(genotype, cell))
        c_pp, c_p = c_p, 4 * c
    return total + c_p * classes + classes


@pytest.mark.parametrize("imagenet", [False, True], ids=["cifar", "imagenet"])
def test_parameter_count_matches_an_analytic_count(imagenet: bool) -> None:
    cls = NetworkImageNet if imagenet else NetworkCIFAR
    net = cls(8, 10, 4, True, ODD)
    assert count_parameters(net) == _analytic_params(ODD, 8, 10, 4, imagenet)
    c_aux = 4 * 32  # after cell 2 (2*4//3), the second reduction: 4 nodes of 4*C channels
    head = c_aux * 128 + 256 + 128 * 768 * 4 + (1536 if not imagenet else 0) + 768 * 10 + 10
    assert count_parameters(net, exclude_auxiliary=False) - count_parameters(net) == head
    # A hand-worked total for one tiny CIFAR net, as a fixed anchor for the formula above.
    assert _analytic_params(ODD, 8, 10, 4, False) == 35_874
