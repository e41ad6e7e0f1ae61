"""Many searches on one GPU: aggregate search throughput with 1, 2, 4 and 8 searches packed on it as separate
processes (as Ray runs trials with ``resources: {gpu: 1/N}``), each holding its share with
``claim_device_share(1/N)`` (issue 8, sections 2-3; goal: 4 packed >= 2.5x one alone).

Every process builds its search (PC-DARTS, the paper's supernet, device-resident synthetic data of CIFAR's size),
runs ``--warmup`` bilevel steps, waits at a barrier for all its siblings, then runs bilevel steps for ``--seconds``
and reports its images/s. Aggregate = the sum over the N processes (they ran over the same window).

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


def worker(args: argparse.Namespace) -> dict:
    import torch

    from pcdarts_core.config import search_config
    from pcdarts_core.runtime import claim_device_share
    from pcdarts_core.search import Searcher

    cuda = torch.cuda.is_available()
    torch.set_num_threads(1)
    share = claim_device_share(1.0 / args.n) if cuda else None
    cfg = search_config("pcdarts", "synthetic", device="cuda" if cuda else "cpu", data_pipeline="device",
                        batch_size=args.batch, image_size=args.size, init_channels=args.channels,
                        layers=args.layers, k=4, synthetic_samples=(2 * args.images, 10), amp=cuda,
                        channels_last=cuda, epochs=50, warmup_epochs=15, lr=0.1, arch_lr=6e-4)
    searcher = Searcher(cfg)
    method = searcher.method

    def batches():
        while True:
            yield from zip(searcher.train_loader, searcher.val_loader)

    stream = batches()

    def step() -> None:
        train, val = next(stream)
        method.arch_step(searcher, train, val)
        method.weight_step(searcher, train)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    ready = Path(args.barrier) / f"ready-{args.rank}"
    ready.touch()
    while len(list(Path(args.barrier).glob("ready-*"))) < args.n:  # all siblings warmed up
        time.sleep(0.01)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        step()
        steps += 1
        if cuda:
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"rank": args.rank, "n": args.n, "steps": steps, "images_per_s": steps * args.batch / elapsed,
            "share": share}


def pack(n: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as barrier:
        common = [f"--{k}={getattr(args, k)}" for k in ("batch", "images", "warmup", "seconds", "channels",
                                                         "layers", "size")]
        procs = [subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--worker", str(n), str(r),
                                   barrier, *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(n)]
        results, errors = [], []
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err += f"\nover {args.timeout:g} s"
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if proc.returncode == 0 and lines:
                results.append(json.loads(lines[-1]))
            else:
                errors.append((err.strip().splitlines() or ["no output"])[-1][:200])
    if errors:
        return {"n": n, "error": errors[0]}
    return {"n": n, "aggregate_images_per_s": sum(r["images_per_s"] for r in results),
            "per_search_images_per_s": [round(r["images_per_s"], 1) for r in results]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_pack.md and gpu_pack.jsonl")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=5_000, help="weight images per search (as many arch images)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seconds", type=float, default=15.0, help="timed window of every search")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per packing before it counts as failed")
    p.add_argument("--smoke", action="store_true", help="a tiny net for seconds: proves the script works")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU when there is no CUDA device")
    p.add_argument("--worker", nargs=3, metavar=("N", "RANK", "BARRIER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.counts, args.batch, args.images, args.warmup, args.seconds = [1, 2], 8, 64, 1, 2.0
        args.channels, args.layers, args.size = 4, 3, 8
    if args.worker:
        args.n, args.rank, args.barrier = int(args.worker[0]), int(args.worker[1]), args.worker[2]
        print(json.dumps(worker(args)), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_pack: no CUDA device: skipped (--allow-cpu --smoke runs a CPU smoke test)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(args.out / "gpu_pack.jsonl", "w") as log:
        for n in args.counts:
            row = pack(n, args)
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row), flush=True)
    alone = next((r["aggregate_images_per_s"] for r in rows if r["n"] == 1 and "error" not in r), None)
    lines = ["| searches | aggregate images/s | per search | aggregate / one alone |", "|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['error']} | | |")
        else:
            ratio = f"{r['aggregate_images_per_s'] / alone:.2f}" if alone else "-"
            lines.append(f"| {r['n']} | {r['aggregate_images_per_s']:.0f} | {r['per_search_images_per_s']} | "
                         f"{ratio} |")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    note = " (smoke run: tiny net, not a measurement)" if args.smoke else ""
    table = (f"Device: {device}{note}; batch {args.batch}, {args.seconds:g} s timed per search\n\n"
             + "\n".join(lines) + "\n")
    (args.out / "gpu_pack.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
