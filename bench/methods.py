"""Step time and memory of every search method on the same supernet, side by side.

One step is what the search loop does per batch: the method's arch step (on a val batch) and its weight step (on a
train batch), through the method's own hooks, so ROME's K sub-networks, EnTranNAS's transit cells and Max-W all
count. Every variant runs in its own fresh process, so no variant's allocations hide another's peak:

- step memory (CPU) = peak RSS during the first step minus the RSS just before it. On CPU torch has no caching
  allocator; large tensors come from and go back to the OS (glibc mmap), so the RSS peak tracks the tensors alive
  at the worst moment of the step (activations kept for backward, gradients, optimizer state created on the first
  step). ``tracemalloc`` does not see tensor memory, and the profiler's per-op memory events do not add up to a
  peak, hence this process-level measure. (GPU: ``torch.cuda.max_memory_allocated`` minus the allocation before.)
- saved activations = bytes of the distinct tensors autograd saves for backward in one training forward (one
  sub-network for ROME, whose K forwards each free theirs before the next). Exact and allocator-free: it is the
  part of the memory that grows with batch and depth, and where the methods differ.
- time: wall and CPU seconds per step, the median over ``--steps`` steps after the first (CPU time is the fairer
  figure on a shared machine; torch runs on one thread).

P-DARTS is measured in each stage (stage 1 is the common supernet; stages 2 and 3 are deeper, with 5 and 3 ops per
edge, entered through the method's own stage change). ROME uses the paper's K=7.

    .venv/bin/python bench/methods.py                        # C=8, 5 cells, 16x16, batch 32, 3 timed steps
    .venv/bin/python bench/methods.py --channels 16 --layers 8 --size 32 --batch 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

#: variant -> (method, option overrides, P-DARTS stage to enter first)
VARIANTS: dict[str, tuple[str, dict[str, Any], int]] = {
    "pcdarts": ("pcdarts", {}, 0),
    "darts": ("darts", {}, 0),
    "pdarts-stage1": ("pdarts", {}, 0),
    "pdarts-stage2": ("pdarts", {}, 1),
    "pdarts-stage3": ("pdarts", {}, 2),
    "sharpdarts": ("sharpdarts", {}, 0),
    "rome": ("rome", {"samples": 7}, 0),
    "entrannas": ("entrannas", {}, 0),
    "entrannas-dst": ("entrannas", {"dst": True}, 0),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def saved_activation_bytes(searcher: Any, batch: Any) -> int:
    """Distinct storages autograd keeps for backward in one training forward (weights included once)."""
    import torch

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.random.fork_rng(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        searcher.loss(batch)
    return sum(storages.values())


def measure(variant: str, channels: int, layers: int, size: int, batch: int, steps: int, device: str) -> dict:
    import torch

    from pcdarts_core.config import search_config
    from pcdarts_core.search import Searcher

    torch.set_num_threads(1)
    method, options, stage = VARIANTS[variant]
    overrides: dict[str, Any] = dict(init_channels=channels, layers=layers, image_size=size, batch_size=batch,
                                     synthetic_samples=4 * batch, device=device, epochs=3, warmup_epochs=0,
                                     options=options)
    if method == "pdarts":
        # the common supernet is stage 1; the later stages grow as in the paper (5 -> 11 -> 17 cells)
        overrides["options"] = {"stage_layers": (layers, layers + 6, layers + 12), "stage_epochs": (1, 1, 1)}
    searcher = Searcher(search_config(method, "synthetic", **overrides))
    searcher.method.on_epoch_start(searcher, stage)
    train = searcher.to_device(next(iter(searcher.train_loader)))
    val = searcher.to_device(next(iter(searcher.val_loader)))
    net = searcher.net

    def step() -> None:
        searcher.method.arch_step(searcher, train, val)
        searcher.method.weight_step(searcher, train)

    cuda = searcher.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    walls, cpus = [], []
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        if cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {"variant": variant, "k": searcher.config.k, "cells": len(net.cells),
            "ops_per_edge": int(net.alphas_normal.shape[1]), "wall_s": statistics.median(walls),
            "cpu_s": statistics.median(cpus), "peak_mib": max(peak, 0) / 2**20,
            "saved_mib": saved_activation_bytes(searcher, train) / 2**20,
            "params_m": sum(p.numel() for p in net.weight_parameters()) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.channels, args.layers, args.size, args.batch, args.steps,
                                 args.device)))
        return
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--one", variant, "--channels", str(args.channels), "--layers",
               str(args.layers), "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
               "--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{variant}: {r['wall_s']:.2f} s/step wall, {r['cpu_s']:.2f} s CPU, {r['peak_mib']:.0f} MiB step, "
              f"{r['saved_mib']:.1f} MiB saved", flush=True)
    ref = next((r for r in rows if r["variant"] == "pcdarts"), rows[0])
    print(f"\nC={args.channels}, {args.layers} cells, {args.size}x{args.size}, batch {args.batch}, "
          f"device={args.device}; median of {args.steps} steps after the first; ratios against {ref['variant']}")
    print("| method | K | cells | ops/edge | weights (M) | s/step wall | s/step CPU | step memory (MiB) "
          "| saved activations (MiB) | memory / ref | CPU time / ref |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mem = r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] else float("nan")
        print(f"| {r['variant']} | {r['k']} | {r['cells']} | {r['ops_per_edge']} | {r['params_m']:.3f} "
              f"| {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_mib']:.0f} | {r['saved_mib']:.1f} | {mem:.2f} "
              f"| {r['cpu_s'] / ref['cpu_s']:.2f} |")


if __name__ == "__main__":
    main()
