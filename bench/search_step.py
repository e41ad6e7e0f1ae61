"""Images/s and peak memory of one PC-DARTS search step (arch step on a val batch + weight step on a train batch)
for K in {1, 2, 4, 8} and several batch sizes, measured side by side in one run.

Each configuration runs in its own fresh process, so one's allocations cannot hide another's peak:
- CPU: step memory = peak RSS during the first step minus the RSS just before it (model and data resident; the
  optimizers' few state buffers are included, activations dominate);
- GPU: ``torch.cuda.max_memory_allocated`` over the first step minus the allocation before it.
Speed is timed over the ``--steps`` steps that follow.

    .venv/bin/python bench/search_step.py                       # C=16, 8 layers, 32x32 (the paper's supernet)
    .venv/bin/python bench/search_step.py --batches 16 32 --steps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def measure(k: int, batch: int, channels: int, layers: int, size: int, steps: int, device: str) -> dict:
    import torch

    from pcdarts_core.architect import frozen
    from pcdarts_core.supernet import SearchNetwork

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dev = torch.device(device)
    net = SearchNetwork(channels, 10, layers, k=k, edge_norm=k > 1).to(dev)
    w_opt = torch.optim.SGD(net.weight_parameters(), 0.1, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(net.arch_parameters(), 6e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        a_opt.zero_grad(set_to_none=True)
        with frozen(net.weight_parameters()):
            loss_fn(net(x), y).backward()
        a_opt.step()
        w_opt.zero_grad(set_to_none=True)
        with frozen(net.arch_parameters()):
            loss_fn(net(x), y).backward()
        torch.nn.utils.clip_grad_norm_(net.weight_parameters(), 5.0)
        w_opt.step()

    # Memory: the first step, from a clean process (later steps reuse the allocator's pools, hiding the peak).
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # Speed: the following steps.
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"k": k, "batch": batch, "images_per_s": 2 * batch * steps / elapsed, "step_s": elapsed / steps,
            "peak_mib": max(peak, 0) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        k, batch = map(int, args.one.split(","))
        print(json.dumps(measure(k, batch, args.channels, args.layers, args.size, args.steps, args.device)))
        return
    rows = []
    for batch in args.batches:
        for k in args.ks:
            cmd = [sys.executable, __file__, "--one", f"{k},{batch}", "--channels", str(args.channels), "--layers",
                   str(args.layers), "--size", str(args.size), "--steps", str(args.steps), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"K={r['k']} batch={r['batch']}: {r['images_per_s']:.1f} img/s, {r['step_s']:.2f} s/step, "
                  f"{r['peak_mib']:.0f} MiB", flush=True)
    print(f"\nC={args.channels}, {args.layers} layers, {args.size}x{args.size}, device={args.device}, "
          f"{args.steps} measured step(s) after one warm-up; memory relative to K=1 at the same batch")
    print("| batch | K | images/s | s/step | step memory (MiB) | memory / K=1 | speed / K=1 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = next((q for q in rows if q["batch"] == r["batch"] and q["k"] == 1), None)
        mem = r["peak_mib"] / ref["peak_mib"] if ref and ref["peak_mib"] else float("nan")
        spd = r["images_per_s"] / ref["images_per_s"] if ref else float("nan")
        print(f"| {r['batch']} | {r['k']} | {r['images_per_s']:.1f} | {r['step_s']:.2f} | {r['peak_mib']:.0f} "
              f"| {mem:.2f} | {spd:.2f} |")


if __name__ == "__main__":
    main()
