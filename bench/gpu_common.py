"""What the GPU benchmarks share: the paper's CIFAR search on device-resident synthetic data of CIFAR's size, the
bilevel step they time, their command-line options and how they log rows."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: --smoke: a tiny net for seconds on CPU (proves a script works; its figures are not measurements)
SMOKE = dict(images=64, warmup=1, channels=4, layers=3, size=8)


def add_search_args(p: argparse.ArgumentParser, images: int, warmup: int) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for the table (.md) and the rows (.jsonl)")
    p.add_argument("--images", type=int, default=images, help="weight images (as many arch images)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="a tiny net for seconds: proves the script works")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU when there is no CUDA device")


def passthrough(args: argparse.Namespace, *extra: str) -> list[str]:
    """The options a worker process needs, as command-line arguments."""
    return [f"--{k}={getattr(args, k)}" for k in ("images", "warmup", "channels", "layers", "size", *extra)]


def cuda_or_skip(name: str, args: argparse.Namespace) -> bool:
    import torch

    if torch.cuda.is_available() or args.allow_cpu:
        return True
    print(f"{name}: no CUDA device: skipped (--allow-cpu --smoke runs a CPU smoke test)")
    return False


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def build_search(args: argparse.Namespace, batch: int, **overrides: Any) -> Any:
    """PC-DARTS (K=4, first order) on ``2 x args.images`` synthetic images held on the device; bf16 and
    channels-last on CUDA."""
    import torch

    from pcdarts_core.config import search_config
    from pcdarts_core.search import Searcher

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)  # the CPU smoke run: no thread oversubscription on a shared machine
    cfg = search_config("pcdarts", "synthetic", device="cuda" if cuda else "cpu", data_pipeline="device",
                        batch_size=batch, image_size=args.size, init_channels=args.channels, layers=args.layers,
                        k=4, synthetic_samples=(2 * args.images, 10), amp=cuda, channels_last=cuda, epochs=50,
                        warmup_epochs=15, lr=0.1, arch_lr=6e-4, **overrides)
    return Searcher(cfg)


def batch_pairs(searcher: Any) -> Iterator[tuple[Any, Any]]:
    """(weight batch, arch batch) forever, epoch after epoch."""
    from pcdarts_core.data import set_epoch

    epoch = 0
    while True:
        set_epoch(searcher.train_loader, epoch)
        set_epoch(searcher.val_loader, epoch)
        yield from zip(searcher.train_loader, searcher.val_loader)
        epoch += 1


def bilevel_step(searcher: Any, pairs: Iterator[tuple[Any, Any]], arch_on: bool = True) -> None:
    """One PC-DARTS step as the search loop runs it (captured as one graph where ``compile`` captures it): the
    arch on an arch batch, then the weights on a weight batch (``arch_on=False``: the weights only)."""
    train, val = next(pairs)
    searcher.step_function(arch_on)(searcher.to_device(train), searcher.to_device(val))


def log_rows(out: Path, name: str, rows: Iterable[dict], render: Callable[[list[dict]], None]) -> None:
    """Write each row to ``out/name.jsonl`` (and stdout) as it comes and re-render the table after each, so a
    time limit keeps what was measured."""
    out.mkdir(parents=True, exist_ok=True)
    kept: list[dict] = []
    with open(out / f"{name}.jsonl", "w") as log:
        for row in rows:
            kept.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row), flush=True)
            render(kept)


def last_json(stdout: str) -> dict | None:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def last_line(stderr: str) -> str:
    return (stderr.strip().splitlines() or ["no output"])[-1][:200]


def write_table(out: Path, name: str, title: str, smoke: bool, lines: list[str]) -> None:
    note = " (smoke run: tiny net, not a measurement)" if smoke else ""
    table = f"Device: {device_name()}{note}; {title}\n\n" + "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(table)
