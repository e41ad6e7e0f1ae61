"""One GPU, one search: reference vs fused vs compiled execution side by side, and the 50-epoch PC-DARTS CIFAR-10
search time extrapolated from a timed stretch (issue 8, section 3).

Each (variant, batch) runs in its own fresh process (so one's allocations and compiled graphs cannot help
another) through the real ``Searcher`` on synthetic data of CIFAR's size (32 px, 10 classes; ``--images``
weight + arch images, 25k + 25k by default) held on the device (``data_pipeline: device``). A bilevel step is an
arch step on an arch batch plus a weight step on a weight batch (PC-DARTS, first order, K=4, C=16, 8 cells);
``--warmup`` steps (compilation, cuDNN autotuning, CUDA graph recording) are not timed, then ``--steps`` are.
Columns: images/s (weight-batch images per second of bilevel steps), ms per bilevel step, ms per weight-only step,
ms per no-grad validation batch, peak CUDA memory.

50-epoch estimate (PC-DARTS: 15 weights-only epochs, then 35 bilevel ones; every epoch validates on the arch
half): steps/epoch = floor(images / batch), and
``time = steps/epoch x (15 x weight step + 35 x bilevel step + 50 x validation batch)``, data on the device.

    python bench/gpu_search.py --out OUTDIR                # CUDA: the full table (a few minutes)
    python bench/gpu_search.py --smoke --allow-cpu --out D  # seconds on CPU: proves the script, not a GPU figure
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: (name, config overrides); "execution" is the fused supernet's option (issue 8, section 1)
VARIANTS: dict[str, dict] = {
    "reference": {"execution": "reference"},
    "fused": {"execution": "fused"},
    "fused+compile": {"execution": "fused", "compile": "default"},
    "fused+cudagraphs": {"execution": "fused", "compile": "reduce-overhead"},
}
SEARCH_EPOCHS, FROZEN_EPOCHS = 50, 15


def measure(variant: str, batch: int, args: argparse.Namespace) -> dict:
    import torch

    from pcdarts_core.config import search_config
    from pcdarts_core.runtime import autocast
    from pcdarts_core.search import Searcher

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    overrides = dict(VARIANTS[variant])
    try:
        cfg = search_config("pcdarts", "synthetic", device=dev, data_pipeline="device", batch_size=batch,
                            image_size=args.size, init_channels=args.channels, layers=args.layers, k=4,
                            synthetic_samples=(2 * args.images, 10), amp=cuda, channels_last=cuda,
                            epochs=SEARCH_EPOCHS, warmup_epochs=FROZEN_EPOCHS, lr=0.1, arch_lr=6e-4,
                            **overrides)
    except ValueError as err:  # e.g. no 'execution' option on this branch
        return {"variant": variant, "batch": batch, "error": str(err)}
    searcher = Searcher(cfg)
    method, train_iter, val_iter = searcher.method, iter(searcher.train_loader), iter(searcher.val_loader)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, n: int) -> float:
        for _ in range(args.warmup):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - start) / n

    def bilevel() -> None:
        train, val = next(train_iter), next(val_iter)
        method.arch_step(searcher, train, val)
        method.weight_step(searcher, train)

    def weight_only() -> None:
        method.weight_step(searcher, next(train_iter))

    def validate() -> None:
        with torch.no_grad(), autocast(searcher.device, cfg.amp):
            searcher.model(searcher.to_device(next(val_iter))[0])

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_bilevel = timed(bilevel, args.steps)
    t_weight = timed(weight_only, args.steps)
    searcher.net.eval()
    t_val = timed(validate, args.steps)
    searcher.net.train()
    steps_per_epoch = args.images // batch
    estimate = steps_per_epoch * ((SEARCH_EPOCHS - FROZEN_EPOCHS) * t_bilevel + FROZEN_EPOCHS * t_weight
                                  + SEARCH_EPOCHS * t_val)
    return {"variant": variant, "batch": batch, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "images_per_s": batch / t_bilevel, "ms_bilevel": 1e3 * t_bilevel, "ms_weight": 1e3 * t_weight,
            "ms_val": 1e3 * t_val, "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "search_50_epochs_min": estimate / 60}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_search.md and gpu_search.jsonl")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 256])
    p.add_argument("--compiled-batches", type=int, nargs="+", default=[256],
                   help="batches the compiled variants run at (each compiles afresh)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--images", type=int, default=25_000, help="weight images (as many arch images)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per measurement process")
    p.add_argument("--smoke", action="store_true", help="a tiny net for seconds: proves the script works")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU when there is no CUDA device")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.images, args.steps, args.warmup, args.channels, args.layers, args.size = 64, 1, 1, 4, 3, 8
        args.batches, args.compiled_batches, args.variants = [8], [], ["reference", "fused"]
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args)), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_search: no CUDA device: skipped (--allow-cpu --smoke runs a CPU smoke test)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    jobs = [(v, b) for v in args.variants for b in (args.compiled_batches if "+" in v else args.batches)]
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("images", "steps", "warmup", "channels", "layers", "size")]
    with open(args.out / "gpu_search.jsonl", "w") as log:
        for variant, batch in jobs:
            cmd = [sys.executable, __file__, "--out", str(args.out), "--one", variant, str(batch), *passthrough]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
                row = json.loads(lines[-1]) if lines else {
                    "variant": variant, "batch": batch,
                    "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
            except subprocess.TimeoutExpired:
                row = {"variant": variant, "batch": batch, "error": f"over {args.timeout:g} s"}
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row), flush=True)
    table = render(rows, smoke=args.smoke)
    (args.out / "gpu_search.md").write_text(table)
    print(table)
    return 0


def render(rows: list[dict], smoke: bool) -> str:
    ref = {r["batch"]: r for r in rows if r["variant"] == "reference" and "error" not in r}
    head = ("| variant | batch | images/s | ms/bilevel step | ms/weight step | ms/val batch | peak MiB | "
            "speed / reference | 50-epoch search (min) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
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
    device = next((r["device"] for r in rows if "device" in r), "?")
    note = " (smoke run: tiny net, not a measurement)" if smoke else ""
    return f"Device: {device}{note}\n\n{head}" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
