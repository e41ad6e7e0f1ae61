"""EnTranNAS: engine and transit cells, feature sharing, and EnTranNAS-DST's thresholds."""

from __future__ import annotations

import pytest
import torch
from methods_testlib import check_genotype, record_op_calls, search_and_probe, tiny_config

from pcdarts_core.config import search_config
from pcdarts_core.genotypes import node_edge_slices
from pcdarts_core.methods.entrannas import METHOD, SparsifyWeighting, engine_cell_indices
from pcdarts_core.ops import PRIMITIVES
from pcdarts_core.search import Searcher
from pcdarts_core.supernet import derived_subgraph

torch.set_num_threads(1)


def searcher(**overrides) -> Searcher:
    return Searcher(tiny_config("entrannas", layers=5, **overrides))


def test_engine_cells_are_the_first_and_the_reduction_cells():
    assert engine_cell_indices("auto", 8) == (0, 2, 5)
    assert engine_cell_indices("auto", 5) == (0, 1, 3)
    assert engine_cell_indices("0, 4", 5) == (0, 4)
    with pytest.raises(ValueError):
        engine_cell_indices("7", 5)
    with pytest.raises(ValueError):
        search_config("entrannas", "cifar10", options={"engine_cells": "first"})
    net = searcher().net
    assert [cell.transit for cell in net.cells] == [False, False, True, False, True]
    assert all(cell.feature_sharing and cell.n_units == net.steps + 1 for cell in net.cells)


@pytest.mark.parametrize("execution", ["fused", "reference"])
def test_transit_cells_run_only_the_derived_ops_and_engines_run_all_with_shared_features(execution):
    net = searcher(execution=execution).net
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    calls = record_op_calls(net)
    net(torch.randn(4, 3, 8, 8))
    weights = net.cell_weights()
    genotype = net.genotype()
    for c, cell in enumerate(net.cells):
        ran = sorted(k[1:] for k in calls if k[0] == c)
        if cell.transit:
            active, ops = derived_subgraph(weights[cell.cell_type], cell.edge_op_names, net.steps)
            expected = sorted({(cell.edge_sources[e], ops[e]) for e in range(14) if active[e]})
            assert ran == expected  # only the derived (source, op) pairs, each once
            # and that sub-graph is the genotype the search would report
            derived = sorted((cell.edge_sources[e], PRIMITIVES[ops[e]]) for e in range(14) if active[e])
            assert derived == sorted((inp, op) for op, inp in getattr(genotype, cell.cell_type))
        else:
            # feature sharing: each source state computes each candidate op once for all its successors
            # (fused execution never computes `none`: it contributes zero)
            ops = [o for o, name in enumerate(PRIMITIVES) if execution == "reference" or name != "none"]
            assert ran == sorted((m, o) for m in range(net.steps + 1) for o in ops)


def test_dst_threshold_formula_and_pruning():
    s = searcher(options={"dst": True})
    net = s.net
    assert set(net.extra_arch) == {"thresholds_normal", "thresholds_reduce"}
    assert any(p is net.extra_arch["thresholds_normal"] for p in net.arch_parameters())
    weighting = net.weighting
    assert isinstance(weighting, SparsifyWeighting)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.betas_normal.copy_(2 * torch.randn(14, generator=gen))
        net.betas_reduce.copy_(2 * torch.randn(14, generator=gen))
        net.extra_arch["thresholds_normal"].copy_(torch.tensor([0.0, -1.0, 0.5, 1.0]))
    q = weighting.edge_weights(net, "normal")
    for node, rows in enumerate(node_edge_slices(4)):
        p = torch.softmax(net.betas_normal[rows], -1)
        raw = torch.relu(p / p.max() - torch.sigmoid(net.extra_arch["thresholds_normal"][node]))
        assert torch.allclose(q[rows], raw / raw.sum())

    def inputs_per_node(b: float) -> list[int]:
        with torch.no_grad():
            for t in ("normal", "reduce"):
                net.extra_arch[f"thresholds_{t}"].fill_(b)
        g = METHOD.genotype(net)
        check_genotype(g.to_json())  # any input counts: serializes, parses, builds an evaluation network
        return list(g.normal_counts + g.reduce_counts)

    low, high, extreme = inputs_per_node(-20.0), inputs_per_node(1.5), inputs_per_node(100.0)
    assert sum(high) < sum(low)  # a higher threshold keeps fewer inputs
    assert low == [2, 3, 4, 5] * 2  # t ~ 0: every input survives
    assert extreme == [1] * 8  # t ~ 1: only the strongest input of each node, never none
    assert any(c not in (1, 2) for c in low + high)


def test_dst_transit_cells_run_exactly_the_inputs_with_positive_weight():
    net = searcher(options={"dst": True, "threshold_init": 0.5}).net
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (net.betas_normal, net.betas_reduce):
            p.copy_(2 * torch.randn(14, generator=gen))
    calls = record_op_calls(net)
    net(torch.randn(4, 3, 8, 8))
    g = METHOD.genotype(net)
    for c, cell in enumerate(net.cells):
        if not cell.transit:
            continue
        ran = sorted((m, PRIMITIVES[o]) for cc, m, o in calls if cc == c)
        assert ran == sorted({(inp, op) for op, inp in getattr(g, cell.cell_type)})
    assert sum(g.normal_counts) != 8 or sum(g.reduce_counts) != 8  # not the top-2 rule in disguise


@pytest.mark.parametrize("dst", [False, True])
def test_short_entrannas_search_learns_and_derives_a_genotype(dst):
    s, history, before, after = search_and_probe("entrannas", layers=5, options={"dst": dst})
    assert history[-1]["train_loss"] < history[0]["train_loss"] and after < before
    g = check_genotype(history[-1]["genotype"])
    if not dst:
        assert g.normal_counts == (2, 2, 2, 2)
    # the thresholds are trained with the other arch parameters
    if dst:
        assert not torch.equal(s.net.extra_arch["thresholds_normal"].detach(), torch.zeros(4))
