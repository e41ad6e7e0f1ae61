"""A search step the GPU never waits on (issue 19), shown on the CPU by counts that do not depend on the machine:

- the multi-tensor optimizer updates and clipping equal torch's per-parameter SGD, Adam and ``clip_grad_norm_``;
- a step of every method reads nothing back to the host (``DispatchCounts``), save the reads a method's own
  mechanism needs (ROME's sampled path, EnTranNAS's transit sub-graph), which are counted exactly;
- the static methods' whole bilevel step is captured as one graph (``fullgraph``: a graph break would fail),
  is not recompiled by later steps or a new lr, and in float64 equals the eager fused step and the official
  structure's step (``execution: reference``) within 1e-9 relative.

Capture uses the ``aot_eager`` backend (dynamo + AOTAutograd's joint graph, no code generation: inductor's C++ build
takes minutes on these machines); tests/test_gpu.py runs inductor and CUDA graphs on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from methods_testlib import tiny_config
from torch._dynamo.utils import counters

from pcdarts_core.optimizers import clip_, host_resident, make_optimizers, set_lr, update
from pcdarts_core.profile import DispatchCounts
from pcdarts_core.search import Searcher

torch.set_num_threads(1)


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
            for shape in ((4, 3, 3, 3), (7,), (14, 8))]


@pytest.mark.parametrize("captured", [False, True])
def test_multi_tensor_updates_equal_torchs_per_parameter_optimizers(captured):
    cfg = tiny_config("pcdarts", lr=0.05, momentum=0.9, weight_decay=3e-4, arch_lr=6e-4, arch_weight_decay=1e-3)
    mine, ref = _params(0), _params(0)
    sgd, adam = make_optimizers(mine[:2], mine[2:], cfg, captured=captured)
    ref_sgd = torch.optim.SGD(ref[:2], 0.05, momentum=0.9, weight_decay=3e-4, foreach=False)
    ref_adam = torch.optim.Adam(ref[2:], 6e-4, betas=cfg.arch_betas, weight_decay=1e-3, foreach=False)

    def apply(weight_grads: list[torch.Tensor], arch_grads: list[torch.Tensor]) -> None:
        update(sgd, mine[:2], weight_grads)
        update(adam, mine[2:], arch_grads)

    if captured:  # capturable Adam runs on CPU only inside a graph (eagerly torch wants a CUDA device)
        apply = torch.compile(apply, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        if step == 2:  # a new epoch's lr
            set_lr(sgd, 0.02)
            ref_sgd.param_groups[0]["lr"] = 0.02
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in mine]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref[:2], 1.0, foreach=False)
        clipped = [g.clone() for g in grads[:2]]
        assert torch.allclose(clip_(clipped, 1.0), norm, rtol=1e-14)
        apply(clipped, grads[2:])
        ref_sgd.step()
        ref_adam.step()
        for a, b in zip(mine, ref):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-15), (step, (a - b).abs().max())
    assert isinstance(sgd.param_groups[0]["lr"], torch.Tensor) is captured
    assert adam.param_groups[0]["capturable"] is captured and adam.param_groups[0]["foreach"]


def _steady_step_reads(method: str, **overrides) -> tuple[int, int, list[str]]:
    """Host reads of the second bilevel step of a tiny search (the first may initialize what it needs)."""
    searcher = Searcher(tiny_config(method, warmup_epochs=0, **overrides))
    step = searcher.step_function(arch_on=True)
    batches = [(searcher.to_device(t), searcher.to_device(v)) for t, v in zip(searcher.train_loader,
                                                                             searcher.val_loader)]
    step(*batches[0])
    with DispatchCounts(host_resident(searcher.weight_optimizer, searcher.arch_optimizer)) as counts:
        step(*batches[1])
    return counts.host_reads, counts.aten, counts.read_sites


#: host reads in one bilevel step (arch + weight step: two forwards), by method: 0 but where the method's own
#: mechanism decides on the host. ROME: each sampled forward reads its path once per cell type (2 x 2 forwards of
#: K=2 samples); EnTranNAS: each forward derives the transit sub-graph once per transit cell type (here cells 1-2,
#: both reduction cells), with DST twice per cell type (the kept edges, the ops); the tiny net's default engines
#: are all three cells, so it has no transit cell and reads nothing.
STEP_READS = [("pcdarts", {}, 0), ("darts", {}, 0), ("sharpdarts", {}, 0), ("pdarts", {}, 0), ("rome", {}, 8),
              ("entrannas", {}, 0), ("entrannas", {"options": {"engine_cells": "0"}}, 2),
              ("entrannas", {"options": {"engine_cells": "0", "dst": True}}, 8)]


@pytest.mark.parametrize("method,overrides,expected", STEP_READS)
def test_a_step_reads_back_only_what_its_method_decides_on_the_host(method, overrides, expected):
    reads, aten, sites = _steady_step_reads(method, **overrides)
    assert aten > 100  # the counter saw the step
    assert reads == expected, sites


def test_second_order_and_random_channels_steps_read_nothing_back():
    assert _steady_step_reads("darts", order="second")[0] == 0
    assert _steady_step_reads("pcdarts", channel_sampling="random")[0] == 0


def test_an_epoch_reads_its_step_statistics_once():
    """The epoch's steps are summed on the device: however many steps, the reads of an epoch stay the same."""
    reads = {}
    for steps in (1, 2):
        # the device pipeline, as on a GPU (the loader path's per-image CPU work reads CPU tensors, not the device)
        searcher = Searcher(tiny_config("pcdarts", warmup_epochs=0, steps_per_epoch=steps, synthetic_samples=64,
                                        data_pipeline="device"))
        with DispatchCounts(host_resident(searcher.weight_optimizer, searcher.arch_optimizer)) as counts:
            searcher.run_epoch()
        reads[steps] = counts.host_reads
    assert reads[1] == reads[2] and reads[1] > 0


