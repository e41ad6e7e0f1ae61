"""The device-resident data pipeline, on CPU: same indices per rank and epoch as the DistributedSampler path,
the dataset's own augmentation done for a whole batch (checked against torchvision's functional ops on hand-made
images), reproducible by seed, and the loops running on it."""

from __future__ import annotations

import pickle  # only to write CIFAR's on-disk format; the library never unpickles anything itself
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from methods_testlib import tiny_config
from PIL import Image

from pcdarts_core.config import eval_config, search_config
from pcdarts_core.data import DATASETS, eval_data, make_loader, search_data, set_epoch
from pcdarts_core.device_data import (Augmentation, DeviceDataset, DeviceLoader, UnsupportedDataset, augment,
                                      make_batches, use_device_pipeline)
from pcdarts_core.genotypes import PUBLISHED
from pcdarts_core.search import Searcher
from pcdarts_core.train import Trainer

CPU = torch.device("cpu")
N_TRAIN, N_TEST = 50, 10


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """A CIFAR-10 tree in torchvision's format with random pixels, so every crop offset and flip shows."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    per = N_TRAIN // 5

    def write(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)

    for b in range(5):
        write(f"data_batch_{b + 1}", {"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8),
                                      "labels": [(b * per + i) % 10 for i in range(per)]})
    write("test_batch", {"data": rng.integers(0, 256, (N_TEST, 3072), dtype=np.uint8),
                         "labels": [i % 10 for i in range(N_TEST)]})
    write("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return root


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


# ------------------------------------------------------------------------------------------- augmentation


def test_augmentation_is_read_off_the_datasets_transform(cifar_root):
    info = DATASETS["cifar10"]
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    train = Augmentation.from_transform(eval_data("cifar10", cifar_root, cutout=16, verify=False).train_set.transform,
                                        3, (32, 32), uint8=True)
    assert (train.pad, train.flip, train.cutout) == (4, 0.5, 16)
    assert torch.allclose(torch.tensor(train.scale), 1 / (255 * std))
    assert torch.allclose(torch.tensor(train.shift), -mean / std)
    assert torch.allclose(torch.tensor(train.fill), -mean / std)  # torchvision pads the PIL image with black
    test = Augmentation.from_transform(eval_data("cifar10", cifar_root, verify=False).test_set.transform,
                                       3, (32, 32), uint8=True)
    assert (test.pad, test.flip, test.cutout) == (0, 0.0, 0)
    synthetic = search_data("synthetic", synthetic_samples=20, image_size=8).weight_set
    aug = DeviceDataset(synthetic, CPU).augmentation
    # Synthetic data is stored normalized and only shifted (flips would change its classes).
    assert (aug.pad, aug.flip, aug.cutout, aug.scale, aug.shift, aug.fill) == (2, 0.0, 0, (1.0,) * 3, (0.0,) * 3,
                                                                               (0.0,) * 3)


def test_crop_flip_and_cutout_on_a_hand_made_image():
    img = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    aug = Augmentation(scale=(1.0,), shift=(0.0,), pad=1, fill=(-1.0,), flip=1.0, cutout=2)
    # image 0: offset (0, 2), no flip, cutout centred far away; image 1: offset (1, 1) = no shift, flipped,
    # cutout centred at (0, 0): rows/cols [-1, 1) clipped to [0, 1).
    params = torch.tensor([[0, 2, 0, 100, 100], [1, 1, 1, 0, 0]])
    out = augment(img, params, aug)
    expected0 = torch.full((4, 4), -1.0)
    expected0[1:, :3] = img[0, 0, :3, 1:]  # shifted down by one (padding on top) and left by one
    assert torch.equal(out[0, 0], expected0)
    expected1 = img[1, 0].flip(-1).clone()
    expected1[0, 0] = 0.0
    assert torch.equal(out[1, 0], expected1)


def test_device_batches_equal_torchvision_on_the_same_draws(cifar_root):
    """Every image of a device batch is torchvision's pad/crop/flip/ToTensor/Normalize/Cutout of the same
    image with the drawn offset, flip and cutout centre."""
    train = eval_data("cifar10", cifar_root, cutout=16, verify=False).train_set
    loader = DeviceLoader(DeviceDataset(train, CPU), 16, seed=3, epoch=2)
    indices, params = loader.plan()
    x, y = next(iter(loader))
    info = DATASETS["cifar10"]
    assert params[:, 2].unique().tolist() == [0, 1]  # both flips occur in this batch
    for i in range(16):
        oy, ox, flip, cy, cx = params[i].tolist()
        img = TF.crop(TF.pad(Image.fromarray(train.data[int(indices[i])]), 4, fill=0), oy, ox, 32, 32)
        if flip:
            img = TF.hflip(img)
        ref = TF.normalize(TF.to_tensor(img), info.mean, info.std)
        ref[:, max(cy - 8, 0):min(cy + 8, 32), max(cx - 8, 0):min(cx + 8, 32)] = 0.0
        assert torch.allclose(x[i], ref, atol=1e-5), i
        assert int(y[i]) == train.targets[int(indices[i])]


def test_unsupported_transforms_stay_on_the_loader(cifar_root):
    from torchvision import transforms

    train = eval_data("cifar10", cifar_root, verify=False).train_set
    train.transform = transforms.Compose([transforms.AutoAugment(), transforms.ToTensor()])
    assert not use_device_pipeline("auto", train, torch.device("cuda"))
    with pytest.raises(UnsupportedDataset, match="^data_pipeline: device cannot serve.*AutoAugment"):
        use_device_pipeline("device", train, CPU)
    assert not use_device_pipeline("auto", eval_data("synthetic", synthetic_samples=20).train_set, CPU)
    assert use_device_pipeline("auto", eval_data("synthetic", synthetic_samples=20).train_set, torch.device("cuda"))


# ------------------------------------------------------------------------------------ order, shards, seeds


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_are_the_distributed_sampler_shards(cifar_root, world_size, drop_last):
    """Per rank and epoch the device path serves the loader path's images in the loader path's order (the test
    transform, whose output is deterministic, shows it image by image)."""
    test = eval_data("cifar10", cifar_root, verify=False).test_set
    weight = search_data("cifar10", cifar_root, verify=False).weight_set
    seen: list[int] = []
    for rank in range(world_size):
        for shuffle in (False, True):
            kw = dict(seed=7, rank=rank, world_size=world_size, drop_last=drop_last, shuffle=shuffle)
            ref = make_loader(test, 4, **kw)
            dev = DeviceLoader(DeviceDataset(test, CPU), 4, **kw)
            set_epoch(ref, 5), set_epoch(dev, 5)
            got, want = batches(dev), batches(ref)
            assert len(got) == len(want) == len(dev)
            for (gx, gy), (wx, wy) in zip(got, want):
                assert gx.dtype == wx.dtype and gx.shape == wx.shape and torch.equal(gy, wy)
                assert torch.allclose(gx, wx, atol=1e-6)
        # the search's weight half (a Subset): the same indices as the sampler path
        ref = make_loader(weight, 8, seed=7, rank=rank, world_size=world_size, drop_last=drop_last, epoch=3)
        dev = DeviceLoader(DeviceDataset(weight, CPU), 8, seed=7, rank=rank, world_size=world_size,
                           drop_last=drop_last, epoch=3)
        indices = dev.plan()[0].tolist()
        assert indices == list(ref.sampler)
        assert torch.equal(torch.cat([y for _, y in dev]), torch.cat([y for _, y in ref]))
        seen += indices
    n = len(weight)
    if drop_last:  # disjoint shards of equal size, the ragged tail dropped
        assert len(set(seen)) == len(seen) == (n // world_size) * world_size
    else:  # every image, the shards padded to equal size by repeats
        assert set(seen) == set(range(n)) and len(seen) == -(-n // world_size) * world_size


def test_same_seed_same_batches_and_epochs_differ(cifar_root):
    weight = search_data("cifar10", cifar_root, verify=False).weight_set
    data = DeviceDataset(weight, CPU)
    a = batches(DeviceLoader(data, 8, seed=1, epoch=4))
    b = DeviceLoader(data, 8, seed=1)
    b.set_epoch(4)
    for (ax, ay), (bx, by) in zip(a, batches(b)):
        assert torch.equal(ax, bx) and torch.equal(ay, by)
    b.set_epoch(5)
    assert not torch.equal(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in batches(b)]))
    other_seed = batches(DeviceLoader(data, 8, seed=2, epoch=4))
    assert not torch.equal(a[0][0], other_seed[0][0])
    # A second stream (the arch set's loader) draws its own augmentation but keeps the sampler's order.
    stream = DeviceLoader(data, 8, seed=1, epoch=4, stream=1)
    assert torch.equal(stream.plan()[0], DeviceLoader(data, 8, seed=1, epoch=4).plan()[0])
    assert not torch.equal(stream.plan()[1], DeviceLoader(data, 8, seed=1, epoch=4).plan()[1])
    # The global RNG is neither read nor advanced.
    state = torch.get_rng_state()
    torch.manual_seed(123)
    c = batches(DeviceLoader(data, 8, seed=1, epoch=4))
    assert all(torch.equal(cx, ax) for (cx, _), (ax, _) in zip(c, a))
    torch.set_rng_state(state)


# ----------------------------------------------------------------------------------------------- the loops


def test_config_chooses_the_pipeline():
    assert search_config("pcdarts", "synthetic").data_pipeline == "auto"
    with pytest.raises(ValueError, match="^data_pipeline must be one of auto, loader, device"):
        search_config("pcdarts", "synthetic", data_pipeline="gpu")
    with pytest.raises(ValueError, match="^data_pipeline: device serves CIFAR-kind"):
        search_config("pcdarts", "imagenet", data_pipeline="device")
    with pytest.raises(ValueError, match="set num_workers: 0$"):
        eval_config("synthetic", data_pipeline="device", num_workers=2)
    sd = search_data("synthetic", synthetic_samples=20, image_size=8)
    assert isinstance(make_batches(sd.weight_set, 4, pipeline="device", device=CPU, seed=0), DeviceLoader)
    assert isinstance(make_batches(sd.weight_set, 4, pipeline="auto", device=CPU, seed=0),
                      torch.utils.data.DataLoader)


def test_search_on_the_device_pipeline_is_reproducible():
    def run() -> tuple[list[float], str]:
        searcher = Searcher(tiny_config("pcdarts", data_pipeline="device", epochs=2, warmup_epochs=0))
        assert isinstance(searcher.train_loader, DeviceLoader) and isinstance(searcher.val_loader, DeviceLoader)
        metrics = [searcher.run_epoch() for _ in range(2)]
        return [m[k] for m in metrics for k in ("train_loss", "arch_loss", "val_loss")], metrics[-1]["genotype"]

    first = run()
    assert first == run()
    assert all(np.isfinite(first[0]))


def test_evaluation_training_on_the_device_pipeline():
    cfg = eval_config("synthetic", data_pipeline="device", init_channels=4, layers=3, image_size=8,
                      synthetic_samples=(32, 16), batch_size=8, epochs=1, device="cpu", cutout=4)
    trainer = Trainer(cfg, PUBLISHED["PC_DARTS_CIFAR"])
    assert trainer.train_loader.data.augmentation.cutout == 0  # synthetic data: the dataset has no cutout
    m = trainer.run_epoch()
    assert m["test_acc"] >= 0 and np.isfinite(m["train_loss"])
    x, y = next(iter(trainer.test_loader))
    assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
