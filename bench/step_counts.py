"""What one bilevel search step costs a device, in counts that do not depend on the machine (issue 19), side by side
in one run:

1. ATen calls per bilevel step (arch forward + backward + Adam, weight forward + backward + clipping + SGD): the
   official code's step (per-edge mixed ops, ``.backward()``, per-parameter ``clip_grad_norm_``, SGD and Adam),
   the fused supernet with those same per-parameter optimizers, and this project's step (fused supernet,
   ``torch.autograd.grad``, multi-tensor clipping and updates); on a GPU each call is at least one kernel launch;
2. host reads (syncs) per steady-state bilevel step for every method, and per epoch (``DispatchCounts``);
3. graph breaks and compiles of the captured step (``compile``, ``aot_eager`` backend on the CPU): one graph,
   compiled at the first step, not again after a new lr;
4. ``--inductor`` (instead of 1-3): images/s of eager vs ``compile: default`` (inductor, the whole step captured)
   at batch 32 and 64, and the compile time itself.

    .venv/bin/python bench/step_counts.py                 # C=16, 8 cells, 32x32, K=4, batch 32: about 3 minutes
    .venv/bin/python bench/step_counts.py --device cuda   # the same counts on CUDA (bench/gpu_suite.sh runs it)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from search_step import official_step  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from pcdarts_core.config import search_config  # noqa: E402
from pcdarts_core.methods import METHOD_NAMES  # noqa: E402
from pcdarts_core.optimizers import host_resident, set_lr  # noqa: E402
from pcdarts_core.profile import DispatchCounts  # noqa: E402
from pcdarts_core.search import Searcher  # noqa: E402
from pcdarts_core.supernet import SearchNetwork  # noqa: E402


def official_step_calls(execution: str, args: argparse.Namespace, dev: torch.device) -> int:
    """ATen calls of the official code's bilevel step on ``execution``'s supernet (per-parameter optimizers)."""
    torch.manual_seed(0)
    net = SearchNetwork(args.channels, 10, args.layers, k=4, execution=execution).to(dev)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    step = official_step(net, x, y)
    step()  # the optimizers' state exists from here on, as in every later step
    with DispatchCounts() as counts:
        step()
    return counts.aten


def searcher(method: str, args: argparse.Namespace, backend: str = "aot_eager", **overrides) -> Searcher:
    cfg = search_config(method, "synthetic", device=args.device, init_channels=args.channels, layers=args.layers,
                        image_size=args.size, batch_size=args.batch, synthetic_samples=4 * args.batch,
                        warmup_epochs=0, epochs=2, steps_per_epoch=2, eval_steps=1, data_pipeline="device",
                        **({"k": 4} if method == "pcdarts" else {}), **overrides)
    return Searcher(cfg, compile_backend=backend)


def step_counts(s: Searcher) -> DispatchCounts:
    """Counts of the second bilevel step (the first may set up what later steps reuse)."""
    step = s.step_function(arch_on=True)
    batches = [(s.to_device(t), s.to_device(v)) for t, v in zip(s.train_loader, s.val_loader)]
    step(*batches[0])
    with DispatchCounts(host_resident(s.weight_optimizer, s.arch_optimizer)) as counts:
        step(*batches[1])
    return counts


def epoch_reads(s: Searcher) -> int:
    with DispatchCounts(host_resident(s.weight_optimizer, s.arch_optimizer)) as counts:
        s.run_epoch()
    return counts.host_reads


def captured_graphs(args: argparse.Namespace) -> tuple[int, int, int, float]:
    """(graphs after the first step, after 3 more with a new lr between them, graph breaks, first-step seconds)
    of the captured PC-DARTS step on a small supernet (C=4, 3 cells: dynamo's tracing time grows with the graph,
    the graph's structure does not)."""
    small = argparse.Namespace(**{**vars(args), "channels": 4, "layers": 3, "size": 8, "batch": 8})
    s = searcher("pcdarts", small, compile="default")
    step = s.step_function(arch_on=True)
    batches = [(s.to_device(t), s.to_device(v)) for t, v in zip(s.train_loader, s.val_loader)]
    base, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    start = time.perf_counter()
    step(*batches[0])
    first_s = time.perf_counter() - start
    first = counters["stats"]["unique_graphs"] - base
    for i in range(3):
        if i == 1:
            set_lr(s.weight_optimizer, 0.5 * s.config.lr)
        step(*batches[i % len(batches)])
    return first, counters["stats"]["unique_graphs"] - base, sum(counters["graph_break"].values()) - breaks, first_s


def inductor_speed(args: argparse.Namespace, batch: int) -> dict[str, float]:
    out = {}
    for mode in ("none", "default"):
        s = searcher("pcdarts", argparse.Namespace(**{**vars(args), "batch": batch}), backend="inductor",
                     compile=mode)
        step = s.step_function(arch_on=True)
        pairs = [(s.to_device(t), s.to_device(v)) for t, v in zip(s.train_loader, s.val_loader)]
        start = time.perf_counter()
        step(*pairs[0])
        out[f"{mode}_first_s"] = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(args.steps):
            step(*pairs[i % len(pairs)])
        out[f"{mode}_images_per_s"] = batch * args.steps / (time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--inductor", action="store_true", help="time eager vs compile: default (inductor) instead")
    p.add_argument("--steps", type=int, default=5, help="timed steps of --inductor")
    args = p.parse_args()
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    print(f"C={args.channels}, {args.layers} cells, {args.size}x{args.size}, batch {args.batch}, K=4, "
          f"device {args.device}, torch {torch.__version__}\n")

    if args.inductor:
        print("| batch | eager images/s | inductor images/s | ratio | eager first step, s | inductor first step "
              "(compile), s |")
        print("|---:|---:|---:|---:|---:|---:|")
        for batch in (32, 64):
            r = inductor_speed(args, batch)
            print(f"| {batch} | {r['none_images_per_s']:.1f} | {r['default_images_per_s']:.1f} | "
                  f"{r['default_images_per_s'] / r['none_images_per_s']:.2f} | {r['none_first_s']:.1f} | "
                  f"{r['default_first_s']:.0f} |", flush=True)
        return

    ref = official_step_calls("reference", args, dev)
    fused = official_step_calls("fused", args, dev)
    ours = step_counts(searcher("pcdarts", args)).aten
    print("| PC-DARTS bilevel step | ATen calls | / official |")
    print("|---|---:|---:|")
    for name, calls in (("official step (per-edge ops, per-parameter optimizers)", ref),
                        ("fused supernet, per-parameter optimizers", fused),
                        ("fused supernet, multi-tensor clipping and updates (this project)", ours)):
        print(f"| {name} | {calls} | {calls / ref:.3f} |")

    print("\n| method | host reads per bilevel step | per epoch of 2 steps + 1 validation batch | "
          "where a step reads |")
    print("|---|---:|---:|---|")
    cases = [(m, {}) for m in METHOD_NAMES] + [("darts", {"order": "second"}),
                                               ("entrannas", {"options": {"dst": True}})]
    for method, overrides in cases:
        counts = step_counts(searcher(method, args, **overrides))
        label = method + "".join(f", {k}={v}" for k, v in overrides.items())
        sites = ", ".join(sorted(set(counts.read_sites))) or "-"
        print(f"| {label} | {counts.host_reads} | {epoch_reads(searcher(method, args, **overrides))} | {sites} |",
              flush=True)

    first, total, breaks, first_s = captured_graphs(args)
    print("\n| captured PC-DARTS step (aot_eager, C=4, 3 cells) | value |")
    print("|---|---:|")
    print(f"| graphs compiled at the first step | {first} |")
    print(f"| graphs after 3 more steps and a new lr | {total} |")
    print(f"| graph breaks | {breaks} |")
    print(f"| first step (tracing + compiling), s | {first_s:.0f} |")


if __name__ == "__main__":
    main()