def test_progress_every_reports_the_running_means_and_stops_a_diverged_search_early():
    searcher = Searcher(tiny_config("pcdarts", warmup_epochs=0, synthetic_samples=64, progress_every=1))
    records: list[dict] = []
    searcher.on_progress = records.append
    metrics = searcher.run_epoch()
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["train_loss"] == pytest.approx(metrics["train_loss"], rel=1e-12)
    assert all(r["arch_loss"] is not None and 0 <= r["train_acc"] <= 1 for r in records)


#: (method, search space, backend): every static method and every search space. ``aot_eager`` builds the joint
#: forward-backward graph as inductor would (AOTAutograd); ``eager`` runs dynamo's captured graph as it is, which
#: proves the same capture (one graph, no break, no recompile) in a fraction of the time
#: proves the same capture (one graph, no break, no recompile) in a fraction of the time. S4's `noise` op draws
#: Gaussian noise in every forward: a graph draws it from its own random stream, so only there the two runs differ.
CAPTURED = [("pcdarts", "darts", "aot_eager"), ("darts", "s2", "aot_eager"), ("sharpdarts", "s3", "eager"),
            ("pcdarts", "s1", "eager"), ("darts", "s4", "eager"), ("pcdarts", "nb201", "eager")]


@pytest.mark.slow
@pytest.mark.parametrize("method,space,backend", CAPTURED, ids=[f"{m}-{s}" for m, s, _ in CAPTURED])
def test_the_captured_bilevel_step_is_one_graph_equal_to_the_eager_step(method, space, backend):
    """Three runs of the same seed in float64: the official structure (``execution: reference``, eager), the fused
    supernet eagerly, and the fused supernet's step captured. Their gradients (in the optimizers' first-step
    buffers), losses, parameters, BatchNorm statistics and genotypes agree within 1e-9 relative."""
    same_draws = space != "s4"
    runs = {"reference": Searcher(tiny_config(method, search_space=space, warmup_epochs=0, execution="reference")),
            "eager": Searcher(tiny_config(method, search_space=space, warmup_epochs=0)),
            "captured": Searcher(tiny_config(method, search_space=space, warmup_epochs=0, compile="default"),
                                 compile_backend=backend)}
    assert runs["captured"].captured and not runs["eager"].captured
    for s in runs.values():
        s.set_network(s.net.double())  # float64: the orders of summation agree to ~1e-15
    pairs = [((x.double(), y), (xv.double(), yv)) for (x, y), (xv, yv) in
             zip(runs["eager"].train_loader, runs["eager"].val_loader)]
    graphs0, breaks0 = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / a.norm().clamp_min(1e-300))

    def gradients(s: Searcher) -> dict[str, torch.Tensor]:
        """The first step's gradients (Adam's first moment, SGD's momentum) under the per-edge names."""
        names = {id(p): n for n, p in s.net.named_parameters()}
        out = {}
        for opt in (s.arch_optimizer, s.weight_optimizer):
            for p in opt.param_groups[0]["params"]:
                state = opt.state[p]
                out[names[id(p)]] = state["exp_avg"] if "exp_avg" in state else state["momentum_buffer"]
        # NAS-Bench-201's supernet has one execution (no fused cells), whose names are the per-edge ones
        return s.net.per_edge_layout(out) if hasattr(s.net, "per_edge_layout") else out

    for i in range(3):
        if i == 2:  # a new epoch's lr: a device tensor filled in place, not a new constant of the graph
            for s in runs.values():
                set_lr(s.weight_optimizer, 0.5 * s.config.lr)
        for s in runs.values():
            s.step_function(arch_on=True)(*pairs[i % len(pairs)])
        if i == 0 and same_draws:
            grads = {name: gradients(s) for name, s in runs.items()}
            assert grads["captured"].keys() == grads["reference"].keys()
            for other in ("reference", "eager"):
                for key, g in grads[other].items():
                    assert rel(g, grads["captured"][key]) < 1e-9, (other, key)
        assert counters["stats"]["unique_graphs"] == graphs0 + 1  # compiled once, at the first step
    assert sum(counters["graph_break"].values()) == breaks0
    losses = {name: s.meter.sums.tolist() for name, s in runs.items()}
    if not same_draws:  # other noise, the same step: finite losses of the same size
        assert losses["captured"][0] == pytest.approx(losses["eager"][0], rel=0.2) and losses["captured"][1] >= 0
        return
    states = {name: s.net.state_dict() for name, s in runs.items()}
    for other in ("reference", "eager"):
        assert losses["captured"] == pytest.approx(losses[other], rel=1e-9), other
        for key, value in states[other].items():
            mine = states["captured"][key]
            if value.is_floating_point():
                assert rel(value, mine) < 1e-9, (other, key)
            else:
                assert torch.equal(value, mine), (other, key)
        assert runs[other].method.genotype(runs[other].net) == runs["captured"].method.genotype(runs["captured"].net)


