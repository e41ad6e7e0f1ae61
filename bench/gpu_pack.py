"""Many searches on one GPU: aggregate search throughput with 1, 2, 4 and 8 searches packed on it as separate
processes (as Ray runs trials with ``resources: {gpu: 1/N}``), each holding its share with
``claim_device_share(1/N)`` (issue 8, sections 2-3; goal: 4 packed >= 2.5x one alone).

Every process builds its search (PC-DARTS, the paper's supernet, device-resident synthetic data of CIFAR's size,
bf16 and channels-last), runs ``--warmup`` bilevel steps, waits at a barrier for all its siblings, then runs
bilevel steps for ``--seconds`` and reports its images/s. Aggregate = the sum over the N processes, which ran
over the same window.

    python bench/gpu_pack.py --out OUTDIR                 # CUDA
    python bench/gpu_pack.py --smoke --allow-cpu --out D  # seconds on CPU: proves the script, not a GPU figure
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_common import (SMOKE, add_search_args, batch_pairs, bilevel_step, build_search, cuda_or_skip, last_json,
                        last_line, log_rows, passthrough, write_table)


def worker(args: argparse.Namespace, n: int, rank: int, barrier: Path) -> dict:
    import torch

    from pcdarts_core.runtime import claim_device_share

    torch.set_num_threads(1)
    share = claim_device_share(1.0 / n) if torch.cuda.is_available() else None
    searcher = build_search(args, args.batch)
    pairs = batch_pairs(searcher)

    def step() -> None:
        bilevel_step(searcher, pairs)
        if searcher.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    (barrier / f"ready-{rank}").touch()
    while len(list(barrier.glob("ready-*"))) < n:  # all siblings built and warmed up
        time.sleep(0.01)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        step()
        steps += 1
    return {"rank": rank, "images_per_s": steps * args.batch / (time.perf_counter() - start), "share": share}


def pack(n: int, args: argparse.Namespace) -> dict:
    """``n`` worker processes at once; their summed images/s, or the first one's error."""
    with tempfile.TemporaryDirectory() as barrier:
        cmd = [sys.executable, __file__, "--out", str(args.out), *passthrough(args, "batch", "seconds")]
        procs = [subprocess.Popen([*cmd, "--worker", str(n), str(r), barrier], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in range(n)]
        results, errors = [], []
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err += f"\nover {args.timeout:g} s"
            row = last_json(out) if proc.returncode == 0 else None
            results.append(row) if row else errors.append(last_line(err))
    if errors:
        return {"n": n, "error": errors[0]}
    return {"n": n, "aggregate_images_per_s": sum(r["images_per_s"] for r in results),
            "per_search_images_per_s": [round(r["images_per_s"], 1) for r in results]}


def table(rows: list[dict]) -> list[str]:
    alone = next((r["aggregate_images_per_s"] for r in rows if r["n"] == 1 and "error" not in r), None)
    lines = ["| searches | aggregate images/s | per search | aggregate / one alone |", "|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['error']} | | |")
            continue
        ratio = f"{r['aggregate_images_per_s'] / alone:.2f}" if alone else "-"
        lines.append(f"| {r['n']} | {r['aggregate_images_per_s']:.0f} | {r['per_search_images_per_s']} | {ratio} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_search_args(p, images=5_000, warmup=5)
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=15.0, help="timed window of every search")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per packing before it counts as failed")
    p.add_argument("--worker", nargs=3, metavar=("N", "RANK", "BARRIER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        vars(args).update(SMOKE, counts=[1, 2], batch=8, seconds=2.0)
    if args.worker:
        n, rank, barrier = int(args.worker[0]), int(args.worker[1]), Path(args.worker[2])
        print(json.dumps(worker(args, n, rank, barrier)), flush=True)
        return 0
    if not cuda_or_skip("gpu_pack", args):
        return 0
    title = f"batch {args.batch}, {args.seconds:g} s timed per search"
    log_rows(args.out, "gpu_pack", (pack(n, args) for n in args.counts),
             lambda rows: write_table(args.out, "gpu_pack", title, args.smoke, table(rows)))
    print((args.out / "gpu_pack.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
