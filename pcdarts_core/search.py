"""The search loop as a library: ``search(config, callbacks)`` yields one metrics dict per epoch.

A :class:`Searcher` holds everything a search needs to continue: model, both optimizers, the epoch, the method's
own state and every RNG. ``state_dict()`` at an epoch boundary and ``load_state_dict()`` into a fresh Searcher
give exactly the run that was never interrupted (same seed on CPU: same losses, same genotype). The lr is a pure
function of the epoch, so there is no scheduler state to lose.

Data parallelism is plain ``torch.distributed``: when a process group is up, gradients of both levels and the
epoch's metrics are averaged across ranks, BatchNorm statistics are averaged before validation, and every rank
draws the same channel subsets, so all ranks keep identical weights and arch parameters.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import data as data_lib
from .compilation import compile_model, compile_step, eager
from .config import SearchConfig
from .device_data import make_batches
from .genotypes import Genotype, parse_genotype
from .hessian import darts_es_stop_index, dominant_eigenvalue, eigen_record, evaluation_due, unobserved
from .methods import get_method
from .optimizers import load_state, make_optimizers, set_lr
from .runtime import (CheckpointError, all_reduce_mean_, all_reduce_sum, autocast, check_finite_loss,
                      distributed_world, rng_state, resolve_device, seed_all, set_rng_state)
from .spaces import get_space
from .supernet import SearchNetwork

Callback = Callable[[dict[str, Any], "Searcher"], None]
Batch = tuple[torch.Tensor, torch.Tensor]

#: config fields that may differ between a run and its resumption (where it runs, not what it computes)
RESUMABLE_DIFFERENCES = {"device", "num_workers", "data_dir", "epochs", "amp", "channels_last", "nb201_benchmark",
                         "compile", "progress_every"}


def incompatible_settings(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Config keys whose values differ (compared as JSON) and that a resumed run may not change."""
    saved, now = (json.loads(json.dumps(dict(c), default=str)) for c in (saved, now))
    return sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_DIFFERENCES and saved.get(k) != now.get(k))


class StepMeter:
    """An epoch's step statistics, summed on the device so that no step reads a value back to the host: the
    training loss (times the batch size), correct predictions, the arch loss, and the step and value of the
    first non-finite training and arch loss. :meth:`read` is the one host read (once per epoch, or every
    ``progress_every`` steps). The tensors are allocated once and reset in place, so a captured step that
    updates them sees the same tensors every epoch."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # train loss x n, correct, arch loss
        self.first_bad = torch.zeros(4, dtype=torch.float64, device=device)  # (step, loss) train, (step, loss) arch
        self.step = torch.zeros((), dtype=torch.float64, device=device)  # 0-based index of the step running
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.first_bad.zero_()
        self.first_bad[0::2] = -1.0
        self.step.zero_()

    def _note(self, i: int, loss: torch.Tensor) -> None:
        new = (self.first_bad[i] < 0) & ~torch.isfinite(loss)
        self.first_bad[i] = torch.where(new, self.step, self.first_bad[i])
        self.first_bad[i + 1] = torch.where(new, loss.double(), self.first_bad[i + 1])

    def add_arch(self, loss: torch.Tensor) -> None:
        self.sums[2] += loss.double()
        self._note(2, loss)

    def add_train(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        """The weight step's loss and predictions; ends the step."""
        self.sums[0] += loss.double() * target.shape[0]
        self.sums[1] += (logits.argmax(dim=1) == target).sum()
        self._note(0, loss)
        self.step += 1

    def read(self) -> tuple[list[float], list[float]]:
        """(sums, first non-finite (step, loss) of train and arch; step -1: none): one host read."""
        values = torch.cat([self.sums, self.first_bad]).tolist()
        return values[:3], values[3:]


