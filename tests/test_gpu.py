"""The GPU checks (issue 8, section 4): skipped where torch sees no CUDA device; ``bench/gpu_suite.sh`` runs them.

- every method searches a few steps on CUDA with bf16 autocast, channels-last, compile and the device pipeline;
- a compiled search gives the eager search's losses (float32, TF32 tolerance);
- a steady bilevel step, eager and captured as CUDA graphs, never syncs (CUDA's sync debug mode raises);
- fused execution equals the reference on CUDA within bf16/TF32 tolerance;
- the device pipeline on CUDA makes the CPU pipeline's batches (same seeds, same shapes, same numbers);
- a trial's GPU share caps its CUDA memory;
- a 1-worker Ray Train search on the NCCL backend.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from methods_testlib import TINY, tiny_config

from pcdarts_core.data import search_data
from pcdarts_core.device_data import DeviceDataset, DeviceLoader
from pcdarts_core.genotypes import parse_genotype
from pcdarts_core.methods import METHOD_NAMES
from pcdarts_core.search import Searcher

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")]

CUDA = dict(device="cuda", data_pipeline="device")
#: what a method's tiny search needs besides methods_testlib.TINY (as in its own tests)
METHOD_OVERRIDES = {"pdarts": {"epochs": 6, "options": {"stage_layers": (3, 3, 3), "stage_epochs": (2, 2, 2)}},
                    "entrannas": {"layers": 5}}


def _losses(searcher: Searcher, epochs: int) -> list[float]:
    out = []
    for _ in range(epochs):
        m = searcher.run_epoch()
        out += [m["train_loss"], m["val_loss"]] + ([m["arch_loss"]] if m["arch_loss"] is not None else [])
    return out


def test_compiled_search_gives_the_eager_losses_on_cuda():
    runs = {}
    for mode in ("none", "default", "reduce-overhead"):
        runs[mode] = _losses(Searcher(tiny_config("pcdarts", **CUDA, compile=mode, steps_per_epoch=2,
                                                  epochs=2, warmup_epochs=0)), 2)
    for mode in ("default", "reduce-overhead"):
        assert runs[mode] == pytest.approx(runs["none"], rel=2e-3), mode


@pytest.mark.parametrize("method,compile_mode", [("pcdarts", "none"), ("pcdarts", "reduce-overhead"),
                                                 ("darts", "none"), ("sharpdarts", "none"), ("pdarts", "none")])
def test_a_cuda_step_never_waits_for_the_host(method, compile_mode):
    """CUDA's own sync check (``set_sync_debug_mode('error')`` raises on any synchronizing call) over a steady
    bilevel step: eager, and captured whole as CUDA graphs."""
    searcher = Searcher(tiny_config(method, **CUDA, **METHOD_OVERRIDES.get(method, {}), warmup_epochs=0,
                                    compile=compile_mode))
    step = searcher.step_function(arch_on=True)
    batches = list(zip(searcher.train_loader, searcher.val_loader))
    for train, val in batches[:1] * 3:  # warm-up: compilation and CUDA graph recording may sync
        step(train, val)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(*batches[-1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(searcher.meter.read()[0][0])


@pytest.mark.parametrize("amp, rel", [(False, 2e-3), (True, 5e-2)])
def test_fused_equals_reference_on_cuda(amp, rel):
    """The same weights in both executions: the loss and the arch gradients agree within TF32 (float32) or
    bf16 (amp) tolerance."""
    nets = {}
    for execution in ("reference", "fused"):
        searcher = Searcher(tiny_config("pcdarts", **CUDA, amp=amp, execution=execution))
        nets[execution] = searcher
    ref, fused = nets["reference"], nets["fused"]
    fused.net.load_state_dict(ref.net.state_dict())
    batch = next(iter(ref.val_loader))
    results = {}
    for name, s in nets.items():
        s.net.zero_grad(set_to_none=True)
        loss = s.loss(batch)
        loss.backward()
        results[name] = (float(loss), [p.grad.detach().float().clone() for p in s.net.arch_parameters()])
    assert results["fused"][0] == pytest.approx(results["reference"][0], rel=rel)
    for g_fused, g_ref in zip(results["fused"][1], results["reference"][1]):
        scale = g_ref.abs().max().clamp_min(1e-12)
        assert float((g_fused - g_ref).abs().max() / scale) <= 10 * rel


def test_device_pipeline_on_cuda_matches_the_cpu_pipeline():
    weight = search_data("synthetic", synthetic_samples=64, image_size=16).weight_set
    for world_size, rank in ((1, 0), (2, 1)):
        kw = dict(seed=5, epoch=3, rank=rank, world_size=world_size, drop_last=True, stream=1)
        cpu = list(DeviceLoader(DeviceDataset(weight, "cpu"), 8, **kw))
        gpu = list(DeviceLoader(DeviceDataset(weight, "cuda"), 8, **kw))
        assert len(cpu) == len(gpu) > 0
        for (cx, cy), (gx, gy) in zip(cpu, gpu):
            assert gx.is_cuda and gx.shape == cx.shape and gx.dtype == cx.dtype == torch.float32
            assert torch.equal(gy.cpu(), cy)
            assert torch.allclose(gx.cpu(), cx, atol=1e-6)


def test_a_gpu_share_caps_the_processs_cuda_memory():
    """In a fresh process (the cap is per process): a quarter share allocates a fifth of the GPU, not a third."""
    code = textwrap.dedent("""
        import torch
        from pcdarts_core.runtime import claim_device_share
        assert claim_device_share(0.25) == 0.25
        total = torch.cuda.get_device_properties(0).total_memory
        a = torch.empty(int(total * 0.20), dtype=torch.uint8, device="cuda")
        try:
            b = torch.empty(int(total * 0.10), dtype=torch.uint8, device="cuda")
        except torch.OutOfMemoryError:
            print("capped")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "capped"


@pytest.mark.ray
def test_one_worker_ray_train_search_on_nccl(ray_cluster, tmp_path):
    import ray

    from orchestrator.distributed import DistributedOptions, run_distributed

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray cluster sees no GPU")
    values = {"method": "pcdarts", "dataset": "synthetic", **TINY, "device": "auto", "seed": 0,
              "steps_per_epoch": 2, "epochs": 2}
    result = run_distributed(values, DistributedOptions(num_workers=1, use_gpu=True), str(tmp_path), "nccl",
                             echo=None)
    assert result.epochs_done == 2
    parse_genotype(result.genotype.to_json())


# Last: the slowest (every method compiles its graphs or regions).
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_each_method_searches_on_cuda_with_amp_channels_last_and_compile(method):
    cfg = tiny_config(method, **CUDA, amp=True, channels_last=True, compile="default", steps_per_epoch=2,
                      **METHOD_OVERRIDES.get(method, {}))
    searcher = Searcher(cfg)
    assert searcher.device.type == "cuda" and searcher.train_loader.data.images.is_cuda
    losses = _losses(searcher, cfg.epochs)
    assert all(math.isfinite(v) for v in losses), losses
    parse_genotype(searcher.final_genotype().to_json())
    assert next(searcher.net.parameters()).is_cuda
