"""Images/s, ms per bilevel step, peak memory and ATen calls of one PC-DARTS search step (arch step on a val
batch + weight step on a train batch), measured side by side in one run: reference vs fused execution (issue 8),
for any K, batch sizes and torch thread counts.

Each configuration runs in its own fresh process, so one's allocations cannot hide another's peak:
- CPU: step memory = peak RSS during the first step minus the RSS just before it (model and data resident; the
  optimizers' few state buffers are included, activations dominate);
- GPU: ``torch.cuda.max_memory_allocated`` over the first step minus the allocation before it.
Speed is timed over the ``--steps`` steps that follow the first (warm-up excluded), in wall time and in the
process's CPU time (steadier on a shared machine). ATen calls: the operator
calls of one forward + backward of the training loss, counted with a ``TorchDispatchMode`` (exact and
noise-free; on a GPU each is at least one kernel launch).

    .venv/bin/python bench/search_step.py                       # C=16, 8 layers, 32x32, K=4, batch 32 and 64
    .venv/bin/python bench/search_step.py --threads 1 2 --steps 2
    .venv/bin/python bench/search_step.py --executions reference --ks 1 2 4 8 --batches 16 32   # the K sweep
    .venv/bin/python bench/search_step.py --device cuda --batches 64 256 --steps 20
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


def count_aten_calls(net, x, y) -> int:
    """ATen operator calls of one forward + backward of the cross-entropy loss."""
    import torch

    from pcdarts_core.profile import DispatchCounts

    net.zero_grad(set_to_none=True)
    with DispatchCounts() as counts:
        torch.nn.functional.cross_entropy(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    return counts.aten


def official_step(net, x, y):
    """The official code's bilevel step on ``net`` and one batch: Adam on the arch (weights frozen), then SGD on the
    weights (arch frozen) with ``clip_grad_norm_``, all per parameter (``foreach=False``), through ``.backward()``."""
    import torch

    from pcdarts_core.architect import frozen

    w_opt = torch.optim.SGD(net.weight_parameters(), 0.1, momentum=0.9, weight_decay=3e-4, foreach=False)
    a_opt = torch.optim.Adam(net.arch_parameters(), 6e-4, betas=(0.5, 0.999), weight_decay=1e-3, foreach=False)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        a_opt.zero_grad(set_to_none=True)
        with frozen(net.weight_parameters()):
            loss_fn(net(x), y).backward()
        a_opt.step()
        w_opt.zero_grad(set_to_none=True)
        with frozen(net.arch_parameters()):
            loss_fn(net(x), y).backward()
        torch.nn.utils.clip_grad_norm_(net.weight_parameters(), 5.0, foreach=False)
        w_opt.step()

    return step


def measure(execution: str, k: int, batch: int, threads: int, channels: int, layers: int, size: int, steps: int,
            device: str) -> dict:
    import torch

    from pcdarts_core.supernet import SearchNetwork

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    net = SearchNetwork(channels, 10, layers, k=k, edge_norm=k > 1, execution=execution).to(dev)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    step = official_step(net, x, y)

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
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    calls = count_aten_calls(net, x, y)
    return {"execution": execution, "k": k, "batch": batch, "threads": threads,
            "images_per_s": 2 * batch * steps / elapsed, "step_ms": 1000 * elapsed / steps,
            "cpu_step_ms": 1000 * cpu / steps,
            "peak_mib": max(peak, 0) / 2**20, "aten_calls": calls}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--executions", nargs="+", default=["reference", "fused"], choices=["reference", "fused"])
    p.add_argument("--ks", type=int, nargs="+", default=[4])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        execution, k, batch, threads = args.one.split(",")
        print(json.dumps(measure(execution, int(k), int(batch), int(threads), args.channels, args.layers, args.size,
                                 args.steps, args.device)))
        return
    rows = []
    for threads in args.threads:
        for batch in args.batches:
            for k in args.ks:
                for execution in args.executions:
                    cmd = [sys.executable, __file__, "--one", f"{execution},{k},{batch},{threads}", "--channels",
                           str(args.channels), "--layers", str(args.layers), "--size", str(args.size), "--steps",
                           str(args.steps), "--device", args.device]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode:
                        print(f"{execution} K={k} batch={batch} threads={threads}: failed "
                              f"({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})",
                              flush=True)
                        continue
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    rows.append(r)
                    print(f"{execution} K={k} batch={batch} threads={threads}: {r['images_per_s']:.1f} img/s, "
                          f"{r['step_ms']:.0f} ms/step ({r['cpu_step_ms']:.0f} CPU ms), {r['peak_mib']:.0f} MiB, "
                          f"{r['aten_calls']} ATen calls",
                          flush=True)
    print(f"\nC={args.channels}, {args.layers} layers, {args.size}x{args.size}, device={args.device}, "
          f"{args.steps} measured step(s) after one warm-up; ratios against the reference execution of the same "
          f"threads/batch/K")
    print("| threads | batch | K | execution | images/s | ms/step | CPU ms/step | step memory (MiB) "
          "| ATen calls (fwd+bwd) | speed / ref | CPU time / ref | memory / ref | calls / ref |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = next((q for q in rows if q["execution"] == "reference" and
                    (q["threads"], q["batch"], q["k"]) == (r["threads"], r["batch"], r["k"])), None)

        def ratio(key: str) -> str:
            return f"{r[key] / ref[key]:.2f}" if ref and ref[key] else "-"

        print(f"| {r['threads']} | {r['batch']} | {r['k']} | {r['execution']} | {r['images_per_s']:.1f} "
              f"| {r['step_ms']:.0f} | {r['cpu_step_ms']:.0f} | {r['peak_mib']:.0f} | {r['aten_calls']} "
              f"| {ratio('images_per_s')} | {ratio('cpu_step_ms')} | {ratio('peak_mib')} | {ratio('aten_calls')} |")


if __name__ == "__main__":
    main()
