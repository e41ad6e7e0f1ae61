"""Search throughput on 1 vs N data-parallel Ray Train workers (gloo on CPUs, NCCL with --gpu), side by side.

    .venv/bin/python bench/scaling.py                          # 1 and 2 CPU workers, synthetic data
    .venv/bin/python bench/scaling.py --channels 8 --batch 64 --steps 8 --epochs 4   # a tinier, overhead-bound net
    .venv/bin/python bench/scaling.py --workers 1,2,4,8 --gpu --batch 256 --layers 8 --image-size 32

Every configuration runs the same search (same global batch, so each of N workers takes batch/N) through
``orchestrator.distributed.run_distributed``, the code path of ``python -m orchestrator.search distributed``. The
throughput is the core's: training images per second over all ranks, bilevel steps included (one arch step on a
validation batch + one weight step per training batch), validation excluded; the first epoch (warm-up) is dropped
and the median of the rest is reported. Scaling efficiency = throughput(N) / (N x throughput(1)). "Images per
CPU-second" divides the images an epoch trained by the CPU time all ranks spent on it (training and validation,
``cpu_time_s``): on a machine shared with other jobs wall-clock speed-ups mostly measure the neighbours, while
this ratio shows what data parallelism itself costs (duplicated work, all-reduce, synchronisation).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402

from orchestrator.distributed import DistributedOptions, run_distributed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="bilevel steps per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per configuration (the first is dropped)")
    args = ap.parse_args()
    counts = [int(n) for n in args.workers.split(",")]

    import ray

    ray.init(num_cpus=None if args.gpu else max(counts) * int(max(1, args.cpus_per_worker)),
             include_dashboard=False, log_to_driver=False)
    values = {"method": "pcdarts", "dataset": "synthetic", "seed": 0, "epochs": args.epochs, "warmup_epochs": 0,
              "batch_size": args.batch, "init_channels": args.channels, "layers": args.layers,
              "image_size": args.image_size, "synthetic_samples": max(2000, 4 * args.batch * args.steps),
              "steps_per_epoch": args.steps, "eval_steps": 1, "device": "cuda" if args.gpu else "cpu"}
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for n in counts:
            opts = DistributedOptions.from_mapping({"num_workers": n, "use_gpu": args.gpu,
                                                    "cpus_per_worker": args.cpus_per_worker, "max_failures": 0})
            start = time.perf_counter()
            result = run_distributed(values, opts, storage, f"scaling-{n}", echo=None)
            wall = time.perf_counter() - start
            epochs = sorted(pq.read_table(f"{result.root}/epochs.parquet").to_pylist(), key=lambda r: r["epoch"])
            later = epochs[1:] or epochs
            images = [r["throughput"] * r["step_time_s"] * r["steps"] for r in later]  # = trained images
            rows.append({"n": n, "throughput": statistics.median(r["throughput"] for r in later),
                         "step_ms": 1000 * statistics.median(r["step_time_s"] for r in later),
                         "per_cpu_s": statistics.median(i / r["cpu_time_s"] for i, r in zip(images, later)),
                         "per_rank_batch": args.batch // n, "wall": wall})
    ray.shutdown()

    base = rows[0]["throughput"] * (1 if rows[0]["n"] == 1 else 1 / rows[0]["n"])
    print(f"global batch {args.batch}, C={args.channels}, {args.layers} layers, {args.image_size}px synthetic, "
          f"{args.steps} bilevel steps/epoch, median of epochs 2-{args.epochs}, "
          f"{'GPU' if args.gpu else f'{args.cpus_per_worker:g} CPU'} per worker")
    print("| workers | batch/worker | images/s | ms per bilevel step | speed-up | efficiency | "
          "images per CPU-second | run wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speedup = r["throughput"] / base
        print(f"| {r['n']} | {r['per_rank_batch']} | {r['throughput']:.1f} | {r['step_ms']:.0f} | "
              f"{speedup:.2f}x | {speedup / r['n']:.0%} | {r['per_cpu_s']:.1f} | {r['wall']:.0f} |")


if __name__ == "__main__":
    main()
