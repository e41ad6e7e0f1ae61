"""P-DARTS: stages (depth and ops per edge), per-stage warm-up and lr, skip-connect dropout and cap, exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from methods_testlib import check_genotype, roundtrip, tiny_config, trace

from pcdarts_core.config import search_config
from pcdarts_core.genotypes import derive_cell
from pcdarts_core.methods.pdarts import METHOD, Pdarts, StageNetwork, capped_cell, prune_ops
from pcdarts_core.ops import PRIMITIVES, Identity
from pcdarts_core.search import Searcher, search

torch.set_num_threads(1)

STAGES = {"stage_layers": (3, 4, 5), "stage_epochs": (2, 2, 2)}


def test_cifar_defaults_and_validation():
    cfg = search_config("pdarts", "cifar10")
    o = cfg.options
    assert (o.stage_layers, o.stage_epochs, o.stage_ops, o.skip_dropout, o.max_skip) == (
        (5, 11, 17), (25, 25, 25), (8, 5, 3), (0.1, 0.4, 0.7), 2)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.batch_size, cfg.lr, cfg.arch_lr, cfg.k, cfg.edge_norm) == (
        75, 10, 96, 0.025, 6e-4, 1, False)
    quick = search_config("pdarts", "synthetic")  # the method's option defaults per dataset apply
    assert (quick.epochs, quick.options.stage_layers, quick.options.stage_epochs) == (6, (3, 4, 5), (2, 2, 2))
    assert search_config("pdarts", "synthetic", options={"max_skip": 1}).options.stage_epochs == (2, 2, 2)
    with pytest.raises(ValueError, match="sum of stage_epochs"):
        search_config("pdarts", "cifar10", epochs=50)
    with pytest.raises(ValueError, match="per P-DARTS stage"):
        search_config("pdarts", "cifar10", warmup_epochs=25)
    with pytest.raises(ValueError, match="never grow"):
        search_config("pdarts", "cifar10", options={"stage_ops": (8, 5, 6)})


def test_schedules_restart_in_every_stage():
    cfg = search_config("pdarts", "cifar10")
    stage_of = Pdarts.stage_of
    assert [stage_of(cfg, e) for e in (0, 24, 25, 49, 50, 74)] == [(0, 0), (0, 24), (1, 0), (1, 24), (2, 0), (2, 24)]
    # lr: a fresh cosine per stage
    assert METHOD.lr_factor(cfg, 0) == METHOD.lr_factor(cfg, 25) == METHOD.lr_factor(cfg, 50) == 1.0
    assert METHOD.lr_factor(cfg, 12) == pytest.approx((1 + math.cos(math.pi * 12 / 25)) / 2)
    # skip dropout: rate (E - e - 1) / E while weights train alone, then rate exp(-0.2 (e - 10))
    rate = Pdarts.skip_dropout_rate
    assert rate(cfg, 0) == pytest.approx(0.1 * 24 / 25)
    assert rate(cfg, 9) == pytest.approx(0.1 * 15 / 25)
    assert rate(cfg, 10) == pytest.approx(0.1)
    assert rate(cfg, 25 + 13) == pytest.approx(0.4 * math.exp(-0.6))
    assert rate(cfg, 50 + 24) == pytest.approx(0.7 * math.exp(-0.2 * 14))


def test_stage_changes_deepen_the_network_and_prune_the_ops():
    searcher = Searcher(tiny_config("pdarts", epochs=6, options=STAGES))
    net = searcher.net
    assert isinstance(net, StageNetwork) and net.stage == 0 and len(net.cells) == 3
    assert all(p == PRIMITIVES for p in net.edge_primitives["normal"])
    # per-stage warm-up: the arch is frozen in the first epoch of every stage
    for epoch, active in enumerate([False, True] * 3):
        searcher.epoch = epoch
        assert searcher.arch_active is active
    # make the preferred ops known: on edge e the weights rank the ops in the order of ``ranking[e]``
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in net.arch_parameters():
            a.copy_(torch.randn(a.shape, generator=gen))
        net.alphas_normal[:, PRIMITIVES.index("none")] = 10.0  # `none` is the strongest op of every normal edge
    probs = torch.softmax(net.alphas_normal.detach(), -1)
    top5 = [tuple(PRIMITIVES[i] for i in sorted(torch.topk(row, 5).indices.tolist())) for row in probs]
    old_params = {id(p) for p in net.parameters()}

    METHOD.on_epoch_start(searcher, 2)
    net = searcher.net
    assert isinstance(net, StageNetwork) and net.stage == 1 and len(net.cells) == 4
    assert net.edge_primitives["normal"] == top5  # the 5 strongest ops of each edge, in their original order
    assert net.alphas_normal.shape == (14, 5) and net.alphas_reduce.shape == (14, 5)
    # a fresh network with fresh optimizers over its own parameters
    assert not old_params & {id(p) for p in net.parameters()}
    assert {id(p) for g in searcher.arch_optimizer.param_groups for p in g["params"]} == {
        id(p) for p in net.arch_parameters()}
    assert not searcher.weight_optimizer.state

    with torch.no_grad():
        net.alphas_normal[:, 0] = 10.0  # `none` (still first on every normal edge) is strongest again
    METHOD.on_epoch_start(searcher, 4)
    net = searcher.net
    assert net.stage == 2 and len(net.cells) == 5 and net.alphas_normal.shape == (14, 3)
    for t in ("normal", "reduce"):  # `none` goes before the last stage, however strong it was
        assert all(len(p) == 3 and "none" not in p for p in net.edge_primitives[t])
    # pruning keeps the strongest: drop the two weakest of 5 when `none` is not involved
    keep = prune_ops(net, 2, drop_none=False)["normal"]
    probs = torch.softmax(net.alphas_normal.detach(), -1)
    for e, names in enumerate(net.edge_primitives["normal"]):
        weakest = names[int(probs[e].argmin())]
        assert len(keep[e]) == 2 and weakest not in keep[e]


def test_skip_dropout_only_after_identity_skips():
    searcher = Searcher(tiny_config("pdarts", epochs=6, options=STAGES, execution="reference"))
    METHOD.on_epoch_start(searcher, 0)
    rates = {(type(m.ops[m.skip_index]).__name__, round(m.skip_dropout, 6)) for m in searcher.net.mixed_ops()}
    assert rates == {("Identity", 0.05), ("FactorizedReduce", 0.0)}  # 0.1 (E - e - 1) / E with E = 2, e = 0
    m = next(m for m in searcher.net.mixed_ops() if isinstance(m.ops[m.skip_index], Identity))
    x = torch.ones(64, 4, 4, 4)
    m.skip_dropout = 0.5
    dropped = m.run(x, m.skip_index)
    assert 0.3 < float((dropped == 0).float().mean()) < 0.7  # dropout in training mode ...
    m.eval()
    assert torch.equal(m.run(x, m.skip_index), x)  # ... and none when evaluating


def test_skip_connect_cap_zeroes_the_weakest_skip_and_rederives():
    names = [PRIMITIVES] * 14
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(14, 8, generator=gen) * 0.1
    skip = PRIMITIVES.index("skip_connect")
    w[:, skip] = torch.linspace(0.5, 0.9, 14)  # skip-connect wins every edge; later edges have stronger skips
    uncapped = derive_cell(w, names)
    assert sum(op == "skip_connect" for op, _ in uncapped) == 8
    capped = capped_cell(w, names, 4, max_skip=2)
    skips = [(node, inp) for node in range(4) for op, inp in capped[2 * node: 2 * node + 2] if op == "skip_connect"]
    assert len(skips) == 2
    # the survivors are the two strongest skip-connects: edges 13 and 12 (node 3, inputs 4 and 3)
    assert sorted(skips) == [(3, 3), (3, 4)]
    assert capped_cell(w, names, 4, max_skip=8) == uncapped
    assert sum(op == "skip_connect" for op, _ in capped_cell(w, names, 4, max_skip=0)) == 0


def test_pdarts_search_learns_and_resumes_exactly_across_a_stage_boundary():
    """Interrupt in the middle of stage 2 (after epoch 3 of 2+2+2), resume in a fresh Searcher: the same run."""
    cfg = tiny_config("pdarts", epochs=6, options={"stage_layers": (3, 3, 3), "stage_epochs": (2, 2, 2)})
    saved = {}

    def keep(metrics, searcher):
        if metrics["epoch"] == 3:
            saved["state"] = roundtrip(searcher.state_dict())

    full = list(search(cfg, [keep]))
    assert [m["stage"] for m in full] == [0, 0, 1, 1, 2, 2]
    assert [m["ops_per_edge"] for m in full] == [8, 8, 5, 5, 3, 3]
    assert [m["arch_active"] for m in full] == [False, True] * 3
    assert saved["state"]["method"]["stage"] == 1
    resumed = list(search(cfg, state=saved["state"]))
    assert trace(resumed) == trace(full[3:])
    # learning: each stage starts from fresh weights, and its second epoch beats its first
    assert all(full[i + 1]["train_loss"] < full[i]["train_loss"] for i in (0, 2, 4))
    g = check_genotype(full[-1]["genotype"])
    assert g.count_op("skip_connect", "normal") <= 2
    assert all(op != "none" for op, _ in g.normal + g.reduce)
