"""Batches made on the device: CIFAR-kind datasets held on the accelerator and augmented a whole batch at a time.

The DataLoader path (:func:`pcdarts_core.data.make_loader`) decodes and augments one image at a time on the CPU
and copies every batch to the device. For 32-px images that work, not the network, can bound a GPU search. Here
the images of a dataset stay on the device as one tensor (CIFAR: uint8 ``(N, 3, 32, 32)``, 3 KB an image;
synthetic: its float images), and each batch is one gather, one normalization and one crop/flip/cutout for the
whole batch, with no worker processes.

What stays as on the DataLoader path:

- *Which images a rank sees, in which order*: the indices come from the same
  :class:`~torch.utils.data.DistributedSampler` (``seed``, ``epoch``, ``rank``, ``world_size``, ``drop_last``),
  so single-process order and data-parallel shards are exactly the loader path's.
- *The augmentation*: it is read off the dataset's own torchvision transform (``RandomCrop`` with its padding
  and fill, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, DARTS's :class:`~pcdarts_core.data.Cutout`), so
  the same operations run with the same parameters. Any other transform (ImageNet's, AutoAugment) is refused:
  such datasets stay on the loader path.

What differs is where the random draws come from: at the start of an epoch one CPU ``torch.Generator`` seeded by
``(seed, epoch, rank, stream)`` draws every image's crop offset, flip and cutout centre at once, and they reach
the device in one copy. The same seed therefore gives the same batches on CPU and on CUDA, the global RNG is never
touched, and resuming at an epoch boundary is exact without saving any loader state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler, Subset
from torchvision import datasets, transforms

from .data import Cutout, SyntheticDataset, make_loader, worker_seed

__all__ = [
    "PIPELINES",
    "Augmentation",
    "DeviceDataset",
    "DeviceLoader",
    "UnsupportedDataset",
    "augment",
    "make_batches",
    "use_device_pipeline",
]

#: ``data_pipeline`` values: ``auto`` is ``device`` for CIFAR-kind data on CUDA and ``loader`` otherwise.
PIPELINES = ("auto", "loader", "device")

#: columns of the per-image draws of an epoch
OFFSET_Y, OFFSET_X, FLIP, CUT_Y, CUT_X = range(5)


class UnsupportedDataset(ValueError):
    """The dataset (or its transform) is not one the device pipeline reproduces; the message says what."""


@dataclass(frozen=True)
class Augmentation:
    """A dataset's transform as batch operations: ``x * scale + shift`` per channel (``ToTensor`` then
    ``Normalize``), then a random crop with ``pad`` pixels of ``fill`` on each side, a horizontal flip with
    probability ``flip``, and a ``cutout`` x ``cutout`` square of zeros (0: none)."""

    scale: tuple[float, ...]
    shift: tuple[float, ...]
    pad: int = 0
    fill: tuple[float, ...] = (0.0, 0.0, 0.0)
    flip: float = 0.0
    cutout: int = 0

    @classmethod
    def from_transform(cls, transform: Any, channels: int, size: tuple[int, int], uint8: bool) -> "Augmentation":
        """Read a torchvision transform (or ``None``); :class:`UnsupportedDataset` for anything not reproduced."""
        steps = list(transform.transforms) if isinstance(transform, transforms.Compose) else \
            [] if transform is None else [transform]
        scale = torch.ones(channels, dtype=torch.float64)
        shift = torch.zeros(channels, dtype=torch.float64)
        fill: torch.Tensor | None = None  # the pad value, carried through the pointwise steps after the crop
        pad, flip, cutout, scaled = 0, 0.0, 0, not uint8
        for i, step in enumerate(steps):
            if cutout:
                raise UnsupportedDataset(f"{type(step).__name__} after Cutout is not reproduced on the device")
            if isinstance(step, transforms.RandomCrop):
                padding = step.padding
                if isinstance(padding, (list, tuple)):
                    if len(set(padding)) != 1:
                        raise UnsupportedDataset(f"RandomCrop padding {padding} is not the same on every side")
                    padding = padding[0]
                if tuple(step.size) != size or step.padding_mode != "constant" or step.pad_if_needed or pad:
                    raise UnsupportedDataset(f"{step} is not a same-size padded crop")
                if not isinstance(step.fill, (int, float)):
                    raise UnsupportedDataset(f"RandomCrop fill {step.fill!r} is not one number")
                pad, fill = int(padding or 0), torch.full((channels,), float(step.fill), dtype=torch.float64)
            elif isinstance(step, transforms.RandomHorizontalFlip):
                flip = float(step.p)
            elif isinstance(step, transforms.ToTensor):
                if scaled:
                    raise UnsupportedDataset("ToTensor of images that are already tensors")
                scale, shift, scaled = scale / 255, shift / 255, True
                fill = None if fill is None else fill / 255
            elif isinstance(step, transforms.Normalize):
                mean = torch.tensor(step.mean, dtype=torch.float64).expand(channels)
                std = torch.tensor(step.std, dtype=torch.float64).expand(channels)
                scale, shift = scale / std, (shift - mean) / std
                fill = None if fill is None else (fill - mean) / std
            elif isinstance(step, Cutout):
                cutout = step.length
            else:
                raise UnsupportedDataset(f"transform step {i} ({type(step).__name__}) is not reproduced on the "
                                         "device; use data_pipeline: loader")
        if not scaled:
            raise UnsupportedDataset("uint8 images without ToTensor")
        return cls(tuple(scale.tolist()), tuple(shift.tolist()), pad,
                   tuple((fill if fill is not None else torch.zeros(channels)).tolist()), flip, cutout)

    def draw(self, n: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """``(n, 5)`` int64: crop offsets (y, x), flip (0/1), cutout centre (y, x) of ``n`` images."""
        h, w = size
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
        flips = (torch.rand(n, 1, generator=generator) < self.flip).long()
        centres = torch.stack([torch.randint(0, h, (n,), generator=generator),
                               torch.randint(0, w, (n,), generator=generator)], dim=1)
        return torch.cat([offsets, flips, centres], dim=1)


def augment(images: torch.Tensor, params: torch.Tensor, aug: Augmentation) -> torch.Tensor:
    """Normalize a batch of stored images, then crop, flip and cut it out as ``aug`` and ``params`` (rows of
    :meth:`Augmentation.draw`) say. Output: float32 ``(B, C, H, W)`` on the images' device."""
    b, c, h, w = images.shape
    dev = images.device
    scale = torch.tensor(aug.scale, dtype=torch.float32, device=dev).view(1, c, 1, 1)
    shift = torch.tensor(aug.shift, dtype=torch.float32, device=dev).view(1, c, 1, 1)
    x = images.float() * scale + shift
    p = aug.pad
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if aug.flip > 0:  # the flip of the crop: read its columns right to left
        cols = torch.where(params[:, FLIP:FLIP + 1].bool(), w - 1 - cols, cols)
    if p or aug.flip > 0:
        if p:
            fill = torch.tensor(aug.fill, dtype=torch.float32, device=dev).view(1, c, 1, 1)
            padded = fill.expand(b, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p:p + h, p:p + w] = x
            x = padded
            rows = rows + params[:, OFFSET_Y:OFFSET_Y + 1]
            cols = cols + params[:, OFFSET_X:OFFSET_X + 1]
        batch = torch.arange(b, device=dev).view(b, 1, 1, 1)
        chan = torch.arange(c, device=dev).view(1, c, 1, 1)
        x = x[batch, chan, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
    if aug.cutout:  # DARTS's Cutout: a length x length square around the centre, clipped at the border
        half = aug.cutout // 2
        cy, cx = params[:, CUT_Y].view(b, 1, 1), params[:, CUT_X].view(b, 1, 1)
        ys, xs = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
        inside = (ys >= cy - half) & (ys < cy + half) & (xs >= cx - half) & (xs < cx + half)
        x = x.masked_fill(inside.unsqueeze(1), 0.0)
    return x


def _unwrap(dataset: Dataset) -> tuple[Dataset, torch.Tensor | None]:
    """The dataset under any ``Subset`` wrappers and the indices into it (None: all of it)."""
    indices: torch.Tensor | None = None
    while isinstance(dataset, Subset):
        own = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        indices = own if indices is None else own[indices]
        dataset = dataset.dataset
    return dataset, indices


def _source(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor, Augmentation]:
    """(images, targets, augmentation) of a CIFAR-kind dataset, on the CPU and not yet indexed."""
    base, _ = _unwrap(dataset)
    if getattr(base, "target_transform", None) is not None:
        raise UnsupportedDataset("datasets with a target_transform stay on the loader path")
    if isinstance(base, datasets.CIFAR10):  # CIFAR-100 too (a subclass)
        images = torch.from_numpy(base.data).permute(0, 3, 1, 2)  # HWC uint8 as torchvision keeps it
        targets = torch.as_tensor(base.targets, dtype=torch.long)
    elif isinstance(base, SyntheticDataset):
        images, targets = base.images, torch.as_tensor(base.targets, dtype=torch.long)
    else:
        raise UnsupportedDataset(f"{type(base).__name__} is not a CIFAR-kind dataset (CIFAR-10/100, synthetic); "
                                 "it stays on the loader path")
    aug = Augmentation.from_transform(base.transform, images.shape[1], tuple(images.shape[-2:]),
                                      images.dtype == torch.uint8)
    return images, targets, aug


class DeviceDataset:
    """The images and labels of a CIFAR-kind dataset (a ``Subset`` keeps its own images only) on ``device``."""

    def __init__(self, dataset: Dataset, device: torch.device | str):
        images, targets, self.augmentation = _source(dataset)
        _, indices = _unwrap(dataset)
        if indices is not None:
            images, targets = images[indices], targets[indices]
        self.device = torch.device(device)
        self.images = images.contiguous().to(self.device)
        self.targets = targets.to(self.device)
        self.size: tuple[int, int] = tuple(images.shape[-2:])  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.targets)


