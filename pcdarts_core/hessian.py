"""RobustDARTS's indicator (Zela et al., ICLR 2020, Sec. 4): the largest eigenvalue of the Hessian of the
validation loss with respect to the arch parameters, and DARTS-ES's early-stopping rule built on it.

Checked against the official code (automl/RobustDARTS ``src/search/train_search.py``, ``src/search/analyze.py``,
``src/utils.py`` ``EVLocalAvg``, ``src/search/args.py``):

* the Hessian is of L_val on the validation batch of the epoch's last arch step, with the network in *train* mode
  (BatchNorm on batch statistics), plus ``arch_weight_decay`` on the diagonal (``Analyzer._hessian`` adds the
  weight-decay term to the gradient it differentiates); its *largest* eigenvalue (``max(eigvals(H))``, not the
  largest magnitude) is recorded; it is computed after epochs 0, f, 2f, ... (0-based, f = ``hessian_every``) and
  after the last epoch;
* DARTS-ES: local averages of 5 eigenvalues (the first ones over the 3 and 4 available), each attributed to its
  centre evaluation; stop when the newest exceeds 1.3x the one ``delta`` = 4 entries earlier, considered only once
  that earlier centre epoch is >= 10 (``es_start_epoch``) and never after the last epoch; the answer is the
  architecture of that earlier centre epoch (6 evaluations = 12 epochs back at f = 2).

Differences kept: the official code forms the whole Hessian (one backward per arch parameter); here the largest
eigenvalue comes from Lanczos iteration on Hessian-vector products (double backward), so the Hessian is never
formed. The official forward that builds the Hessian also
updates BatchNorm's running statistics and draws from the global RNG; here everything the search uses is restored
(:func:`unobserved`), so tracking the eigenvalue does not change the search it observes. The official ratio test
divides by the earlier average; here a non-positive earlier average never stops the search.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from .architect import frozen

if TYPE_CHECKING:
    from .architect import StepContext


@contextmanager
def unobserved(ctx: "StepContext") -> Iterator[None]:
    """Leave the search as it was: the global CPU/CUDA RNGs, the channel-sampling generator, BatchNorm's running
    statistics (every buffer) and the train/eval mode."""
    net = ctx.net
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    channel_state = net.channel_generator.get_state()
    buffers = [b.detach().clone() for b in net.buffers()]
    was_training = net.training
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            net.train(was_training)
            net.channel_generator.set_state(channel_state)
            with torch.no_grad():
                for b, saved in zip(net.buffers(), buffers):
                    b.copy_(saved)


def largest_eigenvalue(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int = 20,
                       tol: float = 1e-4) -> float:
    """The largest (algebraic) eigenvalue of the symmetric operator ``matvec`` on flat vectors: Lanczos with full
    reorthogonalization from ``start``, stopped after ``steps`` products or when the top Ritz value changes by less
    than ``tol`` (relative). Unlike power iteration it needs no spectral gap and ignores large negative eigenvalues."""
    basis = [start / start.norm()]
    diagonal: list[float] = []
    off: list[float] = []
    value = float("nan")
    for _ in range(min(steps, start.numel())):
        w = matvec(basis[-1]).detach()
        diagonal.append(float(w @ basis[-1]))
        for _twice in range(2):  # Gram-Schmidt twice against the whole basis
            for q in basis:
                w = w - (w @ q) * q
        tri = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
        if off:
            sub = torch.tensor(off, dtype=torch.float64)
            tri = tri + torch.diag(sub, 1) + torch.diag(sub, -1)
        new_value = float(torch.linalg.eigvalsh(tri).max())
        converged = abs(new_value - value) <= tol * max(abs(new_value), 1e-12)
        value = new_value
        norm = float(w.norm())
        if converged or norm <= 1e-12 * max(abs(value), 1.0):  # converged, or an invariant subspace is exhausted
            break
        off.append(norm)
        basis.append(w / norm)
    return value


def dominant_eigenvalue(ctx: "StepContext", batch: tuple[torch.Tensor, torch.Tensor], steps: int = 20,
                        tol: float = 1e-4, seed: int = 0, weight_decay: float = 0.0) -> float:
    """Largest eigenvalue of d^2 [L_val + weight_decay/2 |a|^2] / d a^2 on ``batch``, the net in train mode.

    At most ``steps`` Hessian-vector products (double backward through one forward); the start vector comes from
    ``seed``. Nothing the search uses changes (:func:`unobserved`).
    """
    net = ctx.net
    params = net.arch_parameters()
    sizes = [p.numel() for p in params]
    with unobserved(ctx), frozen(net.weight_parameters()):
        net.train()
        x, y = batch
        loss = ctx.criterion(net(x).float(), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            parts = [u.view_as(p) for u, p in zip(torch.split(v, sizes), params)]
            hv = torch.autograd.grad(grads, params, grad_outputs=parts, retain_graph=True)
            return torch.cat([h.reshape(-1) for h in hv]) + weight_decay * v

        gen = torch.Generator().manual_seed(seed)
        start = torch.randn(sum(sizes), generator=gen, dtype=params[0].dtype).to(params[0].device)
        return largest_eigenvalue(matvec, start, steps, tol)


def evaluation_due(epoch: int, every: int, epochs: int) -> bool:
    """Whether the eigenvalue is computed after 0-based ``epoch``: every ``every`` epochs from the first, and after
    the last (official: ``epoch % report_freq_hessian == 0 or epoch == epochs - 1``)."""
    return every > 0 and (epoch % every == 0 or epoch == epochs - 1)


def darts_es_stop_index(epochs: Sequence[int], eigenvalues: Sequence[float], window: int = 5, delta: int = 4,
                        factor: float = 1.3, start_epoch: int = 10) -> int | None:
    """DARTS-ES (``EVLocalAvg.early_stop``) after the newest of the evaluations at 0-based ``epochs``: the index of
    the evaluation whose architecture the search returns if it stops now, else None.

    The newest local average is the mean of the last ``window`` eigenvalues (fewer at the start), centred
    ``window // 2`` evaluations back; it is compared with the one ``delta`` evaluations earlier, whose centre
    evaluation is the answer, once that centre's epoch is >= ``start_epoch``.
    """
    if window < 1 or delta < 1 or len(epochs) != len(eigenvalues):
        raise ValueError(f"need window, delta >= 1 and one epoch per eigenvalue, got {window}, {delta}, "
                         f"{len(epochs)} epochs for {len(eigenvalues)} eigenvalues")
    n = len(eigenvalues)
    centre = n - 1 - window // 2 - delta
    if centre < 0 or epochs[centre] < start_epoch:
        return None

    def local_average(end: int) -> float:  # the window ending just before index ``end``
        values = eigenvalues[max(0, end - window): end]
        return sum(values) / len(values)

    now, earlier = local_average(n), local_average(n - delta)
    return centre if earlier > 0 and now > factor * earlier else None


def eigen_record(history: Sequence[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(0-based epochs, eigenvalues) of a search's ``eigen_history`` (whose ``epoch`` counts finished epochs)."""
    return [int(h["epoch"]) - 1 for h in history], [float(h["eigenvalue"]) for h in history]
