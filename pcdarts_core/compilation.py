"""``torch.compile`` for the search and evaluation networks, without recompiling while a search runs.

``compile: none | default | reduce-overhead | max-autotune`` (the modes of :func:`torch.compile`). Two forms:

- **Whole network** (``whole=True``): one graph for the forward (and its backward), CUDA graphs with
  ``reduce-overhead``. Only for networks whose forward is the same every step: the search methods say so with
  :meth:`~pcdarts_core.methods.base.SearchMethod.static_graph` (PC-DARTS, DARTS, sharpDARTS with fixed channel
  slices). The loops call the returned wrapper; the network itself stays eager, so the second-order update and the
  Hessian (double backward, which compiled graphs do not support) still run on it.
- **Regions** (``whole=False``): every outermost ``nn.Sequential`` (each op's ReLU-conv-BN chain, the stems, the
  auxiliary head) is compiled in place, and what changes from step to step stays eager around them: channel
  sampling, Gumbel/single-path sampling, EnTranNAS's re-derived transit sub-graphs, P-DARTS's per-epoch
  skip-connect dropout, the evaluation network's drop-path rate. A region's inputs are tensors only, so no step
  recompiles it (each distinct region compiles once per kind of step). CUDA graphs need one static graph, so
  ``reduce-overhead`` compiles regions as ``default``. Hundreds of small graphs with eager code between them
  save far less than one whole graph: whether regions pay off on a given GPU is for the benchmark to say.

Guards of whole-network graphs: the arch step (weights frozen), the weight step (arch frozen) and evaluation
(no grad) are three graphs, compiled once each; a ragged last batch marks the batch size dynamic once.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch
from torch import nn

#: the ``compile`` option's values; ``none`` runs eagerly
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")

#: the torch.compile mode of a region for each ``compile`` value (CUDA graphs need one whole static graph)
_REGION_MODES = {"default": "default", "reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def compile_model(net: nn.Module, mode: str, whole: bool, backend: str = "inductor") -> nn.Module:
    """The module the loops call forward on: ``net`` itself (``none``, or ``net`` with compiled regions) or a
    compiled wrapper of the whole of ``net`` that shares its parameters and buffers. ``backend``: torch.compile's
    (``mode`` applies to ``inductor``; ``aot_eager`` captures the same graphs without generating code, which the
    CPU tests use because inductor's C++ build takes minutes there)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    if mode == "none":
        return net
    options = {"mode": mode} if backend == "inductor" else {}
    if whole:
        return torch.compile(net, backend=backend, **options)  # type: ignore[return-value]
    regions = compile_regions(net)
    # All regions share one code object (Module._call_impl), whose compiled graphs dynamo caches together and by
    # default stops at 8, leaving the rest eager: allow each distinct region its graphs (arch step, weight step,
    # no-grad evaluation, a ragged last batch).
    needed = 4 * len({repr(r) for r in regions})
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, needed)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, needed)
    for region in regions:
        region.compile(backend=backend, **({"mode": _REGION_MODES[mode]} if backend == "inductor" else {}))
    return net


def compile_step(step: Callable[..., None], mode: str, backend: str = "inductor") -> Callable[..., None]:
    """``step`` (a whole bilevel step: both forwards and backwards, clipping, both optimizer updates, the
    meter's sums) compiled as one graph (``fullgraph``: a graph break is an error, not a silent split), with
    ``reduce-overhead`` replayed as CUDA graphs. Autograd calls inside are traced
    (``trace_autograd_ops``), so the backward passes are part of the graph; the step's inputs are its batches,
    its state (parameters, optimizer state, the lr tensor, the meter) is read and updated in place."""
    options = {"mode": mode} if backend == "inductor" else {}
    compiled = torch.compile(step, backend=backend, fullgraph=True, **options)

    @functools.wraps(step)
    def run(*args: Any) -> None:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            compiled(*args)

    return run


def compile_regions(net: nn.Module) -> list[nn.Sequential]:
    """The outermost ``nn.Sequential`` modules of ``net`` (none inside another)."""
    regions: list[nn.Sequential] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.Sequential):
                regions.append(child)
            else:
                visit(child)

    visit(net)
    return regions


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eagerly inside (for double backward, e.g. the Hessian's power iteration)."""
    with torch.compiler.set_stance("force_eager"):
        yield
