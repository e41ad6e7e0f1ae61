"""The core's data parallelism, checked with plain torch.multiprocessing + gloo (no Ray).

- 2 ranks with random channel sampling: after several bilevel steps every parameter and buffer (alphas and betas
  included) is bitwise identical on both ranks, both derive one genotype, both drew the same channel subsets
  (their channel generators are in the same state after every optimizer step), and their data shards are disjoint.
- 2 ranks at batch B/2 each follow the trajectory of 1 process at batch B. BatchNorm in training mode normalizes
  with the batch statistics of each rank's own B/2 samples, so the honest single-process reference is "ghost
  BatchNorm": the process splits its batch of B into the two halves the ranks would get (even and odd positions,
  as DistributedSampler deals them) and normalizes each half on its own, averaging the two half-batch losses.
  Everything else (sample order, averaged gradients of both levels, clipping, SGD and Adam) is the same
  arithmetic, so alphas, betas and all weights agree to float rounding. A plain full-batch-BN process is checked to
  be measurably further away, which shows the comparison can tell the difference.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pcdarts_core.config import global_config, rank_config
from pcdarts_core.runtime import ranks_identical
from pcdarts_core import data as data_lib
from pcdarts_core.search import Searcher

BASE = dict(method="pcdarts", dataset="synthetic", synthetic_samples=256, image_size=16, init_channels=4, layers=3,
            k=2, epochs=2, warmup_epochs=0, batch_size=16, steps_per_epoch=3, eval_steps=1, device="cpu", seed=3)


def _data(augment: bool) -> data_lib.SearchData:
    data = data_lib.search_data("synthetic", seed=0, image_size=16, synthetic_samples=256)
    if not augment:
        data.weight_set.dataset.transform = None  # both subsets share one dataset
    return data


def _snapshot(searcher: Searcher) -> dict:
    net = searcher.net
    return {"state": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "arch": [p.detach().clone() for p in net.arch_parameters()],
            "genotype": searcher.method.genotype(net).to_json()}


def _one_search(world: int, values: dict, augment: bool) -> dict:
    cfg = rank_config(global_config(values), world)
    searcher = Searcher(cfg, _data(augment))
    channel_states = []
    sync = searcher.sync_grads

    def record(grads: list[torch.Tensor]) -> None:  # once per level and step, before its update
        sync(grads)
        channel_states.append(searcher.net.channel_generator.get_state().clone())

    searcher.sync_grads = record  # type: ignore[method-assign]
    data_lib.set_epoch(searcher.train_loader, 0)
    shard = list(iter(searcher.train_loader.sampler))
    searcher.run_epoch()
    in_sync = ranks_identical(searcher.net, list(searcher.net.arch_parameters()))
    return {**_snapshot(searcher), "channel_states": channel_states, "shard": shard, "batch_size": cfg.batch_size,
            "in_sync": in_sync}


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, runs: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: _one_search(world, values, augment) for name, (values, augment) in runs.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


RUNS = {
    "random": ({**BASE, "channel_sampling": "random"}, True),
    "fixed": ({**BASE, "channel_sampling": "fixed"}, False),
    "rome": ({**BASE, "method": "rome", "k": 1, "steps_per_epoch": 2}, True),
}


@pytest.fixture(scope="module")
def two_ranks() -> tuple[dict, dict]:
    """Both ranks' results of every configuration above, from one pair of spawned processes."""
    runs = RUNS
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(2, os.path.join(tmp, "pg"), tmp, runs), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(2))
    return r0, r1


