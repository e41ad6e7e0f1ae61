"""ImageNet16-120 (Dong & Yang, ICLR 2020, Sec. 2.2): the 16x16 downsampled ImageNet (Chrabaszcz, Loshchilov and
Hutter, 2017) restricted to its labels 1..120.

The published files (``train_data_batch_1`` ... ``train_data_batch_10`` and ``val_data`` from image-net.org's
``Imagenet16_train.zip`` / ``Imagenet16_val.zip``) are Python pickles of ``{'data': uint8 (N, 768) array,
'labels': [1-based ints], 'mean': array}``. They are never handed to :func:`pickle.load`: a restricted unpickler
admits only plain containers, numbers, strings and numpy arrays/dtypes (any other global, i.e. anything that could
run code, is refused), and arrays of Python objects are refused too. A ``.npz`` conversion of a file (``data``
and ``labels`` arrays, read with ``allow_pickle=False``) is used instead of it when present.

Images are stored channel-major (768 = 3 planes of 16x16); the benchmark keeps labels 1..120 and trains on
``label - 1``. Its training set is all training batches; its test images are ``val_data``'s.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

TRAIN_PATTERN = re.compile(r"^train_data_batch_(\d+)$")
VAL_FILE = "val_data"
IMAGE_SIZE = 16
MAX_FILE_BYTES = 2 * 1024 ** 3

#: the only globals a downsampled-ImageNet pickle may name: numpy's array and dtype reconstruction
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes (a codec call on a string)
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and plain containers")


def _read_pickle(path: str) -> Any:
    if os.path.getsize(path) > MAX_FILE_BYTES:
        raise ValueError(f"{path}: too large for a downsampled-ImageNet batch")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a downsampled-ImageNet batch ({first[:160]})") from None


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(data uint8 (N, 768), labels int64 (N,))`` of one file: ``path + '.npz'`` when it exists, else the
    pickle at ``path`` through the restricted unpickler."""
    if os.path.isfile(path + ".npz"):
        try:
            with np.load(path + ".npz", allow_pickle=False) as z:
                entry: Any = {"data": z["data"], "labels": z["labels"]}
        except (ValueError, KeyError, OSError) as err:
            raise ValueError(f"{path}.npz: not a downsampled-ImageNet batch ({str(err).splitlines()[0][:160]})") \
                from None
    else:
        entry = _read_pickle(path)
    if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
        raise ValueError(f"{path}: expected a dict with 'data' and 'labels'")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry["labels"])
    if data.dtype == object or labels.dtype == object:
        raise ValueError(f"{path}: arrays of Python objects are refused")
    if data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE or labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: expected data (N, 768) and N labels, got {list(data.shape)} and "
                         f"{list(labels.shape)}")
    return data.astype(np.uint8, copy=False), labels.astype(np.int64)


def split_files(root: str, train: bool) -> list[str]:
    """The training batches (numeric order) or ``val_data`` under ``root``; ``.npz`` conversions count."""
    if not train:
        return [os.path.join(root, VAL_FILE)]
    names = {n[:-4] if n.endswith(".npz") else n for n in os.listdir(root)}
    batches = sorted((int(m.group(1)), n) for n in names if (m := TRAIN_PATTERN.match(n)))
    return [os.path.join(root, n) for _, n in batches]


def missing_file(root: str) -> str | None:
    """The first file (or folder) that ImageNet16 needs under ``root`` and lacks, or None."""
    if not os.path.isdir(root):
        return root
    if not split_files(root, True):
        return os.path.join(root, "train_data_batch_1")
    val = os.path.join(root, VAL_FILE)
    return None if os.path.isfile(val) or os.path.isfile(val + ".npz") else val


def load_split(root: str, train: bool, num_classes: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """HWC uint8 images and 0-based targets of the split, keeping labels 1..``num_classes``."""
    parts = [read_batch(p) for p in split_files(root, train)]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    keep = (labels >= 1) & (labels <= num_classes)
    images = data[keep].reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels[keep] - 1


class ImageNet16(Dataset):
    """One split of ImageNet16-``num_classes`` in memory; ``transform`` gets a PIL image as torchvision's do."""

    def __init__(self, root: str, train: bool, transform: Callable | None = None, num_classes: int = 120):
        self.images, targets = load_split(root, train, num_classes)
        self.targets = targets.tolist()
        self.classes = [str(c) for c in range(num_classes)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img: Any = Image.fromarray(self.images[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]