class DeviceLoader:
    """Batches ``(images, labels)`` of a :class:`DeviceDataset`, already on its device; iterated like
    ``make_loader``'s DataLoader (same indices per rank and epoch) and reshuffled by :meth:`set_epoch`.

    ``stream`` separates the draws of two loaders that
    share a seed (a search's weight and arch sets).
    """

    def __init__(self, data: DeviceDataset, batch_size: int, *, seed: int, epoch: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, stream: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data, self.batch_size, self.drop_last = data, batch_size, drop_last
        self.seed, self.rank, self.stream = seed, rank, stream
        self.sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                          drop_last=drop_last)
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def plan(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's indices (this rank's, in order) and each one's draws, on the CPU."""
        indices = torch.as_tensor(list(self.sampler), dtype=torch.long)
        gen = torch.Generator().manual_seed(worker_seed(self.seed, self.epoch, self.rank, self.stream))
        return indices, self.data.augmentation.draw(len(indices), self.data.size, gen)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, params = self.plan()
        dev = self.data.device
        indices, params = indices.to(dev, non_blocking=True), params.to(dev, non_blocking=True)
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = indices[sl]
            x = augment(self.data.images.index_select(0, idx), params[sl], self.data.augmentation)
            yield x, self.data.targets.index_select(0, idx)


