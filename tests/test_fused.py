"""Fused execution is the reference (per-edge, official-code) supernet computed differently: same parameters,
same loss, same gradients, same running statistics, same genotype, and checkpoints that load both ways."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pcdarts_core import ops
from pcdarts_core.config import search_config
from pcdarts_core.methods import get_method
from pcdarts_core.methods.pdarts import prune_ops
from pcdarts_core.supernet import FusedCell, SearchCell, SearchNetwork

torch.set_num_threads(1)

NET = dict(init_channels=8, layers=3, image_size=8, batch_size=4, synthetic_samples=16, device="cpu", epochs=3,
           warmup_epochs=1)
RTOL = 1e-5

#: (method, config overrides): every method and supernet option the fused cell has to serve
CASES = {
    "pcdarts": ("pcdarts", {}),
    "pcdarts-random-channels": ("pcdarts", {"channel_sampling": "random"}),
    "pcdarts-k1-edge-norm": ("pcdarts", {"k": 1}),
    "pcdarts-k2-no-edge-norm": ("pcdarts", {"k": 2, "edge_norm": False}),
    "darts": ("darts", {}),
    "sharpdarts-maxw": ("sharpdarts", {}),
    "sharpdarts-sharp-ops": ("sharpdarts", {"options": {"primitives": "sharp"}}),
    "rome": ("rome", {}),
    "entrannas": ("entrannas", {"layers": 5}),
    "entrannas-random-channels": ("entrannas", {"layers": 5, "k": 2, "channel_sampling": "random"}),
    "entrannas-dst": ("entrannas", {"layers": 5, "options": {"dst": True, "threshold_init": 0.5}}),
    "pdarts-stage0": ("pdarts", {"epochs": 6, "options": {"stage_layers": (3, 4, 5), "stage_epochs": (2, 2, 2)}}),
}


def build(method: str, execution: str, **overrides) -> SearchNetwork:
    cfg = search_config(method, "synthetic", **{**NET, **overrides, "execution": execution})
    torch.manual_seed(cfg.seed)
    return get_method(method).build_network(cfg, 10)


def pair(method: str, **overrides) -> tuple[SearchNetwork, SearchNetwork]:
    return build(method, "reference", **overrides), build(method, "fused", **overrides)


def randomize_arch(ref: SearchNetwork, fused: SearchNetwork, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (name, p), (name_f, q) in zip(ref.named_arch_parameters().items(), fused.named_arch_parameters().items()):
            assert name == name_f
            p.copy_(torch.randn(p.shape, generator=gen))
            q.copy_(p)


def step(net: SearchNetwork, x: torch.Tensor, y: torch.Tensor, seed: int = 7) -> dict:
    """One training forward + backward with the global RNG fixed (Gumbel draws, dropout)."""
    net.train()
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    arch = {n: p.grad.clone() for n, p in net.named_arch_parameters().items() if p.grad is not None}
    arch_ids = {id(p) for p in net.arch_parameters()}
    weight_grads = {n: p.grad for n, p in net.named_parameters() if id(p) not in arch_ids and p.grad is not None}
    return {"loss": loss.detach(), "arch": arch, "weights": net.per_edge_layout(weight_grads)}


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, scale: float | None = None) -> None:
    """Relative difference ||got - want|| / ||want|| <= RTOL; with ``scale`` (a group of tensors, e.g. all weight
    gradients): max error <= RTOL * scale, the largest magnitude in the group."""
    if scale is None:
        err, size = float(torch.linalg.vector_norm(got - want)), float(torch.linalg.vector_norm(want))
        assert err <= RTOL * size + 1e-12, f"{what}: relative difference {err / max(size, 1e-30):.3g}"
        return
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= RTOL * max(scale, 1e-12) + 1e-12, f"{what}: max error {err:.3g} at scale {scale:.3g}"


def assert_same_step(ref: SearchNetwork, fused: SearchNetwork, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (4,), generator=gen)
    r, f = step(ref, x, y), step(fused, x, y)
    assert_close(f["loss"], r["loss"], "loss")
    assert r["arch"].keys() == f["arch"].keys() and r["arch"]
    for name in r["arch"]:
        assert_close(f["arch"][name], r["arch"][name], f"arch grad {name}")
    # weight gradients relative to the largest one (a tensor of tiny gradients holds cancellation noise); an op
    # that did not run has no gradient in the reference and a zero slice of the batched op's gradient in fused
    assert r["weights"].keys() <= f["weights"].keys()
    scale = max(float(g.abs().max()) for g in r["weights"].values())
    for name, got in f["weights"].items():
        want = r["weights"].get(name, torch.zeros_like(got))
        assert_close(got, want, f"weight grad {name}", scale)
    # running statistics after the step
    rs, fs = ref.state_dict(), fused.state_dict()
    for name in rs:
        if rs[name].dim():
            assert_close(fs[name], rs[name], f"state {name}", max(1.0, float(rs[name].abs().max())))


@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_reference(case):
    method, overrides = CASES[case]
    ref, fused = pair(method, **overrides)
    assert all(isinstance(c, FusedCell) for c in fused.cells) and all(isinstance(c, SearchCell) for c in ref.cells)
    # the same parameters: same count, same initial values under the same keys
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(ref) == count(fused)
    assert sum(p.numel() for p in ref.weight_parameters()) == sum(p.numel() for p in fused.weight_parameters())
    rs, fs = ref.state_dict(), fused.state_dict()
    assert rs.keys() == fs.keys()
    assert all(torch.equal(rs[k], fs[k]) for k in rs)
    randomize_arch(ref, fused)
    assert_same_step(ref, fused)
    assert_same_step(ref, fused, seed=1)  # a second step: other samples, updated running statistics
    method_obj = get_method(method)
    assert method_obj.genotype(fused) == method_obj.genotype(ref)


@pytest.mark.parametrize("case", ["pcdarts", "darts", "entrannas"])
def test_checkpoints_load_both_ways(case):
    method, overrides = CASES[case]
    ref, fused = pair(method, **overrides)
    randomize_arch(ref, fused)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():  # different weights and statistics in each, so a load has something to change
        ref.train()(x)
        for p in ref.weight_parameters():
            p.add_(0.01 * torch.randn_like(p))
    for source, target_execution in ((ref, "fused"), (fused, "reference")):
        target = build(method, target_execution, **{**overrides, "seed": 5})
        target.load_state_dict(source.state_dict())  # strict
        source.eval(), target.eval()
        with torch.no_grad():
            assert_close(target(x), source(x), f"eval logits after loading into {target_execution}")
        st, ss = target.state_dict(), source.state_dict()
        assert st.keys() == ss.keys() and all(torch.equal(st[k], ss[k]) for k in st)
    with pytest.raises(RuntimeError, match="Missing key"):
        fused.load_state_dict({k: v for k, v in ref.state_dict().items() if ".mixed.3." not in k})


def test_pdarts_pruned_per_edge_op_lists_and_skip_dropout():
    """Stages 2 and 3 of P-DARTS: different op lists per edge, `none` dropped; dropout after identity skips
    draws the same masks as the reference's F.dropout."""
    method = get_method("pdarts")
    overrides = CASES["pdarts-stage0"][1]
    ref0, fused0 = pair("pdarts", **overrides)
    randomize_arch(ref0, fused0, seed=3)
    for stage, keep, drop_none in ((1, 5, False), (2, 3, True)):
        primitives = prune_ops(ref0, keep, drop_none)
        assert len({tuple(p) for p in primitives["normal"]}) > 1  # really per-edge lists
        nets = []
        for execution in ("reference", "fused"):
            cfg = search_config("pdarts", "synthetic", **{**NET, **overrides, "execution": execution})
            torch.manual_seed(0)
            nets.append(method.build_network(cfg, 10, stage, primitives))
        ref, fused = nets
        assert fused.state_dict().keys() == ref.state_dict().keys()
        randomize_arch(ref, fused, seed=stage)
        for net in nets:
            net.set_skip_dropout(0.5)
        assert_same_step(ref, fused)
        assert method.genotype(fused) == method.genotype(ref)
    # the dropout really acts (training mode) and only in training
    fused.train()
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    a = fused(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, fused(x))
    fused.eval()
    assert torch.equal(fused(x), fused(x))


