"""Training a derived cell from scratch: ``train_eval(config, genotype, callbacks)`` yields per-epoch metrics.

The DARTS/PC-DARTS evaluation protocol (DARTS Sec. 4.2, Appendix A.2): SGD with cosine lr, drop path ramped
linearly over the epochs, auxiliary loss weight 0.4, cutout, gradient clipping 5; ImageNet adds label smoothing.
Like the search, a :class:`Trainer`'s ``state_dict()`` at an epoch boundary resumes exactly.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from . import data as data_lib
from .config import EvalConfig
from .genotypes import Genotype, parse_genotype
from .profile import count_parameters
from .runtime import (CheckpointError, accuracy, all_reduce_mean_, all_reduce_sum, autocast, check_finite_loss,
                      distributed_world, resolve_device, rng_state, seed_all, set_rng_state)
from .spaces import get_space

Callback = Callable[[dict[str, Any], "Trainer"], None]

RESUMABLE_DIFFERENCES = {"device", "num_workers", "data_dir", "epochs", "amp", "channels_last"}


def build_eval_network(config: EvalConfig, genotype: Genotype, num_classes: int) -> nn.Module:
    """The search space's evaluation network: DARTS's (darts, s1-s4) or NAS-Bench-201's ``TinyNetwork``."""
    return get_space(config.search_space).eval_network(config, genotype, num_classes)


class Trainer:
    def __init__(self, config: EvalConfig, genotype: Genotype, data: data_lib.EvalData | None = None):
        self.config, self.genotype = config, genotype
        self.device = resolve_device(config.device)
        self.rank, self.world_size = distributed_world()
        seed_all(config.seed)
        self.data = data or data_lib.eval_data(config.dataset, config.data_dir, cutout=config.cutout,
                                               image_size=config.image_size,
                                               synthetic_samples=config.synthetic_samples)
        self.net = build_eval_network(config, genotype, self.data.num_classes).to(self.device)
        if config.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.params = count_parameters(self.net)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.optimizer = torch.optim.SGD(self.net.parameters(), config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        pin = self.device.type == "cuda"
        self.train_loader = data_lib.make_loader(self.data.train_set, config.batch_size, seed=config.seed,
                                                 rank=self.rank, world_size=self.world_size,
                                                 num_workers=config.num_workers, pin_memory=pin,
                                                 drop_last=len(self.data.train_set) >= 2 * config.batch_size)
        self.test_loader = data_lib.make_loader(self.data.test_set, config.batch_size, seed=config.seed,
                                                shuffle=False, rank=self.rank, world_size=self.world_size,
                                                num_workers=config.num_workers, pin_memory=pin)
        self.epoch = 0

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs

    def current_lr(self) -> float:
        """Cosine annealing from lr to lr_min over the epochs (DARTS's evaluation schedule)."""
        cfg = self.config
        return cfg.lr_min + (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * self.epoch / cfg.epochs)) / 2

    def _batch(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def run_epoch(self) -> dict[str, Any]:
        cfg = self.config
        start = time.perf_counter()
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        drop_prob = cfg.drop_path * self.epoch / cfg.epochs  # linear ramp (DARTS train.py)
        self.net.drop_path_prob = drop_prob
        data_lib.set_epoch(self.train_loader, self.epoch)
        self.net.train()
        loss_sum = correct = seen = 0.0
        for step, batch in enumerate(self.train_loader):
            if cfg.steps_per_epoch is not None and step >= cfg.steps_per_epoch:
                break
            x, y = self._batch(batch)
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(self.device, cfg.amp):
                logits, aux = self.net(x)
                loss = self.criterion(logits.float(), y)
                if aux is not None:
                    loss = loss + cfg.auxiliary_weight * self.criterion(aux.float(), y)
            loss.backward()
            all_reduce_mean_([p.grad for p in self.net.parameters() if p.grad is not None])
            nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
            self.optimizer.step()
            value = float(loss.detach())
            if self.world_size == 1:  # data-parallel ranks check the averaged loss below, to stop together
                check_finite_loss(value, self.epoch + 1, "train", step + 1)
            loss_sum += value * y.shape[0]
            correct += accuracy(logits.detach(), y)
            seen += y.shape[0]
        train_time = time.perf_counter() - start
        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], self.device)
        check_finite_loss(loss_sum, self.epoch + 1, "train")
        test_loss, test_acc = self.evaluate()
        check_finite_loss(test_loss, self.epoch + 1, "test")
        self.epoch += 1
        return {
            "epoch": self.epoch, "lr": lr, "drop_path_prob": drop_prob,
            "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "test_loss": test_loss, "test_acc": test_acc, "params": self.params,
            "throughput": seen / train_time if train_time > 0 else 0.0,
            "epoch_time_s": time.perf_counter() - start,
        }

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        self.net.eval()
        loss_sum = correct = seen = 0.0
        for step, batch in enumerate(self.test_loader):
            if self.config.eval_steps is not None and step >= self.config.eval_steps:
                break
            x, y = self._batch(batch)
            with autocast(self.device, self.config.amp):
                logits, _ = self.net(x)
            loss_sum += float(nn.functional.cross_entropy(logits.float(), y)) * y.shape[0]
            correct += accuracy(logits, y)
            seen += y.shape[0]
        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], self.device)
        return loss_sum / max(seen, 1), correct / max(seen, 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "pcdarts-eval/1", "config": self.config.to_dict(), "genotype": self.genotype.to_json(),
            "epoch": self.epoch, "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != "pcdarts-eval/1":
            raise CheckpointError("not an evaluation checkpoint of this project (format mismatch)")
        if parse_genotype(state["genotype"]) != self.genotype:
            raise ValueError("cannot resume: the checkpoint trained a different genotype")
        saved, now = state["config"], self.config.to_dict()
        changed = sorted(k for k in now if k not in RESUMABLE_DIFFERENCES and saved.get(k) != now[k])
        if changed:
            raise ValueError(f"cannot resume: the checkpoint was made with different settings ({', '.join(changed)})")
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        set_rng_state(state["rng"])


def train_eval(config: EvalConfig, genotype: Genotype, callbacks: Iterable[Callback] = (),
               state: dict[str, Any] | None = None, data: data_lib.EvalData | None = None) -> Iterator[dict[str, Any]]:
    """Train ``genotype``'s evaluation network from scratch (or resume from ``state``), yielding each epoch."""
    trainer = Trainer(config, genotype, data)
    if state is not None:
        trainer.load_state_dict(state)
    callbacks = list(callbacks)
    while not trainer.done:
        metrics = trainer.run_epoch()
        for cb in callbacks:
            cb(metrics, trainer)
        yield metrics