def test_methods_that_cannot_be_captured_whole_compile_their_regions():
    for method, overrides in (("rome", {}), ("entrannas", {}), ("pdarts", {}), ("darts", {"order": "second"}),
                              ("pcdarts", {"channel_sampling": "random"})):
        searcher = Searcher(tiny_config(method, compile="default", **overrides), compile_backend="aot_eager")
        assert not searcher.captured, method
        assert searcher.model is searcher.eval_model  # the forward is compiled (whole or in regions) instead


def test_a_captured_search_resumes_from_an_eager_checkpoint_and_back():
    """``compile`` may change on resume: Adam's step counts move between the CPU (eager) and the device."""
    eager = Searcher(tiny_config("pcdarts", warmup_epochs=0, epochs=2))
    eager.run_epoch()
    state = copy.deepcopy(eager.state_dict())
    captured = Searcher(tiny_config("pcdarts", warmup_epochs=0, epochs=2, compile="default"),
                        compile_backend="aot_eager")
    captured.load_state_dict(state)
    steps = [s["step"] for s in captured.arch_optimizer.state.values()]
    assert all(t.dtype == torch.float64 and float(t) == 2.0 for t in steps)  # one epoch of two steps
    back = Searcher(tiny_config("pcdarts", warmup_epochs=0, epochs=2))
    back.load_state_dict(captured.state_dict())
    assert all(s["step"].dtype == torch.float32 for s in back.arch_optimizer.state.values())
