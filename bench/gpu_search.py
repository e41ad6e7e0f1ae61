"""One GPU, one search: reference vs fused vs compiled execution side by side, and the 50-epoch PC-DARTS CIFAR-10
search time extrapolated from a timed stretch (issue 8, section 3).

Each (variant, batch) runs in its own fresh process (so one's allocations and compiled graphs cannot help
another) through the real ``Searcher`` on synthetic data of CIFAR's size (32 px, 10 classes; ``--images``
weight + arch images, 25k + 25k by default) held on the device (``data_pipeline: device``), PC-DARTS with K=4,
C=16, 8 cells, bf16 autocast and channels-last. A bilevel step is an arch step on an arch batch plus a weight
step on a weight batch. ``--warmup`` steps (compilation, cuDNN autotuning, CUDA graph recording) are not timed,
then ``--steps`` are. Columns: images/s (weight-batch images per second of bilevel steps), ms per bilevel step,
ms per weight-only step, ms per no-grad validation batch, peak CUDA memory.

50-epoch estimate (PC-DARTS: 15 weights-only epochs, then 35 bilevel ones; every epoch validates on the arch
half): with steps/epoch = floor(images / batch),
``time = steps/epoch x (15 x weight step + 35 x bilevel step + 50 x validation batch)``.

    python bench/gpu_search.py --out OUTDIR                # CUDA: the full table (a few minutes)
    python bench/gpu_search.py --smoke --allow-cpu --out D  # seconds on CPU: proves the script, not a GPU figure
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from gpu_common import (SMOKE, add_search_args, batch_pairs, bilevel_step, build_search, cuda_or_skip, device_name,
                        last_json, last_line, log_rows, passthrough, write_table)

#: (name, config overrides); "execution" is the fused supernet's option (issue 8, section 1)
VARIANTS: dict[str, dict] = {
    "default": {},  # the config's own execution (the smoke run uses it: it exists on every branch)
    "reference": {"execution": "reference"},
    "fused": {"execution": "fused"},
    "fused+compile": {"execution": "fused", "compile": "default"},
    "fused+captured": {"execution": "fused", "compile": "reduce-overhead"},  # the whole step as CUDA graphs
}
SEARCH_EPOCHS, FROZEN_EPOCHS = 50, 15


def measure(variant: str, batch: int, args: argparse.Namespace) -> dict:
    import torch

    from pcdarts_core.runtime import autocast

    try:
        searcher = build_search(args, batch, **VARIANTS[variant])
    except ValueError as err:  # e.g. a branch without the 'execution' option
        return {"variant": variant, "batch": batch, "error": str(err)}
    cuda = searcher.device.type == "cuda"
    pairs = batch_pairs(searcher)

    def timed(fn) -> float:
        for _ in range(args.warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    def weight_only() -> None:
        bilevel_step(searcher, pairs, arch_on=False)

    def validate() -> None:
        with torch.no_grad(), autocast(searcher.device, searcher.config.amp):
            searcher.eval_model(searcher.to_device(next(pairs)[1])[0])

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_bilevel = timed(lambda: bilevel_step(searcher, pairs))
    t_weight = timed(weight_only)
    searcher.net.eval()
    t_val = timed(validate)
    searcher.net.train()
    steps_per_epoch = args.images // batch
    estimate = steps_per_epoch * ((SEARCH_EPOCHS - FROZEN_EPOCHS) * t_bilevel + FROZEN_EPOCHS * t_weight
                                  + SEARCH_EPOCHS * t_val)
    return {"variant": variant, "batch": batch, "device": device_name(), "images_per_s": batch / t_bilevel,
            "ms_bilevel": 1e3 * t_bilevel, "ms_weight": 1e3 * t_weight, "ms_val": 1e3 * t_val,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "search_50_epochs_min": estimate / 60}


def run(variant: str, batch: int, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh process, under ``--timeout``."""
    cmd = [sys.executable, __file__, "--out", str(args.out), "--one", variant, str(batch),
           *passthrough(args, "steps")]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "batch": batch, "error": f"over {args.timeout:g} s"}
    return last_json(done.stdout) or {"variant": variant, "batch": batch, "error": last_line(done.stderr)}


def table(rows: list[dict]) -> list[str]:
    ref = {r["batch"]: r for r in rows if r["variant"] == "reference" and "error" not in r}
    lines = ["| variant | batch | images/s | ms/bilevel step | ms/weight step | ms/val batch | peak MiB | "
             "speed / reference | 50-epoch search (min) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['error']} | | | | | | |")
            continue
        base = ref.get(r["batch"])
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}" if base else "-"
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['images_per_s']:.0f} | {r['ms_bilevel']:.1f} | "
                     f"{r['ms_weight']:.1f} | {r['ms_val']:.1f} | {peak} | {ratio} | "
                     f"{r['search_50_epochs_min']:.1f} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_search_args(p, images=25_000, warmup=3)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--compiled-batches", type=int, nargs="+", default=[64, 256],
                   help="batches the compiled variants run at (each compiles afresh)")
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "default"], choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per measurement process")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        vars(args).update(SMOKE, steps=1, batches=[8], compiled_batches=[], variants=["default", "reference", "fused"])
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args)), flush=True)
        return 0
    if not cuda_or_skip("gpu_search", args):
        return 0
    jobs = [(v, b) for v in args.variants for b in (args.compiled_batches if "+" in v else args.batches)]
    title = f"{args.images} + {args.images} images, {args.steps} timed steps"
    log_rows(args.out, "gpu_search", (run(v, b, args) for v, b in jobs),
             lambda rows: write_table(args.out, "gpu_search", title, args.smoke, table(rows)))
    print((args.out / "gpu_search.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
