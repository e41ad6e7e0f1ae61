"""What the search and evaluation loops share: devices, RNG capture, safe checkpoints, data-parallel sums."""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device (use device: cpu or auto)")
    return torch.device(name)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, in a form ``torch.load(weights_only=True)`` accepts (no numpy objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (corrupted, truncated, not ours): reported in one line."""


class SearchDiverged(ValueError):
    """A search (or an evaluation) whose loss stopped being finite; the run cannot recover from it."""


def check_finite_loss(value: float, epoch: int, what: str, step: int | None = None) -> None:
    """Raise :class:`SearchDiverged` ("diverged at epoch E (loss nan): ...") unless ``value`` is finite.

    ``epoch`` is 1-based, ``what`` names the loss (train, arch, val, test), ``step`` the 1-based step of the epoch.
    """
    if not math.isfinite(value):
        at = f" of step {step}" if step is not None else ""
        raise SearchDiverged(f"diverged at epoch {epoch} (loss {value}): the {what} loss{at} is not finite; "
                             f"lower the learning rates")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write atomically (temp file + rename) so an interrupted save never leaves a half checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(source: str | os.PathLike | bytes, name: str | None = None) -> dict[str, Any]:
    """``torch.load(..., weights_only=True)``: tensors and plain containers only, never arbitrary objects.

    ``source`` is a file or its bytes (read from object storage); ``name`` is what error messages call it (the
    file's path or URI; default: the path), so that a truncated or corrupted checkpoint is named.
    """
    where = name or ("checkpoint bytes" if isinstance(source, bytes) else str(source))
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise CheckpointError(f"checkpoint {where} does not exist")
    try:
        fh = io.BytesIO(source) if isinstance(source, bytes) else source
        state = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read means the same thing to the user
        text = str(err).strip()
        reason = text.splitlines()[0].split(". ")[0][:160] if text else type(err).__name__
        raise CheckpointError(f"checkpoint {where} is truncated, corrupted or not a checkpoint of this project "
                              f"({reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {where} does not hold a state dict")
    return state


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> int:
    """Number of correct top-1 predictions."""
    return int((logits.argmax(dim=1) == target).sum())


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    """bf16 autocast on CUDA when AMP is on (no loss scaling needed); a no-op on CPU."""
    if enabled and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` in place over the data-parallel group, in one flat bucket (no-op alone)."""
    if not tensors or distributed_world()[1] == 1:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
        offset += n


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum plain numbers over the data-parallel group (counts, loss sums); identity alone."""
    if distributed_world()[1] == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def ranks_identical(net: torch.nn.Module, arch: Sequence[torch.Tensor]) -> bool:
    """True when every rank's fingerprint (the arch parameters in full, then sum and sum of squares of every
    parameter and floating buffer) equals rank 0's bit for bit (trivially True alone)."""
    if distributed_world()[1] == 1:
        return True
    tensors = list(net.parameters()) + [b for b in net.buffers() if b.dtype.is_floating_point]
    device = tensors[0].device if tensors else torch.device("cpu")
    mine = torch.cat([p.detach().reshape(-1).double().to(device) for p in arch] +
                     [torch.stack([t.detach().double().sum(), t.detach().double().square().sum()]) for t in tensors]
                     + [torch.zeros(1, device=device)])
    gathered = [torch.empty_like(mine) for _ in range(distributed_world()[1])]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def claim_device_share(gpu: float, device: torch.device | None = None) -> float | None:
    """Keep a process that holds ``gpu`` of one GPU (a trial with ``resources: {gpu: 0.25}``) inside its share of
    that GPU's memory: the caching allocator may take at most that fraction, so a search too big for its share
    fails with CUDA's out-of-memory error instead of starving the searches packed beside it. Returns the fraction
    set, or None where there is nothing to share (no CUDA, or whole GPUs). Threads are the trial's CPU share
    (``torch.set_num_threads``); each process has its own CUDA context and streams, and the GPU time-slices
    between processes (NVIDIA MPS, where the cluster runs it, lets their kernels overlap)."""
    if not gpu >= 0:  # also NaN
        raise ValueError(f"a GPU share must be a number >= 0, got {gpu}")
    if not 0 < gpu < 1 or not torch.cuda.is_available():
        return None
    device = device or torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_per_process_memory_fraction(gpu, device)
    return gpu
