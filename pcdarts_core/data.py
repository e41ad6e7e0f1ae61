"""Datasets, search splits and loaders for the DARTS family (pure PyTorch/torchvision; no Ray).

- CIFAR-10/100 through torchvision's own classes, with DARTS's transforms (Liu et al., ICLR 2019) and its search
  split: the first half of the training set trains the weights, the second half the architecture.
- ImageNet through :class:`torchvision.datasets.ImageFolder`, with PC-DARTS's search subsets (Xu et al., ICLR
  2020, Sec. 4.3): 10% of each class's images for the weights and a disjoint 2.5% for the architecture.
- ImageNet16-120 (NAS-Bench-201's third dataset) from the published 16x16 downsampled-ImageNet files, read by
  :mod:`pcdarts_core.imagenet16` without unpickling arbitrary objects; NAS-Bench-201's augmentation.
- ``synthetic``: a procedurally generated, learnable 10-class dataset that needs no download (see
  :func:`synthetic_images`), for CPU runs and tests.

Every loader goes through a :class:`~torch.utils.data.DistributedSampler`, so single-process and data-parallel
runs share one code path and an epoch's order depends only on ``(seed, epoch)``: that is what makes exact resume
possible.

The CIFAR files are read by torchvision; the ImageNet16 pickles only through a restricted unpickler that admits
numpy arrays and plain containers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets, transforms

from .config import AUGMENTS
from . import imagenet16

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetInfo",
    "Cutout",
    "EvalData",
    "SearchData",
    "SyntheticDataset",
    "check_dataset",
    "eval_data",
    "make_loader",
    "per_class_subsets",
    "search_data",
    "set_epoch",
    "synthetic_images",
]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGENET_URL = "https://image-net.org/download.php"


@dataclass(frozen=True)
class DatasetInfo:
    """What callers need to build a network for a dataset, and how to get the data when it is missing."""

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    needs_download: bool
    how_to_get: str


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10",
        10,
        32,
        # DARTS's utils.py constants.
        (0.49139968, 0.48215827, 0.44653124),
        (0.24703233, 0.24348505, 0.26158768),
        True,
        f"download the Python version from {CIFAR_URL} and extract it so that <root>/cifar-10-batches-py exists",
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        100,
        32,
        # P-DARTS's constants.
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        True,
        f"download the Python version from {CIFAR_URL} and extract it so that <root>/cifar-100-python exists",
    ),
    "imagenet": DatasetInfo(
        "imagenet",
        1000,
        224,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        True,
        f"get ILSVRC2012 from {IMAGENET_URL} and lay it out as <root>/train/<class>/*.JPEG and "
        "<root>/val/<class>/*.JPEG (the same class folders in both)",
    ),
    "imagenet16-120": DatasetInfo(
        "imagenet16-120",
        120,
        16,
        # NAS-Bench-201's constants (xautodl get_dataset_with_transform.py).
        (122.68 / 255, 116.66 / 255, 104.01 / 255),
        (63.22 / 255, 61.26 / 255, 65.09 / 255),
        True,
        f"get Imagenet16_train.zip and Imagenet16_val.zip (16x16 downsampled ImageNet) from {IMAGENET_URL} and "
        "put train_data_batch_1..10 and val_data (or their .npz conversions) in <root>",
    ),
    "synthetic": DatasetInfo(
        "synthetic",
        10,
        16,
        # Measured over 2000 generated images (seed 0); close enough for every seed and size.
        (0.5, 0.5, 0.5),
        (0.34, 0.34, 0.34),
        False,
        "nothing to get: it is generated on the fly from a seed",
    ),
}


class DatasetError(ValueError):
    """A dataset is missing or unreadable. The message is one line: the path, and how to get the data."""


# --------------------------------------------------------------------------------------------------------------
# Checks


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


_CIFAR_CLASSES: dict[str, type[datasets.CIFAR10]] = {
    "cifar10": datasets.CIFAR10,
    "cifar100": datasets.CIFAR100,
}


def _missing(info: DatasetInfo, path: str) -> DatasetError:
    return DatasetError(f"{info.name} data not found at {path}: {info.how_to_get}")


def check_dataset(name: str, root: str | None) -> None:
    """Fail early, in one line, when ``name`` is unknown (ValueError) or its files are missing (DatasetError).

    Only presence is checked here (cheap); torchvision verifies the CIFAR checksums when the data is loaded.
    """
    info = _info(name)
    if not info.needs_download:
        return
    if root is None:
        raise DatasetError(f"{name} needs a data root (root=None given): {info.how_to_get}")
    root = os.path.expanduser(str(root))
    if name in _CIFAR_CLASSES:
        cls = _CIFAR_CLASSES[name]
        folder = os.path.join(root, cls.base_folder)
        if not os.path.isdir(folder):
            raise _missing(info, folder)
        for file_name in [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]:
            path = os.path.join(folder, file_name)
            if not os.path.isfile(path):
                raise _missing(info, path)
    elif name == "imagenet16-120":
        missing = imagenet16.missing_file(root)
        if missing is not None:
            raise _missing(info, missing)
    else:  # imagenet
        for split in ("train", "val"):
            path = os.path.join(root, split)
            if not os.path.isdir(path):
                raise _missing(info, path)
            with os.scandir(path) as entries:
                if not any(e.is_dir() for e in entries):
                    raise _missing(info, os.path.join(path, "<class>"))


# --------------------------------------------------------------------------------------------------------------
# Transforms


class Cutout:
    """DARTS's cutout (DeVries & Taylor, 2017): zero one ``length`` x ``length`` square of a CHW tensor.

    The square's centre is uniform over the image and the square is clipped at the border, as in DARTS; it is
    applied after normalization, so the square becomes the mean colour. The centre is drawn from torch's RNG (not
    NumPy's, as DARTS did), so seeded and resumed runs reproduce it.
    """

    def __init__(self, length: int):
        if length <= 0:
            raise ValueError(f"cutout length must be positive, got {length}")
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy = int(torch.randint(h, ()).item())
        cx = int(torch.randint(w, ()).item())
        half = self.length // 2
        y0, y1 = max(cy - half, 0), min(cy + half, h)
        x0, x1 = max(cx - half, 0), min(cx + half, w)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0.0
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(length={self.length})"


def _normalize(info: DatasetInfo) -> transforms.Normalize:
    return transforms.Normalize(info.mean, info.std)


def _cifar_transforms(info: DatasetInfo, cutout: int, augment: str = "standard") -> tuple[Callable, Callable]:
    """DARTS's ``_data_transforms_cifar10``: crop with 4-pixel padding, flip, normalize; cutout after that.

    ``augment='autoaugment'`` is sharpDARTS's ``--autoaugment`` (``cnn/utils.py``): the padding is grey (fill 128)
    and torchvision's AutoAugment with the CIFAR-10 policy runs after the flip, before normalization.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}; got {augment!r}")
    if augment == "autoaugment":
        train = [
            transforms.RandomCrop(32, padding=4, fill=128),
            transforms.RandomHorizontalFlip(),
            transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10),
        ]
    else:
        train = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    train += [transforms.ToTensor(), _normalize(info)]
    if cutout > 0:
        train.append(Cutout(cutout))
    test = transforms.Compose([transforms.ToTensor(), _normalize(info)])
    return transforms.Compose(train), test


