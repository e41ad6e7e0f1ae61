"""P-DARTS: stages (depth and ops per edge), per-stage warm-up and lr, skip-connect dropout and cap, exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from methods_testlib import check_genotype, roundtrip, tiny_config, trace

from pcdarts_core.config import search_config
from pcdarts_core.genotypes import derive_cell
from pcdarts_core.methods.pdarts import METHOD, Pdarts, StageNetwork, capped_cell, prune_ops, stage_plan
from pcdarts_core.ops import PRIMITIVES, Identity
from pcdarts_core.search import Searcher, search

torch.set_num_threads(1)

STAGES = {"stage_layers": (3, 4, 5), "stage_epochs": (2, 2, 2)}


def test_cifar_defaults_and_validation():
    cfg = search_config("pdarts", "cifar10")
    o = cfg.options
    assert (o.stage_layers, o.stage_ops, o.skip_dropout, o.max_skip) == ((5, 11, 17), (8, 5, 3), (0.1, 0.4, 0.7), 2)
    assert [(s.start, s.epochs, s.warmup) for s in stage_plan(cfg)] == [(0, 25, 10), (25, 25, 10), (50, 25, 10)]
    assert (cfg.epochs, cfg.warmup_epochs, cfg.batch_size, cfg.lr, cfg.lr_min, cfg.arch_lr, cfg.k, cfg.edge_norm) == (
        75, 10, 96, 0.025, 0.0, 6e-4, 1, False)
    # the README's CIFAR-10 command: --dropout_rate 0.1 0.4 0.7; the paper's CIFAR-100 rates: 0.1, 0.2, 0.3
    assert search_config("pdarts", "cifar100").options.skip_dropout == (0.1, 0.2, 0.3)
    quick = search_config("pdarts", "synthetic")  # the method's option defaults per dataset apply
    assert (quick.epochs, quick.options.stage_layers, [s.epochs for s in stage_plan(quick)]) == (6, (3, 4, 5), [2] * 3)
    assert search_config("pdarts", "synthetic", options={"max_skip": 1}).options.stage_layers == (3, 4, 5)
    given = search_config("pdarts", "cifar10", epochs=60, options={"stage_epochs": [15, 20, 25]})
    assert given.options.stage_epochs == (15, 20, 25)
    assert [(s.start, s.epochs) for s in stage_plan(given)] == [(0, 15), (15, 20), (35, 25)]
    with pytest.raises(ValueError, match="sum of stage_epochs"):
        search_config("pdarts", "cifar10", epochs=50, options={"stage_epochs": [25, 25, 25]})
    with pytest.raises(ValueError, match="per P-DARTS stage"):
        search_config("pdarts", "cifar10", warmup_epochs=25, options={"stage_epochs": [25, 25, 25]})
    with pytest.raises(ValueError, match="never grow"):
        search_config("pdarts", "cifar10", options={"stage_ops": (8, 5, 6)})


def test_epochs_are_spread_over_the_stages_so_every_preset_runs():
    """Without stage_epochs, ``epochs`` is split evenly (earlier stages take the remainder); too few epochs for all
    stages: the last ones do not run; a stage too short for the warm-up trains the arch in its last epoch."""
    plan = stage_plan(search_config("pdarts", "synthetic", epochs=8, warmup_epochs=2))
    assert [(s.index, s.start, s.epochs, s.warmup) for s in plan] == [(0, 0, 3, 2), (1, 3, 3, 2), (2, 6, 2, 1)]
    smoke = search_config("pdarts", "synthetic", epochs=2, warmup_epochs=1, init_channels=4, layers=3,
                          image_size=8, batch_size=8, synthetic_samples=32, steps_per_epoch=1, eval_steps=1,
                          device="cpu")
    assert [(s.index, s.epochs, s.warmup) for s in stage_plan(smoke)] == [(0, 1, 0), (1, 1, 0)]
    history = list(search(smoke))
    assert [(m["stage"], m["ops_per_edge"], m["arch_active"]) for m in history] == [(0, 8, True), (1, 5, True)]
    check_genotype(history[-1]["genotype"])


def test_lr_steps_at_the_start_of_each_epoch_as_the_official_scheduler():
    """``scheduler.step()`` before each epoch: epoch e of a stage of E epochs runs at t = e + 1, the last at lr_min."""
    cfg = search_config("pdarts", "cifar10")
    cosine = [(1 + math.cos(math.pi * t / 25)) / 2 for t in range(1, 26)]
    for start in (0, 25, 50):
        assert [METHOD.lr_factor(cfg, start + e) for e in range(25)] == pytest.approx(cosine)
    assert METHOD.lr_factor(cfg, 24) == pytest.approx(0.0, abs=1e-12)
    # skip dropout: rate (E - e - 1) / E while weights train alone, then rate exp(-0.2 (e - 10))
    rate = Pdarts.skip_dropout_rate
    assert rate(cfg, 0) == pytest.approx(0.1 * 24 / 25)
    assert rate(cfg, 9) == pytest.approx(0.1 * 15 / 25)
    assert rate(cfg, 10) == pytest.approx(0.1)
    assert rate(cfg, 25 + 13) == pytest.approx(0.4 * math.exp(-0.6))
    assert rate(cfg, 50 + 24) == pytest.approx(0.7 * math.exp(-0.2 * 14))
    c100 = search_config("pdarts", "cifar100")
    assert [rate(c100, e) for e in (10, 35, 60)] == pytest.approx([0.1, 0.2, 0.3])


def _rank_ops(net: StageNetwork, cell: str, ranking: list[str]) -> None:
    """Give every edge of ``cell`` alphas that rank its ops as ``ranking`` (strongest first)."""
    names = net.edge_primitives[cell]
    with torch.no_grad():
        alphas = net.alphas(cell)
        for e, ops in enumerate(names):
            for i, op in enumerate(ops):
                alphas[e, i] = float(len(ranking) - ranking.index(op))


def test_none_survives_pruning_into_the_last_stage_and_never_enters_the_final_cell():
    """Official ``get_min_k`` after stages 1 and 2 ranks `none` like any op; ``get_min_k_no_zero`` only at the end."""
    searcher = Searcher(tiny_config("pdarts", epochs=6, options=STAGES))
    net = searcher.net
    assert isinstance(net, StageNetwork) and net.stage == 0 and len(net.cells) == 3
    assert all(p == PRIMITIVES for p in net.edge_primitives["normal"])
    # per-stage warm-up: the arch is frozen in the first epoch of every stage
    for epoch, active in enumerate([False, True] * 3):
        searcher.epoch = epoch
        assert searcher.arch_active is active
    stage1 = ["none", "skip_connect", "sep_conv_3x3", "max_pool_3x3", "dil_conv_5x5", "avg_pool_3x3",
              "sep_conv_5x5", "dil_conv_3x3"]
    for cell in ("normal", "reduce"):
        _rank_ops(net, cell, stage1)
    old_params = {id(p) for p in net.parameters()}

    METHOD.on_epoch_start(searcher, 2)
    net = searcher.net
    assert isinstance(net, StageNetwork) and net.stage == 1 and len(net.cells) == 4
    # the 5 strongest ops of each edge, `none` among them, in their original order
    five = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_5x5")
    assert net.edge_primitives["normal"] == [five] * 14 and net.edge_primitives["reduce"] == [five] * 14
    assert net.alphas_normal.shape == (14, 5) and net.alphas_reduce.shape == (14, 5)
    # a fresh network with fresh optimizers over its own parameters
    assert not old_params & {id(p) for p in net.parameters()}
    assert {id(p) for g in searcher.arch_optimizer.param_groups for p in g["params"]} == {
        id(p) for p in net.arch_parameters()}
    # ... whose state is the zeros of a first step (the momentum buffers start from nothing learned)
    assert all(not s["momentum_buffer"].any() for s in searcher.weight_optimizer.state.values())
    assert {id(p) for p in searcher.weight_optimizer.state} == {id(p) for p in net.weight_parameters()}

    for cell in ("normal", "reduce"):  # after stage 2 `none` ranks 2nd of 5: it stays a candidate of stage 3
        _rank_ops(net, cell, ["sep_conv_3x3", "none", "dil_conv_5x5", "skip_connect", "max_pool_3x3"])
    METHOD.on_epoch_start(searcher, 4)
    net = searcher.net
    assert net.stage == 2 and len(net.cells) == 5 and net.alphas_normal.shape == (14, 3)
    three = ("none", "sep_conv_3x3", "dil_conv_5x5")
    assert net.edge_primitives["normal"] == [three] * 14 and net.edge_primitives["reduce"] == [three] * 14

    # in stage 3 `none` is the strongest op of every edge, yet the final cell never holds it: per edge the best
    # other op, per node the two inputs whose best other op weighs most (softmax with `none` included)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in net.arch_parameters():
            a.copy_(torch.randn(a.shape, generator=gen))
            a[:, 0] = 10.0
    g = net.genotype()
    assert all(op != "none" for op, _ in g.normal + g.reduce)
    probs = torch.softmax(net.alphas_normal.detach(), -1)
    expected = derive_cell(probs, net.edge_primitives["normal"])
    assert list(g.normal) == [e for e in expected]
    # and a whole search ends with a genotype without `none`
    searcher.epoch = 4
    while not searcher.done:
        searcher.run_epoch()
    assert "none" not in {op for op, _ in searcher.final_genotype().normal + searcher.final_genotype().reduce}


def test_prune_ties_drop_the_earlier_op_as_numpy_argmin():
    searcher = Searcher(tiny_config("pdarts", epochs=6, options=STAGES))
    with torch.no_grad():
        for a in searcher.net.arch_parameters():
            a.zero_()
    kept = prune_ops(searcher.net, 5)
    assert kept["normal"] == [PRIMITIVES[3:]] * 14  # get_min_k drops indices 0, 1, 2 of a flat row


def test_arch_gradients_are_clipped_before_the_adam_step(monkeypatch):
    """Official ``train``: ``clip_grad_norm_(arch_parameters(), grad_clip)`` between backward and ``optimizer_a.step``.
    The gradients the arch optimizer's update receives are recorded on their way in (the real update runs)."""
    import pcdarts_core.architect as architect

    norms = {}
    for method in ("pdarts", "darts"):
        searcher = Searcher(tiny_config(method, epochs=6, warmup_epochs=0, grad_clip=1e-3, steps_per_epoch=2,
                                        **({"options": STAGES} if method == "pdarts" else {})))
        seen: list[float] = []
        real_update = architect.update

        def record(opt, params, grads, seen=seen, arch_opt=searcher.arch_optimizer, real_update=real_update):
            if opt is arch_opt:
                seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
            real_update(opt, params, grads)

        monkeypatch.setattr(architect, "update", record)
        searcher.run_epoch()
        monkeypatch.undo()
        norms[method] = seen
    assert len(norms["pdarts"]) == 2 and max(norms["pdarts"]) <= 1e-3 * (1 + 1e-5)
    assert min(norms["darts"]) > 1e-3  # DARTS does not clip: the same setting leaves its arch gradients whole


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
    """Interrupt in the middle of stage 2 (after epoch 4 of 3+3+3), resume in a fresh Searcher: the same run."""
    cfg = tiny_config("pdarts", epochs=9, options={"stage_layers": (3, 3, 3), "stage_epochs": (3, 3, 3)})
    saved = {}

    def keep(metrics, searcher):
        if metrics["epoch"] == 4:
            saved["state"] = roundtrip(searcher.state_dict())

    full = list(search(cfg, [keep]))
    assert [m["stage"] for m in full] == [0] * 3 + [1] * 3 + [2] * 3
    assert [m["ops_per_edge"] for m in full] == [8] * 3 + [5] * 3 + [3] * 3
    assert [m["arch_active"] for m in full] == [False, True, True] * 3
    assert [m["lr"] for m in full][2::3] == [0.0] * 3  # each stage's last epoch runs at lr_min (official timing)
    assert saved["state"]["method"]["stage"] == 1
    resumed = list(search(cfg, state=saved["state"]))
    assert trace(resumed) == trace(full[4:])
    # learning: each stage starts from fresh weights, and its last epoch beats its first
    assert all(full[i + 2]["train_loss"] < full[i]["train_loss"] for i in (0, 3, 6))
    g = check_genotype(full[-1]["genotype"])
    assert g.count_op("skip_connect", "normal") <= 2
    assert all(op != "none" for op, _ in g.normal + g.reduce)


def test_resume_refuses_a_changed_spread_of_epochs():
    state = roundtrip(Searcher(tiny_config("pdarts", epochs=6, options={"stage_layers": (3, 3, 3)})).state_dict())
    with pytest.raises(ValueError, match="P-DARTS stages were \\[2, 2, 2\\]"):
        Searcher(tiny_config("pdarts", epochs=9, options={"stage_layers": (3, 3, 3)})).load_state_dict(state)
