"""ROME: Gumbel-Top2 topology sampling, single-path ops, gradient accumulation over K sub-networks, memory."""

from __future__ import annotations

import pytest
import torch
from methods_testlib import check_genotype, record_op_calls, roundtrip, tiny_config, trace

from pcdarts_core.config import search_config
from pcdarts_core.genotypes import node_edge_slices
from pcdarts_core.methods.rome import METHOD, ROME_PRIMITIVES, GumbelTop2Weighting, Rome
from pcdarts_core.search import Searcher, search

torch.set_num_threads(1)


def rome_searcher(**overrides) -> Searcher:
    return Searcher(tiny_config("rome", warmup_epochs=0, **overrides))


def test_defaults_and_validation():
    cfg = search_config("rome", "cifar10")
    assert (cfg.options.samples, cfg.options.tau_max, cfg.options.tau_min, cfg.edge_norm, cfg.k) == (7, 10.0, 0.1,
                                                                                                     True, 1)
    assert Rome.temperature(cfg, 0) == 10.0 and Rome.temperature(cfg, cfg.epochs - 1) == pytest.approx(0.1)
    assert "none" not in ROME_PRIMITIVES and len(ROME_PRIMITIVES) == 7
    with pytest.raises(ValueError, match="edge_norm"):
        search_config("rome", "cifar10", edge_norm=False)
    with pytest.raises(ValueError, match="second-order"):
        search_config("rome", "cifar10", order="second")


def test_gumbel_top2_samples_exactly_two_distinct_inputs_per_node_and_never_none():
    net = rome_searcher().net
    net.train()
    pairs_seen = set()
    for _ in range(40):
        for t in ("normal", "reduce"):
            cw = net.cell_weights()[t]
            assert cw.active_edges is not None and cw.active_ops is not None
            for rows in node_edge_slices(net.steps):
                chosen = [e for e in range(rows.start, rows.stop) if cw.active_edges[e]]
                assert len(chosen) == 2  # two distinct edges, i.e. two distinct inputs
                pairs_seen.add((t, rows.start, tuple(chosen)))
            for e, o in enumerate(cw.active_ops):
                assert net.edge_primitives[t][e][o] != "none"
            # forward values are hard: one-hot ops, 0/1 edges
            assert torch.allclose(cw.ops.detach(), torch.nn.functional.one_hot(torch.tensor(cw.active_ops), 7).float(),
                                  atol=1e-6)
            assert torch.allclose(cw.edges.detach(), torch.tensor(cw.active_edges).float(), atol=1e-6)
    # the topology really is sampled: node 3 of the normal cell (5 inputs, 10 pairs) shows several pairs
    assert len({p for p in pairs_seen if p[:2] == ("normal", 9)}) >= 3


def test_straight_through_gives_the_topology_and_op_parameters_gradients():
    net = rome_searcher().net
    weighting = net.weighting
    assert isinstance(weighting, GumbelTop2Weighting)
    weighting.tau = 1.0
    cw = net.cell_weights()["normal"]
    gen = torch.Generator().manual_seed(0)
    (cw.edges * torch.randn(14, generator=gen)).sum().add((cw.ops * torch.randn(14, 7, generator=gen)).sum()).backward()
    assert bool((net.betas_normal.grad != 0).all())  # every topology parameter, chosen edge or not
    assert bool((net.alphas_normal.grad != 0).all())


def test_sampling_uses_torch_rng():
    net = rome_searcher().net

    def draw(seed: int):
        torch.manual_seed(seed)
        cw = net.cell_weights()["normal"]
        return cw.active_edges, cw.active_ops

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


@pytest.mark.parametrize("execution", ["fused", "reference"])
def test_only_the_sampled_ops_of_the_sampled_edges_run_and_memory_is_far_below_pcdarts(execution):
    searcher = rome_searcher(execution=execution)
    net = searcher.net
    recorded = record_op_calls(net)
    x = torch.randn(8, 3, 8, 8)
    torch.manual_seed(0)
    weights = net.cell_weights()
    torch.manual_seed(0)
    net(x)
    calls = [(net.cells[c].cell_type, e, o) for c, e, o in recorded]  # one unit per edge: unit = edge
    expected = []
    for cell in net.cells:
        cw = weights[cell.cell_type]
        expected += [(cell.cell_type, e, cw.active_ops[e]) for e in range(14) if cw.active_edges[e]]
    assert sorted(calls) == sorted(expected) and len(calls) == 8 * len(net.cells)
    # activation memory held for backward, same C, depth and batch: PC-DARTS (K=4) and DARTS (K=1) supernets
    rome = saved_bytes(net, x)
    pcdarts = saved_bytes(Searcher(tiny_config("pcdarts", execution=execution)).net, x)
    darts = saved_bytes(Searcher(tiny_config("darts", execution=execution)).net, x)
    assert rome < 0.5 * pcdarts and rome < 0.2 * darts, (rome, pcdarts, darts)


