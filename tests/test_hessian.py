"""RobustDARTS's indicator (the largest arch-Hessian eigenvalue in train mode) and DARTS-ES's stopping rule, written
from the official code (automl/RobustDARTS src/search/analyze.py, train_search.py, src/utils.py EVLocalAvg)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from methods_testlib import tiny_config, trace
from torch.func import functional_call

from pcdarts_core import search as search_module
from pcdarts_core.genotypes import parse_genotype
from pcdarts_core.hessian import darts_es_stop_index, dominant_eigenvalue, evaluation_due, largest_eigenvalue
from pcdarts_core.methods import METHOD_NAMES
from pcdarts_core.search import Searcher
from pcdarts_core.supernet import SearchNetwork

torch.set_num_threads(1)


def tiny_problem() -> tuple[types.SimpleNamespace, tuple[torch.Tensor, torch.Tensor]]:
    """2 nodes, 4 ops: 50 arch parameters, few enough to form the Hessian explicitly (in float64)."""
    torch.manual_seed(0)
    net = SearchNetwork(4, 10, 3, k=1, steps=2, multiplier=2,
                        primitives=("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")).double()
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (8,))
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_(0.0, 1.0)  # away from the uniform start, where the curvature is flat and degenerate
        for _ in range(20):  # BatchNorm running statistics of other data, so train and eval mode differ
            net(x + 0.5)
    searcher = types.SimpleNamespace(net=net, criterion=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"))
    return searcher, (x, y)


def explicit_hessian(net: SearchNetwork, batch: tuple[torch.Tensor, torch.Tensor], train: bool) -> torch.Tensor:
    named = net.named_arch_parameters()
    names = list(named)
    sizes = [named[n].numel() for n in names]
    flat0 = torch.cat([named[n].detach().flatten() for n in names])
    buffers = {n: b.clone() for n, b in net.named_buffers()}

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        params = {n: p.view(named[n].shape) for n, p in zip(names, parts)}
        return torch.nn.functional.cross_entropy(functional_call(net, {**params, **buffers}, (batch[0],)), batch[1])

    was = net.training
    net.train(train)
    h = torch.autograd.functional.hessian(loss, flat0)
    net.train(was)
    return h


@pytest.mark.parametrize("spectrum,expected", [((-5.0, 1.0, 2.0), 2.0), ((-1.0, 0.5, 3.0), 3.0),
                                               ((-3.0, -2.0, -1.0), -1.0), ((4.0, 1.0, -0.5), 4.0)])
def test_largest_eigenvalue_is_the_top_of_the_spectrum_not_the_largest_magnitude(spectrum, expected):
    """``max(numpy.linalg.eigvals(H))`` as the official code takes it."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T
    assert max(np.linalg.eigvals(a.numpy()).real) == pytest.approx(expected)
    value = largest_eigenvalue(lambda v: a @ v, torch.ones(3, dtype=torch.float64))
    assert value == pytest.approx(expected, rel=1e-6)