def test_per_edge_two_op_spaces_and_unbatchable_ops(monkeypatch):
    """Search spaces with a different pair of ops on each edge (RobustDARTS S1-S4 style), including an op the
    fused cell cannot batch (it falls back to running that op edge by edge)."""

    class Gate(nn.Module):  # not made of batchable layers: runs per edge
        def __init__(self, c: int, stride: int):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 1, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(c, affine=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x) * torch.sigmoid(x[:, :, :: self.conv.stride[0], :: self.conv.stride[0]]))

    monkeypatch.setitem(ops.OPS, "gate", lambda c, stride, affine: Gate(c, stride))
    names = [n for n in ops.PRIMITIVES] + ["gate"]
    rng = random.Random(0)
    primitives = {t: [tuple(rng.sample(names, 2)) for _ in range(14)] for t in ("normal", "reduce")}
    for k, sampling in ((1, "fixed"), (2, "fixed"), (2, "random")):
        nets = []
        for execution in ("reference", "fused"):
            torch.manual_seed(0)
            nets.append(SearchNetwork(8, 10, 3, k=k, primitives=primitives, channel_sampling=sampling,
                                      execution=execution, seed=2))
        ref, fused = nets
        assert any(op.per_unit is not None for c in fused.cells for g in c.fused for op in g.values())
        assert fused.state_dict().keys() == ref.state_dict().keys()
        randomize_arch(ref, fused)
        assert_same_step(ref, fused)
        assert fused.genotype() == ref.genotype()


def test_fused_makes_far_fewer_aten_calls():
    """Machine-independent cost: operator calls of one forward + backward (bench/search_step.py measures the
    paper's supernet; here a small one)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for execution in ("reference", "fused"):
        torch.manual_seed(0)
        net = SearchNetwork(8, 10, 3, k=4, execution=execution)
        x = torch.randn(2, 3, 8, 8)
        Count.calls = 0
        with Count():
            F.cross_entropy(net(x), torch.zeros(2, dtype=torch.long)).backward()
        counts[execution] = Count.calls
    assert counts["fused"] < 0.35 * counts["reference"], counts


def test_execution_is_validated():
    with pytest.raises(ValueError, match="execution must be one of"):
        SearchNetwork(8, 10, 3, execution="fast")
    with pytest.raises(ValueError, match="execution must be one of"):
        search_config("pcdarts", "synthetic", execution="fast")
    assert search_config("pcdarts", "synthetic").execution == "fused"


def test_bf16_autocast_and_channels_last_stay_close_to_reference():
    x, y = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (4,))
    losses = {}
    for execution in ("reference", "fused"):
        torch.manual_seed(0)
        net = SearchNetwork(8, 10, 3, k=4, execution=execution).to(memory_format=torch.channels_last)
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(net(x).float(), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in net.arch_parameters())
        losses[execution] = float(loss.detach())
    assert losses["fused"] == pytest.approx(losses["reference"], rel=1e-2)