def saved_bytes(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one training forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    net.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).sum()
    return sum(storages.values())


def test_gradient_accumulation_averages_k_sampled_subnetworks(monkeypatch):
    import pcdarts_core.methods.rome as rome

    searcher = rome_searcher(options={"samples": 3})
    net = searcher.net
    train, val = next(iter(searcher.train_loader)), next(iter(searcher.val_loader))
    arch0 = [p.detach().clone() for p in net.arch_parameters()]
    rng = torch.get_rng_state()
    forwards, updates = [], []
    real_update = rome.update

    def recorded_update(opt, params, grads):  # the real update, its inputs recorded
        updates.append((opt, list(params), [g.clone() for g in grads]))
        real_update(opt, params, grads)

    monkeypatch.setattr(rome, "update", recorded_update)
    hook = net.register_forward_hook(lambda m, i, o: forwards.append(1))
    METHOD.arch_step(searcher, train, val)
    hook.remove()
    assert len(forwards) == 3 and len(updates) == 1 and updates[0][0] is searcher.arch_optimizer
    assert [id(p) for p in updates[0][1]] == [id(p) for p in net.arch_parameters()]
    accumulated = updates[0][2]
    # replay: same RNG stream, same arch values, one gradient per sample
    with torch.no_grad():
        for p, a in zip(net.arch_parameters(), arch0):
            p.copy_(a)
    torch.set_rng_state(rng)
    per_sample = []
    for _ in range(3):
        net.zero_grad(set_to_none=True)
        searcher.loss(val).backward()
        per_sample.append([p.grad.clone() for p in net.arch_parameters()])
    for k, acc in enumerate(accumulated):
        mean = sum(g[k] for g in per_sample) / 3
        assert torch.allclose(acc, mean, atol=1e-6)
        assert not torch.allclose(per_sample[0][k], mean)  # the samples differ, so averaging does something
    # the weight step accumulates as well: K forwards, one optimizer update
    forwards.clear()
    updates.clear()
    hook = net.register_forward_hook(lambda m, i, o: forwards.append(1))
    loss, logits = METHOD.weight_step(searcher, train)
    hook.remove()
    assert len(forwards) == 3 and len(updates) == 1 and updates[0][0] is searcher.weight_optimizer
    assert logits.shape == (8, 10)


def test_eval_mode_runs_the_derived_cell_and_derivation_follows_topology_weights():
    net = rome_searcher().net
    with torch.no_grad():
        net.betas_normal.zero_()
        net.betas_normal[9 + 3] = 5.0  # node 3 prefers inputs 3 and 1 ...
        net.betas_normal[9 + 1] = 4.0
        net.alphas_normal[9 + 3].zero_()
        net.alphas_normal[9 + 3, ROME_PRIMITIVES.index("dil_conv_5x5")] = 3.0
        net.alphas_normal[9 + 0, ROME_PRIMITIVES.index("sep_conv_3x3")] = 50.0  # ... whatever its ops say
    g = METHOD.genotype(net)
    assert g.nodes("normal")[3] == [("dil_conv_5x5", 3), (g.nodes("normal")[3][1][0], 1)]
    net.eval()
    a, b = net.cell_weights()["normal"], net.cell_weights()["normal"]
    assert a.active_edges == b.active_edges and a.active_ops == b.active_ops  # nothing sampled
    assert [e for e in range(9, 14) if a.active_edges[e]] == [10, 12]


def test_rome_search_learns_derives_and_resumes_exactly():
    # one path per edge learns slower than a supernet: C=8 on 16x16 images gives it capacity to show it
    cfg = tiny_config("rome", warmup_epochs=0, epochs=6, lr=0.1, init_channels=8, image_size=16, batch_size=16,
                      synthetic_samples=64)
    assert cfg.options.samples == 2  # the quick synthetic default (the paper's K=7 on real data)
    saved = {}

    def keep(metrics, searcher):
        if metrics["epoch"] == 4:
            saved["state"] = roundtrip(searcher.state_dict())

    full = list(search(cfg, [keep]))
    assert [m["tau"] for m in full] == pytest.approx([10.0 - 9.9 * e / 5 for e in range(6)])
    losses = [m["train_loss"] for m in full]
    assert losses[-1] < losses[0] and sum(losses[-2:]) < sum(losses[:2])
    g = check_genotype(full[-1]["genotype"])
    assert all(op != "none" for op, _ in g.normal + g.reduce)
    assert trace(list(search(cfg, state=saved["state"]))) == trace(full[4:])