class Searcher:
    def __init__(self, config: SearchConfig, data: data_lib.SearchData | None = None,
                 compile_backend: str = "inductor"):
        self.config = config
        #: torch.compile's backend for ``compile`` (the CPU tests capture with ``aot_eager``)
        self.compile_backend = compile_backend
        self.method = get_method(config.method)
        self.device = resolve_device(config.device)
        self.rank, self.world_size = distributed_world()
        seed_all(config.seed)
        self.data = data or data_lib.search_data(
            config.dataset, config.data_dir, seed=config.data_seed, train_portion=config.train_portion,
            image_size=config.image_size, synthetic_samples=config.synthetic_samples, augment=config.augment,
            cutout=config.cutout)
        self.num_classes = self.data.num_classes
        self.criterion = self.method.criterion(config).to(self.device)
        self.train_loader = self._loader(self.data.weight_set, stream=0)
        self.val_loader = self._loader(self.data.arch_set, stream=1)
        self.epoch = 0
        self.stopped_early = False
        self.eigen_history: list[dict[str, Any]] = []
        self.net: SearchNetwork = self.build_network()

    # -- construction ----------------------------------------------------------------------------------------
    def _loader(self, dataset: Any, stream: int) -> Any:
        cfg = self.config
        drop_last = len(dataset) >= 2 * cfg.batch_size * self.world_size
        return make_batches(dataset, cfg.batch_size, pipeline=cfg.data_pipeline, device=self.device, seed=cfg.seed,
                            rank=self.rank, world_size=self.world_size, num_workers=cfg.num_workers,
                            drop_last=drop_last, stream=stream)

    def build_network(self, net: SearchNetwork | None = None) -> SearchNetwork:
        """(Re)build the supernet and both optimizers; methods that change the network (P-DARTS's stages) pass
        the new ``net`` here so that it lands on the device, in the memory format, with fresh optimizers."""
        if net is None:
            net = self.method.build_network(self.config, self.num_classes)
        net = net.to(self.device)
        if self.config.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.set_network(net)
        return net

    def set_network(self, net: SearchNetwork) -> None:
        cfg = self.config
        self.net = net
        if cfg.channel_sampling == "random":  # channel subsets drawn on the device, not on the host
            net.place_channel_generator(self.device)
        #: whether ``compile`` captures the whole bilevel step (both forwards and backwards, clipping, both
        #: updates) as one graph: methods whose step is static (:meth:`SearchMethod.capturable`), one process
        #: (a data-parallel step's all-reduce stays eager)
        self.captured = cfg.compile != "none" and self.method.capturable(cfg) and self.world_size == 1
        #: what validation runs: ``net`` itself unless ``compile`` wraps it whole (or compiles its regions)
        self.eval_model = compile_model(net, cfg.compile, whole=self.method.static_graph(cfg),
                                        backend=self.compile_backend)
        #: what the steps' forwards run: ``net`` inside a captured step (the step is the compiled unit)
        self.model = net if self.captured else self.eval_model
        self.weight_optimizer, self.arch_optimizer = make_optimizers(
            net.weight_parameters(), net.arch_parameters(), cfg, captured=self.captured)
        self.meter = StepMeter(self.device)
        #: the step functions, by whether the arch is trained (compiled once each where captured)
        self._steps = {arch_on: (compile_step(self._step(arch_on), cfg.compile, backend=self.compile_backend)
                                 if self.captured else self._step(arch_on)) for arch_on in (False, True)}

    # -- the pieces steps are made of (used by architect.py and the methods) ---------------------------------
    def to_device(self, batch: Batch) -> Batch:
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def loss(self, batch: Batch, return_logits: bool = False) -> Any:
        x, y = self.to_device(batch)
        with autocast(self.device, self.config.amp):
            logits = self.model(x)
            loss = self.criterion(_at_least_float32(logits), y)
        return (loss, logits) if return_logits else loss

    def sync_grads(self, grads: Sequence[torch.Tensor]) -> None:
        """Average gradients over data-parallel ranks (both levels: arch gradients too)."""
        all_reduce_mean_(list(grads))

    def step_function(self, arch_on: bool) -> Callable[[Batch, Batch], None]:
        """The step the loop runs, ``step(train, val)`` on device batches: captured as one graph where
        :attr:`captured`, eager otherwise."""
        return self._steps[arch_on]

    def _step(self, arch_on: bool) -> Callable[[Batch, Batch], None]:
        """One step of the search as a function of its two batches (on the device): the method's arch step on
        the arch batch (when ``arch_on``), then its weight step on the weight batch, their results added to the
        meter. No host read: what ``compile`` captures whole, and what runs eagerly otherwise."""
        def step(train: Batch, val: Batch) -> None:
            if arch_on:
                self.meter.add_arch(self.method.arch_step(self, train, val))
            loss, logits = self.method.weight_step(self, train)
            self.meter.add_train(loss, logits, train[1])

        return step

    # -- the loop --------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.stopped_early or self.epoch >= self.config.epochs

    @property
    def arch_active(self) -> bool:
        return self.method.arch_active(self)

    def current_lr(self) -> float:
        return self.config.lr * self.method.lr_factor(self.config, self.epoch)

    def run_epoch(self) -> dict[str, Any]:
        cfg, epoch = self.config, self.epoch
        start = time.perf_counter()
        self.method.on_epoch_start(self, epoch)
        lr = self.current_lr()
        set_lr(self.weight_optimizer, lr)
        data_lib.set_epoch(self.train_loader, epoch)
        data_lib.set_epoch(self.val_loader, epoch)
        self.net.train()
        arch_on = self.arch_active
        step_fn = self.step_function(arch_on)
        self.meter.reset()
        seen = steps = 0
        val: Batch | None = None
        val_iter = iter(self.val_loader)
        for step, train in enumerate(self.train_loader):
            if cfg.steps_per_epoch is not None and step >= cfg.steps_per_epoch:
                break
            if arch_on:
                try:
                    val = next(val_iter)
                except StopIteration:
                    val_iter = iter(self.val_loader)
                    val = next(val_iter)
            train = self.to_device(train)
            step_fn(train, self.to_device(val) if val is not None else train)
            seen += train[1].shape[0]
            steps += 1
            if cfg.progress_every and steps % cfg.progress_every == 0:
                self._progress(steps, seen, arch_on)
        train_time = time.perf_counter() - start
        (loss_sum, correct, arch_loss_sum), first_bad = self.meter.read()
        self._check_finite(loss_sum, arch_loss_sum, first_bad)
        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], self.device)
        check_finite_loss(loss_sum, epoch + 1, "train")  # every rank sees the same sum: they stop together
        self.sync_buffers()
        val_loss, val_acc = self.evaluate()
        check_finite_loss(val_loss, epoch + 1, "val")
        self.epoch += 1
        genotype = self.method.genotype(self.net)
        metrics = {
            "epoch": self.epoch,
            "lr": lr,
            "arch_active": arch_on,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "arch_loss": arch_loss_sum / steps if arch_on and steps else None,
            "val_loss": val_loss,
            "val_acc": val_acc,
            **arch_summary(self.net),
            "genotype": genotype.to_json(),
            "n_skip_normal": genotype.count_op("skip_connect", "normal"),
            "throughput": seen / train_time if train_time > 0 else 0.0,
            # one bilevel step (arch + weights on one global batch), validation excluded
            "step_time_s": train_time / steps if steps else None,
            **self.method.epoch_metrics(self),
            **get_space(cfg.search_space).epoch_metrics(cfg, genotype),
        }
        if evaluation_due(epoch, cfg.hessian_every, cfg.epochs):
            metrics.update(self._track_hessian(genotype, val))
        metrics["epoch_time_s"] = time.perf_counter() - start
        return metrics

    #: called with a progress record every ``progress_every`` steps (None: no record is made)
    on_progress: Callable[[dict[str, Any]], None] | None = None

    def _progress(self, steps: int, seen: int, arch_on: bool) -> None:
        """Every ``progress_every`` steps: one host read of the meter, the divergence check up to now, and a
        record of the running means for :attr:`on_progress`."""
        (loss_sum, correct, arch_loss_sum), first_bad = self.meter.read()
        self._check_finite(loss_sum, arch_loss_sum, first_bad)
        if self.on_progress is not None:
            self.on_progress({"epoch": self.epoch + 1, "step": steps, "train_loss": loss_sum / seen,
                              "train_acc": correct / seen, "arch_loss": arch_loss_sum / steps if arch_on else None})

    def _check_finite(self, loss_sum: float, arch_loss_sum: float, first_bad: list[float]) -> None:
        """Raise :class:`~.runtime.SearchDiverged` naming the first step whose arch or training loss was not finite
        (the meter noted it on the device). Data-parallel ranks check the epoch's averaged sums instead, so that
        they all stop at the same point."""
        if self.world_size > 1:
            arch_loss_sum, *_ = all_reduce_sum([arch_loss_sum], self.device)
            check_finite_loss(arch_loss_sum, self.epoch + 1, "arch")
            return
        (train_step, train_loss, arch_step, arch_loss) = first_bad
        if arch_step >= 0 and (train_step < 0 or arch_step <= train_step):  # in a step the arch update runs first
            check_finite_loss(arch_loss, self.epoch + 1, "arch", int(arch_step) + 1)
        if train_step >= 0:
            check_finite_loss(train_loss, self.epoch + 1, "train", int(train_step) + 1)

    def sync_buffers(self) -> None:
        """Average BatchNorm running statistics across ranks so validation sees one model."""
        bufs = [b for b in self.net.buffers() if b.dtype.is_floating_point]
        all_reduce_mean_(bufs)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Supernet loss and top-1 accuracy on the arch split (the official ``infer``)."""
        self.net.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss x n, correct: read once at the end
        seen = 0
        for step, batch in enumerate(self.val_loader):
            if self.config.eval_steps is not None and step >= self.config.eval_steps:
                break
            x, y = self.to_device(batch)
            with autocast(self.device, self.config.amp):
                logits = self.eval_model(x)
            sums[0] += self.criterion(_at_least_float32(logits), y).double() * y.shape[0]
            sums[1] += (logits.argmax(dim=1) == y).sum()
            seen += y.shape[0]
        self.net.train()
        loss_sum, correct = sums.tolist()
        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], self.device)
        return loss_sum / max(seen, 1), correct / max(seen, 1)

    def _track_hessian(self, genotype: Genotype, val: Batch | None) -> dict[str, Any]:
        """RobustDARTS (Zela et al., ICLR 2020): the largest arch-Hessian eigenvalue of L_val on the epoch's last arch
        batch (the first validation batch in an epoch without arch steps); with ``early_stop`` DARTS-ES's rule may
        stop the search (see ``hessian.py``). Neither changes the search."""
        with unobserved(self):  # fetching a batch runs the augmentation, which draws from the global RNG
            batch = val if val is not None else next(iter(self.val_loader))
        with eager():  # double backward: never through compiled regions
            value = dominant_eigenvalue(self, self.to_device(batch), weight_decay=self.config.arch_weight_decay)
        self.eigen_history.append({"epoch": self.epoch, "eigenvalue": value, "genotype": genotype.to_json()})
        out: dict[str, Any] = {"hessian_eigenvalue": value}
        if self.config.early_stop and self.epoch < self.config.epochs and self._darts_es_answer() is not None:
            self.stopped_early = True
            out["early_stopped"] = True
        return out

    def _darts_es_answer(self) -> int | None:
        return darts_es_stop_index(*eigen_record(self.eigen_history))

    def final_genotype(self) -> Genotype:
        """The search's answer: DARTS-ES's earlier genotype when it stopped the search, else the current one."""
        answer = self._darts_es_answer() if self.stopped_early else None
        if answer is not None:
            return parse_genotype(self.eigen_history[answer]["genotype"])
        return self.method.genotype(self.net)

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "pcdarts-search/1",
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "stopped_early": self.stopped_early,
            "eigen_history": list(self.eigen_history),
            "method": self.method.state(self),
            "model": self.net.state_dict(),
            # the op list of each edge, which the alphas' columns follow (ROME's 7 ops, P-DARTS's pruned stages)
            "primitives": {t: [list(p) for p in edges] for t, edges in self.net.edge_primitives.items()},
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "arch_optimizer": self.arch_optimizer.state_dict(),
            "channel_rng": self.net.channel_generator.get_state(),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != "pcdarts-search/1":
            raise CheckpointError("not a search checkpoint of this project (format mismatch)")
        changed = incompatible_settings(state["config"], self.config.to_dict())
        if changed:
            raise ValueError(f"cannot resume: the checkpoint was made with different settings ({', '.join(changed)})")
        self.method.restore(self, state["method"])
        self.net.load_state_dict(state["model"])
        load_state(self.weight_optimizer, state["weight_optimizer"], self.captured)
        load_state(self.arch_optimizer, state["arch_optimizer"], self.captured)
        self.net.channel_generator.set_state(state["channel_rng"])
        self.epoch = int(state["epoch"])
        self.stopped_early = bool(state["stopped_early"])
        self.eigen_history = list(state["eigen_history"])
        set_rng_state(state["rng"])


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: autocast's bf16 in float32, float32 and float64 as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def arch_summary(net: SearchNetwork) -> dict[str, Any]:
    """Alphas/betas as lists and the mean entropy of the op distributions (nats; log(8) ~ 2.08 is uniform)."""
    out: dict[str, Any] = {}
    entropies = []
    # NAS-Bench-201's supernet has one cell type (``cell_types``); PC-DARTS's has normal and reduction cells.
    for cell in getattr(net, "cell_types", ("normal", "reduce")):
        alphas = net.alphas(cell).detach().float().cpu()
        probs = torch.softmax(alphas, dim=-1)
        ent = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
        out[f"arch_entropy_{cell}"] = ent
        entropies.append(ent)
        out[f"alphas_{cell}"] = alphas.tolist()
        betas = net.betas(cell)
        out[f"betas_{cell}"] = None if betas is None else betas.detach().float().cpu().tolist()
    out["arch_entropy"] = sum(entropies) / len(entropies)
    out["arch_entropy_max"] = math.log(net.alphas_normal.shape[1])
    return out


def search(config: SearchConfig, callbacks: Iterable[Callback] = (), state: dict[str, Any] | None = None,
           data: data_lib.SearchData | None = None) -> Iterator[dict[str, Any]]:
    """Run (or, from ``state``, resume) a search, yielding each epoch's metrics after the callbacks saw them.

    The callbacks get ``(metrics, searcher)``; ``searcher.state_dict()`` there is a resumable checkpoint.
    """
    searcher = Searcher(config, data)
    if state is not None:
        searcher.load_state_dict(state)
    callbacks = list(callbacks)
    while not searcher.done:
        metrics = searcher.run_epoch()
        for cb in callbacks:
            cb(metrics, searcher)
        yield metrics