def _with_cutout(transform: Callable, cutout: int) -> Callable:
    """``transform``, then DARTS's cutout on its tensor output when ``cutout > 0``."""
    return transforms.Compose([transform, Cutout(cutout)]) if cutout > 0 else transform


def _imagenet16_transforms(info: DatasetInfo) -> tuple[Callable, Callable]:
    """NAS-Bench-201's ImageNet16 augmentation: flip, crop with 2-pixel padding, normalize."""
    train = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.RandomCrop(16, padding=2),
                                transforms.ToTensor(), _normalize(info)])
    return train, transforms.Compose([transforms.ToTensor(), _normalize(info)])


def _imagenet_train_transform(info: DatasetInfo, size: int) -> Callable:
    """DARTS's ``train_imagenet.py`` and PC-DARTS's ImageNet search use the same training augmentation."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2),
            transforms.ToTensor(),
            _normalize(info),
        ]
    )


def _imagenet_test_transform(info: DatasetInfo, size: int) -> Callable:
    """Resize 256 + centre crop 224 (scaled in proportion for other sizes)."""
    return transforms.Compose(
        [
            transforms.Resize(round(size * 256 / 224)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            _normalize(info),
        ]
    )


# --------------------------------------------------------------------------------------------------------------
# CIFAR


class _UnverifiedCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 reader with the md5 checks off (``md5=None`` means "exists" to torchvision)."""

    train_list = [[f, None] for f, _ in datasets.CIFAR10.train_list]
    test_list = [[f, None] for f, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _UnverifiedCIFAR100(datasets.CIFAR100):
    """torchvision's CIFAR-100 reader with the md5 checks off."""

    train_list = [[f, None] for f, _ in datasets.CIFAR100.train_list]
    test_list = [[f, None] for f, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}


_UNVERIFIED: dict[str, type[datasets.CIFAR10]] = {"cifar10": _UnverifiedCIFAR10, "cifar100": _UnverifiedCIFAR100}


def _cifar(name: str, root: str, train: bool, transform: Callable, verify: bool) -> datasets.CIFAR10:
    cls = _CIFAR_CLASSES[name] if verify else _UNVERIFIED[name]
    try:
        return cls(os.path.expanduser(str(root)), train=train, transform=transform, download=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted ..." (md5 mismatch or missing file)
        folder = os.path.join(str(root), cls.base_folder)
        raise DatasetError(
            f"{name} data at {folder} failed torchvision's md5 check (corrupted or incomplete): "
            f"{DATASETS[name].how_to_get}"
        ) from None


def _check_cifar_size(name: str, image_size: int | None) -> None:
    if image_size is not None and image_size != 32:
        raise ValueError(f"{name} images are 32 px; image_size={image_size} is not supported")


def _split_indices(n: int, train_portion: float) -> tuple[list[int], list[int]]:
    """DARTS's search split: indices [0, split) train the weights, [split, n) the architecture."""
    if not 0.0 < train_portion < 1.0:
        raise ValueError(f"train_portion must be in (0, 1), got {train_portion}")
    split = int(math.floor(train_portion * n))
    if split == 0 or split == n:
        raise ValueError(f"train_portion={train_portion} leaves one side of the split of {n} images empty")
    return list(range(split)), list(range(split, n))


# --------------------------------------------------------------------------------------------------------------
# ImageNet


def _image_folder(info: DatasetInfo, path: str, transform: Callable) -> datasets.ImageFolder:
    try:
        return datasets.ImageFolder(path, transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise DatasetError(f"{info.name} data at {path} is unreadable ({e}); {info.how_to_get}") from None


def per_class_subsets(
    targets: Sequence[int], fractions: tuple[float, float], seed: int
) -> tuple[list[int], list[int]]:
    """PC-DARTS's ImageNet search data: a random ``fractions[0]`` of each class for the weights and a disjoint
    random ``fractions[1]`` of each class for the architecture (10% and 2.5% in the paper).

    Counts are ``floor(fraction * class size)``, at least one image each. Drawn from ``seed`` alone: the same
    seed gives the same indices. Returns sorted index lists.
    """
    fw, fa = fractions
    if fw <= 0 or fa <= 0 or fw + fa > 1:
        raise ValueError(f"imagenet_fractions must be positive and sum to at most 1, got {fractions}")
    labels = torch.as_tensor(list(targets), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    weight_idx: list[int] = []
    arch_idx: list[int] = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        n = len(members)
        nw, na = max(1, int(fw * n)), max(1, int(fa * n))
        if nw + na > n:
            raise ValueError(f"class {c} has {n} images, too few for disjoint subsets of {nw} and {na}")
        chosen = members[torch.randperm(n, generator=g)]
        weight_idx += chosen[:nw].tolist()
        arch_idx += chosen[nw : nw + na].tolist()
    return sorted(weight_idx), sorted(arch_idx)


# --------------------------------------------------------------------------------------------------------------
# Synthetic


def _synthetic_sizes(synthetic_samples: int | tuple[int, int] | None) -> tuple[int, int]:
    if synthetic_samples is None:
        return 2000, 1000
    if isinstance(synthetic_samples, int):
        train, test = synthetic_samples, max(10, synthetic_samples // 2)
    else:
        train, test = synthetic_samples
    if train < 10 or test < 10:
        raise ValueError(f"synthetic_samples must give at least 10 train and 10 test images, got {synthetic_samples}")
    return train, test


def synthetic_images(n: int, *, image_size: int = 16, seed: int = 0, noise: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (N, 3, S, S) in [0, 1]-ish and balanced labels 0-9, generated from ``seed`` alone.

    Each image is one pattern at a random position and scale, in a random foreground colour on a random
    background colour with a random linear gradient, plus Gaussian pixel noise. The class is the pattern's
    *shape*: horizontal, vertical, diagonal and anti-diagonal stripes, a checkerboard, a disk, a ring, a plus,
    a triangle, an X. Colours are random (foreground differs from background by 0.3-0.7 per channel), so the
    mean colour says nothing about the class. Measured (defaults: 2000 train / 1000 test, 16 px, 2 CPU cores):
    a linear model on mean colour scores chance (9.8%), one on raw pixels 10.2%; a 3-layer CNN (16/32/32
    channels, Adam, batch 64, through :func:`make_loader` with shifts) 86% after 15 epochs (80% with data seed
    1; seconds); a PC-DARTS supernet (C=8, 3 layers, K=4, batch 32, first-order, arch frozen for 3 epochs)
    42% after 6 epochs and 57% after 8 (about 10 minutes). Stripe periods are 3.6-5.2 px at 16 px, so
    orientation needs spatial filters, and shapes at random positions need pooling/invariance: conv and pool
    choices both matter. Flips would turn diagonal into anti-diagonal stripes, so augment with shifts only.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if image_size < 8:
        raise ValueError(f"synthetic image_size must be at least 8, got {image_size}")
    g = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    s = image_size
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1  # pixel centres in [-1, 1]
    y, x = coords.view(1, s, 1), coords.view(1, 1, s)
    cx, cy = uniform(-0.4, 0.4, n, 1, 1), uniform(-0.4, 0.4, n, 1, 1)
    r = uniform(0.45, 0.65, n, 1, 1)  # half-size of the pattern, in image half-widths
    u, v = (x - cx) / r, (y - cy) / r  # pattern coordinates: the pattern lives in [-1, 1]^2
    freq = 2 * math.pi / uniform(0.45, 0.65, n, 1, 1)  # stripe period in image coordinates
    phase, phase2 = uniform(0, 2 * math.pi, n, 1, 1), uniform(0, 2 * math.pi, n, 1, 1)
    window = (u.abs() <= 1) & (v.abs() <= 1)
    radius = (u * u + v * v).sqrt()
    diag = math.sqrt(2)
    masks = torch.stack(
        [
            window & (torch.sin(freq * y + phase) > 0),
            window & (torch.sin(freq * x + phase) > 0),
            window & (torch.sin(freq * (x + y) / diag + phase) > 0),
            window & (torch.sin(freq * (x - y) / diag + phase) > 0),
            window & (torch.sin(freq * x + phase) * torch.sin(freq * y + phase2) > 0),
            radius <= 1,
            (radius <= 1) & (radius >= 0.55),
            ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1)),
            (v <= 1) & (u.abs() <= (v + 1) / 2),
            window & (((u - v).abs() <= 0.4) | ((u + v).abs() <= 0.4)),
        ],
        dim=1,
    )
    mask = masks[torch.arange(n), labels].unsqueeze(1).float()
    background = torch.rand(n, 3, 1, 1, generator=g)
    foreground = (background + uniform(0.3, 0.7, n, 3, 1, 1)) % 1.0
    gx, gy = uniform(-0.25, 0.25, n, 3, 1, 1), uniform(-0.25, 0.25, n, 3, 1, 1)
    background = background + gx * x.unsqueeze(1) + gy * y.unsqueeze(1)
    images = background * (1 - mask) + foreground * mask + noise * torch.randn(n, 3, s, s, generator=g)
    return images, labels


class SyntheticDataset(Dataset):
    """Normalized synthetic images held in memory, with an optional tensor transform applied per item.

    The training transform (a random shift by up to 2 px, zero i.e. mean-colour padding) draws from torch's
    RNG, so seeded and resumed runs reproduce it.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Callable | None = None):
        self.images = images
        self.targets = targets
        self.transform = transform
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


def _synthetic(n: int, image_size: int, seed: int, train: bool, cutout: int = 0) -> SyntheticDataset:
    info = DATASETS["synthetic"]
    # Train and test images come from different streams of the same seed.
    images, labels = synthetic_images(n, image_size=image_size, seed=2 * seed + (0 if train else 1))
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    images = (images - mean) / std
    transform = _with_cutout(transforms.RandomCrop(image_size, padding=2), cutout) if train else None
    return SyntheticDataset(images, labels, transform)


# --------------------------------------------------------------------------------------------------------------
# Public entry points


@dataclass(frozen=True)
class SearchData:
    """The two disjoint training subsets of a bilevel search: one trains the weights, the other the arch."""

    weight_set: Dataset
    arch_set: Dataset
    num_classes: int
    image_size: int


@dataclass(frozen=True)
class EvalData:
    """Training and test sets for training a derived network from scratch."""

    train_set: Dataset
    test_set: Dataset
    num_classes: int
    image_size: int


def search_data(
    name: str,
    root: str | None = None,
    *,
    seed: int = 0,
    train_portion: float = 0.5,
    image_size: int | None = None,
    imagenet_fractions: tuple[float, float] = (0.1, 0.025),
    synthetic_samples: int | tuple[int, int] | None = None,
    verify: bool = True,
    augment: str = "standard",
    cutout: int = 0,
) -> SearchData:
    """The weight and arch sets of a search, both with training augmentation (as DARTS and PC-DARTS do).

    CIFAR and synthetic: ``train_portion`` of the training set, in file order, trains the weights and the rest
    the arch (DARTS). ImageNet: PC-DARTS's per-class random subsets (``imagenet_fractions``) drawn from ``seed``.
    ``seed`` picks the data only (ImageNet subsets, synthetic images), not the search: pass a fixed one to hold
    the data constant across searches. ``synthetic_samples``: train size, or (train, test) sizes.
    ``verify=False`` skips torchvision's md5 checks of CIFAR files (only for small test files in the real format).
    ``augment``: 'standard' or 'autoaugment' (CIFAR only: sharpDARTS's search data); ``cutout``: DARTS's cutout
    length on both sets (0: none).
    """
    info = _info(name)
    check_dataset(name, root)
    if cutout < 0:
        raise ValueError(f"cutout must be >= 0, got {cutout}")
    if augment != "standard" and name not in _CIFAR_CLASSES:
        raise ValueError(f"augment {augment!r} is for CIFAR images; {name} uses 'standard'")
    if name in _CIFAR_CLASSES:
        assert root is not None
        _check_cifar_size(name, image_size)
        train_transform, _ = _cifar_transforms(info, cutout, augment)
        full = _cifar(name, root, True, train_transform, verify)
        w_idx, a_idx = _split_indices(len(full), train_portion)
        return SearchData(Subset(full, w_idx), Subset(full, a_idx), len(full.classes), 32)
    if name == "imagenet":
        assert root is not None
        size = image_size or info.image_size
        train_dir = os.path.join(os.path.expanduser(str(root)), "train")
        full = _image_folder(info, train_dir, _with_cutout(_imagenet_train_transform(info, size), cutout))
        w_idx, a_idx = per_class_subsets(full.targets, imagenet_fractions, seed)
        return SearchData(Subset(full, w_idx), Subset(full, a_idx), len(full.classes), size)
    if name == "imagenet16-120":
        assert root is not None
        full = imagenet16.ImageNet16(os.path.expanduser(str(root)), True, _imagenet16_transforms(info)[0])
        w_idx, a_idx = _split_indices(len(full), train_portion)
        return SearchData(Subset(full, w_idx), Subset(full, a_idx), info.num_classes, info.image_size)
    size = image_size or info.image_size
    n_train, _ = _synthetic_sizes(synthetic_samples)
    full = _synthetic(n_train, size, seed, train=True, cutout=cutout)
    w_idx, a_idx = _split_indices(len(full), train_portion)
    return SearchData(Subset(full, w_idx), Subset(full, a_idx), info.num_classes, size)


def eval_data(
    name: str,
    root: str | None = None,
    *,
    cutout: int = 16,
    image_size: int | None = None,
    synthetic_samples: int | tuple[int, int] | None = None,
    seed: int = 0,
    verify: bool = True,
) -> EvalData:
    """The full training set (with augmentation) and the test set, for training a derived network.

    CIFAR training adds ``cutout`` (16 px in DARTS/PC-DARTS; 0 turns it off). ImageNet uses ``root/train`` and
    ``root/val``, whose class folders must match. ``seed`` generates the synthetic images only.
    """
    info = _info(name)
    check_dataset(name, root)
    if cutout < 0:
        raise ValueError(f"cutout must be >= 0, got {cutout}")
    if name in _CIFAR_CLASSES:
        assert root is not None
        _check_cifar_size(name, image_size)
        train_transform, test_transform = _cifar_transforms(info, cutout)
        train = _cifar(name, root, True, train_transform, verify)
        test = _cifar(name, root, False, test_transform, verify)
        return EvalData(train, test, len(train.classes), 32)
    if name == "imagenet":
        assert root is not None
        size = image_size or info.image_size
        base = os.path.expanduser(str(root))
        train = _image_folder(info, os.path.join(base, "train"), _imagenet_train_transform(info, size))
        test = _image_folder(info, os.path.join(base, "val"), _imagenet_test_transform(info, size))
        if test.classes != train.classes:
            raise DatasetError(
                f"imagenet class folders differ between {os.path.join(base, 'train')} and "
                f"{os.path.join(base, 'val')}: {info.how_to_get}"
            )
        return EvalData(train, test, len(train.classes), size)
    if name == "imagenet16-120":
        assert root is not None
        base = os.path.expanduser(str(root))
        train_transform, test_transform = _imagenet16_transforms(info)
        return EvalData(imagenet16.ImageNet16(base, True, train_transform),
                        imagenet16.ImageNet16(base, False, test_transform), info.num_classes, info.image_size)
    size = image_size or info.image_size
    n_train, n_test = _synthetic_sizes(synthetic_samples)
    return EvalData(
        _synthetic(n_train, size, seed, train=True),
        _synthetic(n_test, size, seed, train=False),
        info.num_classes,
        size,
    )


# --------------------------------------------------------------------------------------------------------------
# Loaders


def _worker_seed(seed: int, epoch: int, rank: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_009 + rank) % (2**63)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over a DistributedSampler: rank ``rank`` of ``world_size`` gets its share, in an order that
    depends only on ``(seed, epoch)``.

    ``drop_last`` drops the ragged tail both across ranks (DistributedSampler) and in the last batch; without it
    the sampler pads by repeating indices so every rank gets the same count (a no-op for one rank).
    Worker processes' RNG (augmentation) is seeded from ``(seed, epoch, rank)``; with ``num_workers=0``
    augmentation draws from the process's global torch RNG, which a checkpoint must save to resume exactly.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(_worker_seed(seed, epoch, rank))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
    )
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle ``loader`` deterministically for ``epoch`` (and reseed its workers); call before each epoch."""
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler):
        raise TypeError("set_epoch needs a loader built by make_loader (a DistributedSampler)")
    sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(_worker_seed(sampler.seed, epoch, sampler.rank))