def test_ranks_stay_bitwise_identical_with_random_channel_sampling(two_ranks):
    values = RUNS["random"][0]
    r0, r1 = (r["random"] for r in two_ranks)
    assert r0["batch_size"] == r1["batch_size"] == 8  # global batch 16 over 2 ranks
    for a, b in zip(r0["arch"], r1["arch"]):
        assert torch.equal(a, b)
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert r0["genotype"] == r1["genotype"]
    assert r0["in_sync"] and r1["in_sync"]
    # The arch was trained, not just left at its initialization.
    init = Searcher(rank_config(global_config(values), 1), _data(True))
    assert not torch.equal(init.net.arch_parameters()[0].detach(), r0["arch"][0])
    # Same channel subsets: the seeded channel generators advanced identically, step by step (2 per bilevel step).
    assert len(r0["channel_states"]) == len(r1["channel_states"]) == 2 * BASE["steps_per_epoch"]
    for s0, s1 in zip(r0["channel_states"], r1["channel_states"]):
        assert torch.equal(s0, s1)
    # Different data: the two shards of the epoch's permutation are disjoint.
    assert set(r0["shard"]).isdisjoint(r1["shard"]) and len(r0["shard"]) == len(r1["shard"]) == 64


class GhostBatchNormSearcher(Searcher):
    """One process that normalizes the even and odd halves of each batch separately, as two ranks would."""

    def loss(self, batch, return_logits=False):
        x, y = self.to_device(batch)
        losses, logits = [], torch.empty(x.shape[0], self.num_classes)
        for part in (slice(0, None, 2), slice(1, None, 2)):
            out = self.net(x[part])
            losses.append(self.criterion(out, y[part]))
            logits[part] = out.detach()
        loss = (losses[0] + losses[1]) / 2
        return (loss, logits) if return_logits else loss


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a["state"][k].double() - b["state"][k].double()).abs().max()) for k in a["state"]
               if a["state"][k].is_floating_point() and "running" not in k)


def test_two_ranks_at_half_batch_follow_one_rank_at_full_batch(two_ranks):
    torch.set_num_threads(1)
    values = RUNS["fixed"][0]
    r0, r1 = (r["fixed"] for r in two_ranks)
    cfg = rank_config(global_config(values), 1)
    assert cfg.batch_size == 16
    ghost = GhostBatchNormSearcher(cfg, _data(augment=False))
    ghost.run_epoch()
    ref = _snapshot(ghost)
    plain = Searcher(cfg, _data(augment=False))
    plain.run_epoch()
    full_bn = _snapshot(plain)

    arch_diff = max(float((a - b).abs().max()) for a, b in zip(ref["arch"], r0["arch"]))
    weight_diff = _max_diff(ref, r0)
    print(f"ghost-BN reference vs 2 ranks: alphas/betas {arch_diff:.2e}, weights {weight_diff:.2e}; "
          f"full-batch BN vs 2 ranks: weights {_max_diff(full_bn, r0):.2e}")
    assert arch_diff < 1e-5, arch_diff
    assert weight_diff < 1e-4, weight_diff
    # Full-batch BN is a different computation: the comparison above would have noticed it.
    assert _max_diff(full_bn, r0) > 10 * weight_diff
    assert r0["genotype"] == r1["genotype"]


def test_rank_config_splits_the_global_batch_and_scales_lr_when_it_must():
    cfg = global_config({**BASE, "batch_size": 16, "lr": 0.1})
    assert rank_config(cfg, 2).batch_size == 8 and rank_config(cfg, 2).lr == 0.1
    odd = rank_config(cfg, 3)  # 5 per rank: 15 of 16 samples per step, lr scaled linearly
    assert odd.batch_size == 5 and odd.lr == pytest.approx(0.1 * 15 / 16)
    with pytest.raises(ValueError, match="smaller than the 17"):
        rank_config(cfg, 17)
    scaled = global_config({**BASE, "batch_size": 512, "lr": 0.5, "lr_min": 0.01}, lr_reference_batch=1024)
    assert scaled.lr == pytest.approx(0.25) and scaled.lr_min == pytest.approx(0.005)


def test_rome_ranks_stay_identical(two_ranks):
    """ROME samples sub-networks from the global torch RNG, which stays in step on all ranks: every rank samples
    the same ops (so the same parameters have gradients and the all-reduce buckets match)."""
    r0, r1 = (r["rome"] for r in two_ranks)
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert r0["genotype"] == r1["genotype"]
