"""RobustDARTS's indicator (Zela et al., ICLR 2020, Sec. 4): the dominant eigenvalue of the Hessian of the
validation loss with respect to the arch parameters, and DARTS-ES's early-stopping rule built on it.

The eigenvalue comes from power iteration with Hessian-vector products (double backward), so the Hessian is
never formed. It runs in eval mode on one batch and leaves every RNG as it found it, so tracking it does not
change the search it observes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .architect import frozen

if TYPE_CHECKING:
    from .search import Searcher


def dominant_eigenvalue(searcher: "Searcher", batch: tuple[torch.Tensor, torch.Tensor], iters: int = 20,
                        tol: float = 1e-3, seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of d^2 L_val / d a^2 by power iteration (``iters`` HVPs at most)."""
    net = searcher.net
    params = net.arch_parameters()
    was_training = net.training
    channel_state = net.channel_generator.get_state()
    devices = [searcher.device] if searcher.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), frozen(net.weight_parameters()):
        net.eval()
        try:
            x, y = batch
            loss = searcher.criterion(net(x).float(), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            gen = torch.Generator().manual_seed(seed)
            v = [torch.randn(p.shape, generator=gen).to(p.device) for p in params]
            v = _normalize(v)
            value = 0.0
            for _ in range(iters):
                hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
                new_value = float(sum((h * u).sum() for h, u in zip(hv, v)))
                v = _normalize([h.detach() for h in hv])
                if abs(new_value - value) <= tol * max(abs(new_value), 1e-12):
                    value = new_value
                    break
                value = new_value
        finally:
            net.train(was_training)
            net.channel_generator.set_state(channel_state)
    return value


def _normalize(vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(sum((t * t).sum() for t in vs)).clamp_min(1e-12)
    return [t / norm for t in vs]


def darts_es_should_stop(eigenvalues: Sequence[float], window: int = 5, lookback: int = 4,
                         factor: float = 1.3) -> bool:
    """DARTS-ES (Zela et al., Sec. 5.1): stop when the ``window``-average of the eigenvalue has grown by more
    than ``factor`` over the last ``lookback`` evaluations.

    Only full windows count: an "average" of the first one or two values is a single noisy eigenvalue, and
    comparing against it stopped searches on noise before the rule had the evidence it asks for.
    """
    if window < 1 or lookback < 1:
        raise ValueError(f"window and lookback must be >= 1, got {window}, {lookback}")
    if len(eigenvalues) < window + lookback:
        return False

    def average(end: int) -> float:  # mean of the ``window`` values ending at index ``end`` (inclusive)
        return sum(eigenvalues[end - window + 1: end + 1]) / window

    now, earlier = average(len(eigenvalues) - 1), average(len(eigenvalues) - 1 - lookback)
    return earlier > 0 and now > factor * earlier