def use_device_pipeline(pipeline: str, dataset: Dataset, device: torch.device) -> bool:
    """Whether ``dataset`` goes through :class:`DeviceLoader`: ``device`` insists (one-line ValueError when the
    dataset cannot), ``loader`` never, ``auto`` for CIFAR-kind data on CUDA."""
    if pipeline not in PIPELINES:
        raise ValueError(f"data_pipeline must be one of {', '.join(PIPELINES)}; got {pipeline!r}")
    if pipeline == "loader" or (pipeline == "auto" and device.type != "cuda"):
        return False
    try:
        _source(dataset)
    except UnsupportedDataset as err:
        if pipeline == "device":
            raise UnsupportedDataset(f"data_pipeline: device cannot serve this dataset: {err}") from None
        return False
    return True


def make_batches(dataset: Dataset, batch_size: int, *, pipeline: str, device: torch.device, seed: int,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 num_workers: int = 0, stream: int = 0) -> Any:
    """The loops' one way to get batches: a :class:`DeviceLoader` or ``make_loader``'s DataLoader, as
    ``pipeline`` and :func:`use_device_pipeline` decide. ``shuffle=False`` is the test transform's order."""
    if use_device_pipeline(pipeline, dataset, device):
        return DeviceLoader(DeviceDataset(dataset, device), batch_size, seed=seed, shuffle=shuffle, rank=rank,
                            world_size=world_size, drop_last=drop_last, stream=stream)
    return make_loader(dataset, batch_size, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size,
                       num_workers=num_workers, drop_last=drop_last, pin_memory=device.type == "cuda")