def test_eigenvalue_of_the_train_mode_hessian_with_the_arch_weight_decay_on_the_diagonal():
    """Official ``Analyzer.compute_Hw``: the net in train mode (BatchNorm on batch statistics) and the Hessian of
    L_val with ``arch_weight_decay * a`` added to the gradient, i.e. ``+ wd * I``."""
    searcher, batch = tiny_problem()
    wd = 1e-3
    h = explicit_hessian(searcher.net, batch, train=True) + wd * torch.eye(50, dtype=torch.float64)
    assert torch.allclose(h, h.T, atol=1e-10)
    eig = torch.linalg.eigvalsh(h)
    expected = float(eig.max())
    # on this problem the largest-magnitude eigenvalue is negative: the largest is a different number
    assert float(eig.min()) < -expected < 0
    eval_mode = float(torch.linalg.eigvalsh(explicit_hessian(searcher.net, batch, train=False)).max())
    assert abs(eval_mode - expected) > 0.05 * abs(expected)  # the mode matters on this problem
    buffers = [b.clone() for b in searcher.net.buffers()]
    searcher.net.eval()
    value = dominant_eigenvalue(searcher, batch, weight_decay=wd)  # defaults: 20 Hessian-vector products at most
    assert value == pytest.approx(expected, rel=1e-3)
    # and it leaves the network as it found it: mode and BatchNorm running statistics
    assert not searcher.net.training
    assert all(torch.equal(a, b) for a, b in zip(buffers, searcher.net.buffers()))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_indicator_runs_for_every_method_and_changes_nothing(method):
    overrides = {"layers": 5} if method == "entrannas" else {}
    if method == "pdarts":
        overrides = {"epochs": 3, "warmup_epochs": 0, "options": {"stage_layers": (3, 3, 3)}}
    searcher = Searcher(tiny_config(method, **overrides))
    batch = searcher.to_device(next(iter(searcher.val_loader)))
    rng = torch.get_rng_state()
    buffers = [b.clone() for b in searcher.net.buffers()]
    value = dominant_eigenvalue(searcher, batch, steps=3)
    assert torch.isfinite(torch.tensor(value))
    assert torch.equal(rng, torch.get_rng_state())  # observing the search does not change it
    assert all(torch.equal(a, b) for a, b in zip(buffers, searcher.net.buffers()))


@pytest.mark.parametrize("method", ["pcdarts", "rome", "pdarts"])
def test_tracking_the_eigenvalue_leaves_every_epoch_of_the_search_unchanged(method):
    """The same seed with and without ``hessian_every``: identical losses and genotypes epoch by epoch (an epoch
    without arch steps included, where the batch must be fetched)."""
    base = dict(epochs=2, warmup_epochs=1, steps_per_epoch=2)
    if method == "pdarts":  # two 1-epoch stages, the second entered after an arch epoch
        base.update(warmup_epochs=0, options={"stage_layers": (3, 3, 3)})
    runs = {}
    for every in (0, 1):
        searcher = Searcher(tiny_config(method, hessian_every=every, **base))
        runs[every] = [searcher.run_epoch() for _ in range(2)]
    assert all("hessian_eigenvalue" in m for m in runs[1]) and not any("hessian_eigenvalue" in m for m in runs[0])
    assert trace(runs[1]) == trace(runs[0])


def test_evaluation_epochs_are_the_official_ones():
    """``epoch % report_freq_hessian == 0 or epoch == epochs - 1`` (0-based)."""
    assert [e for e in range(50) if evaluation_due(e, 2, 50)] == list(range(0, 50, 2)) + [49]
    assert [e for e in range(7) if evaluation_due(e, 3, 7)] == [0, 3, 6]
    assert not any(evaluation_due(e, 0, 50) for e in range(50))


class OfficialEVLocalAvg:
    """``EVLocalAvg`` with ``early_stop`` (src/utils.py), transcribed: the reference the rule is tested against."""

    def __init__(self, window: int = 5, ev_freq: int = 2, total_epochs: int = 50):
        self.window, self.ev_freq, self.epochs = window, ev_freq, total_epochs
        self.stop_search, self.stop_epoch, self.stop_genotype = False, total_epochs - 1, None
        self.ev, self.ev_local_avg, self.genotypes, self.la_epochs = [], [], {}, {}
        self.la_start_idx, self.la_end_idx = 0, window

    def update(self, epoch: int, ev: float, genotype: str) -> None:
        self.ev.append(ev)
        self.genotypes[epoch] = genotype
        self.stop_genotype = genotype
        half_up = int(np.ceil(self.window / 2))
        if len(self.ev) >= half_up and epoch < self.epochs - 1:
            if len(self.ev) < self.window:
                self.ev_local_avg.append(np.mean(self.ev))
            else:
                self.ev_local_avg.append(np.mean(self.ev[self.la_start_idx: self.la_end_idx]))
                self.la_start_idx += 1
                self.la_end_idx += 1
            self.la_epochs[epoch] = int(epoch - int(self.ev_freq * np.floor(self.window / 2)))
        elif len(self.ev) < half_up:
            self.la_epochs[epoch] = -1

    def early_stop(self, epoch: int, factor: float = 1.3, es_start_epoch: int = 10, delta: int = 4) -> None:
        if int(self.la_epochs[epoch] - self.ev_freq * delta) >= es_start_epoch:
            current, previous = self.ev_local_avg[-1], self.ev_local_avg[-1 - delta]
            self.stop_search = current / previous > factor
            if self.stop_search:
                self.stop_epoch = int(self.la_epochs[epoch] - self.ev_freq * delta)
                self.stop_genotype = self.genotypes[self.stop_epoch]


