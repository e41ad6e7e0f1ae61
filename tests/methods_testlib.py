"""Shared pieces of the method tests: a tiny offline search and a loss probe that sees through sampling."""

from __future__ import annotations

import io
from typing import Any

import torch

from pcdarts_core.config import search_config
from pcdarts_core.genotypes import Genotype, parse_genotype
from pcdarts_core.model import NetworkCIFAR
from pcdarts_core.runtime import load_checkpoint
from pcdarts_core.search import Searcher

torch.set_num_threads(1)

#: C=4, 3 cells, 8x8 images, 16 weight + 16 arch images: one epoch is two steps.
TINY: dict[str, Any] = dict(init_channels=4, layers=3, image_size=8, batch_size=8, synthetic_samples=32,
                            eval_steps=1, device="cpu", epochs=3, warmup_epochs=1)


def tiny_config(method: str, **overrides: Any):
    return search_config(method, "synthetic", **{**TINY, **overrides})


def probe_loss(searcher: Searcher, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Training-mode loss on ``batch`` with every RNG draw (Gumbel noise, dropout) fixed, so two probes of the same
    weights agree and a drop between probes is learning, not a luckier sample."""
    was_training = searcher.net.training
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(1234)
        searcher.net.train()
        x, y = searcher.to_device(batch)
        loss = float(searcher.criterion(searcher.net(x), y))
    searcher.net.train(was_training)
    return loss


def search_and_probe(method: str, **overrides: Any) -> tuple[Searcher, list[dict[str, Any]], float, float]:
    """Run a tiny search; return it, its metrics and the probe loss on the first weight batch before and after.

    BatchNorm running statistics are saved and restored around the probe so it does not change the run.
    """
    searcher = Searcher(tiny_config(method, **overrides))
    batch = next(iter(searcher.train_loader))
    before = _probe_without_side_effects(searcher, batch)
    metrics = []
    while not searcher.done:
        metrics.append(searcher.run_epoch())
    after = _probe_without_side_effects(searcher, batch)
    return searcher, metrics, before, after


def _probe_without_side_effects(searcher: Searcher, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    buffers = {n: b.clone() for n, b in searcher.net.named_buffers()}
    loss = probe_loss(searcher, batch)
    with torch.no_grad():
        for n, b in searcher.net.named_buffers():
            b.copy_(buffers[n])
    return loss


def record_op_calls(net: torch.nn.Module) -> list[tuple[int, int, int]]:
    """(cell, mixed-op unit, op index in that unit's list) of every candidate op that runs, in either execution
    (reference: per-edge op modules; fused: the units each batched op runs on)."""
    calls: list[tuple[int, int, int]] = []
    for c, cell in enumerate(net.cells):
        if hasattr(cell, "mixed"):
            for m, mixed in enumerate(cell.mixed):
                for o, op in enumerate(mixed.ops):
                    op.register_forward_hook(lambda mod, i, out, key=(c, m, o): calls.append(key))
            continue
        for group in cell.fused:
            for op in group.values():
                op.register_forward_hook(lambda mod, args, out, c=c: calls.extend(
                    (c, mod.units[i], mod.op_index[i]) for i in range(args[1], args[1] + args[2])))
    return calls


def check_genotype(text: str, num_classes: int = 10) -> Genotype:
    """Parse a genotype's JSON and build and run a tiny evaluation network from it."""
    g = parse_genotype(text)
    assert parse_genotype(str(g)) == g  # the official text form round-trips too
    net = NetworkCIFAR(4, num_classes, 3, False, g)
    net.eval()
    logits, _ = net(torch.randn(2, 3, 8, 8))
    assert logits.shape == (2, num_classes)
    return g


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """Through bytes and the safe loader, as a checkpoint on disk would go."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return load_checkpoint(buf.getvalue())


def trace(metrics: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(m["epoch"], m["train_loss"], m["val_loss"], m["arch_loss"], m["genotype"]) for m in metrics]