def official_stop(values: list[float], freq: int = 2, epochs: int = 50) -> int | None:
    tracker = OfficialEVLocalAvg(ev_freq=freq, total_epochs=epochs)
    for i, ev in enumerate(values):
        epoch = i * freq
        tracker.update(epoch, ev, f"g{epoch}")
        if epoch != epochs - 1:
            tracker.early_stop(epoch)
        if tracker.stop_search:
            return tracker.stop_epoch
    return None


def ours_stop(values: list[float], freq: int = 2) -> int | None:
    epochs = [i * freq for i in range(len(values))]
    for n in range(1, len(values) + 1):
        answer = darts_es_stop_index(epochs[:n], values[:n])
        if answer is not None:
            return epochs[answer]
    return None


def test_darts_es_stops_on_the_hand_made_sequence_and_answers_the_centre_epoch_12_epochs_back():
    # eigenvalue 1.0 after epochs 0, 2, ..., 20 and 3.0 from epoch 22: at epoch 22 the local average of the last 5
    # (epochs 14-22) is 1.4 > 1.3 x the one 4 evaluations earlier (epochs 6-14: 1.0), whose centre is epoch 10
    values = [1.0] * 11 + [3.0] * 10
    assert official_stop(values) == ours_stop(values) == 10
    epochs = [2 * i for i in range(12)]
    assert darts_es_stop_index(epochs, values[:12]) == 5 and epochs[5] == 10
    assert darts_es_stop_index(epochs[:11], values[:11]) is None


def test_darts_es_waits_until_the_earlier_centre_epoch_reaches_10():
    early_jump = [1.0] * 2 + [3.0] * 20  # the jump comes long before the rule may look: it never fires
    assert official_stop(early_jump) is None and ours_stop(early_jump) is None
    # a rise that the rule would have caught earlier is caught at the first epoch it may look (22)
    steady_rise = [1.5 ** i for i in range(25)]
    assert official_stop(steady_rise) == ours_stop(steady_rise) == 10


@pytest.mark.parametrize("seed", range(20))
def test_darts_es_agrees_with_the_official_tracker_on_random_walks(seed):
    rng = np.random.default_rng(seed)
    values = list(np.exp(np.cumsum(rng.normal(0.05, 0.25, size=25))))
    assert ours_stop(values) == official_stop(values)


def test_early_stopped_search_returns_the_genotype_of_the_centre_epoch(monkeypatch):
    """A real search fed the hand-made eigenvalue sequence (the search asks ``dominant_eigenvalue`` after epochs
    0, 2, 4, ...): it stops after epoch 22 (0-based) and answers the architecture of epoch 10."""
    values = iter([1.0] * 11 + [3.0] * 10)
    monkeypatch.setattr(search_module, "dominant_eigenvalue", lambda searcher, batch, **kw: next(values))
    cfg = tiny_config("pcdarts", epochs=30, warmup_epochs=0, steps_per_epoch=1, eval_steps=1, hessian_every=2,
                      early_stop=True, synthetic_samples=16, arch_lr=0.05)
    searcher = Searcher(cfg)
    history = []
    while not searcher.done:
        history.append(searcher.run_epoch())
    assert searcher.stopped_early and len(history) == 23 and history[-1].get("early_stopped")
    tracked = [m["hessian_eigenvalue"] for m in history if "hessian_eigenvalue" in m]
    assert tracked == [1.0] * 11 + [3.0]
    final = searcher.final_genotype()
    assert final == parse_genotype(history[10]["genotype"])  # the genotype after (0-based) epoch 10
    assert history[10]["genotype"] != history[-1]["genotype"]  # the arch moved on meanwhile: the choice matters
