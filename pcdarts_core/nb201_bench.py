"""NAS-Bench-201 lookup: the tabulated test accuracy of a cell, so that a search's derived cell needs no retraining.

The benchmark file (``NAS-Bench-201-v1_0-e61699.pth`` / ``-v1_1-096897.pth``, downloaded by the user) is a
``torch.save``'d dict: ``meta_archs`` (the 15,625 arch strings; list position = index), ``arch2infos``
(index -> ``{'less': ..., 'full': ArchResults state dict}``) and ``evaluated_indexes``. An ``ArchResults`` state dict
holds ``all_results``: ``(dataset, seed) -> ResultsCount`` state dicts with ``epochs`` and ``eval_acc1es``
(``'<set>@<epoch>' -> top-1 %``). As the benchmark's API (``get_more_info(..., hp='200', is_random=False)``),
the accuracy of a cell on a dataset is the mean over its seeds of the last epoch of the 200-epoch runs
(``full``) on the test set: ``ori-test`` of 'cifar10' (trained on train+valid), ``x-test`` of 'cifar100' and
'ImageNet16-120'. Values are returned as fractions (the benchmark's % / 100), like this project's accuracies.

The file is read with ``torch.load(weights_only=True)``, which admits tensors and plain containers (plus numpy's
data-only scalar/array constructors) and executes no code; a file it refuses is reported in one line. Loaded tables are cached per path and process.
"""

from __future__ import annotations

import numbers
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .nb201_arch import NB201Arch, parse_arch

#: our dataset name -> (the benchmark's dataset key, its test set)
BENCH_DATASETS: dict[str, tuple[str, str]] = {
    "cifar10": ("cifar10", "ori-test"),
    "cifar100": ("cifar100", "x-test"),
    "imagenet16-120": ("ImageNet16-120", "x-test"),
}


@dataclass(frozen=True)
class NB201Benchmark:
    """Test accuracy (fraction) per arch string and dataset."""

    accuracy: Mapping[str, Mapping[str, float]]

    def accuracies(self, arch: NB201Arch | str) -> dict[str, float]:
        """``{dataset: test accuracy}`` of ``arch`` for the datasets the file has; ``ValueError`` if unknown."""
        key = str(arch if isinstance(arch, NB201Arch) else parse_arch(arch))
        if key not in self.accuracy:
            raise ValueError(f"NAS-Bench-201 file has no results for {key}")
        return dict(self.accuracy[key])


def _mean_test_accuracy(results: Any, dataset: str, test_set: str) -> float | None:
    all_results = results.get("all_results") if isinstance(results, Mapping) else None
    if not isinstance(all_results, Mapping):
        return None
    accs = []
    for key, trial in all_results.items():
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] == dataset and isinstance(trial, Mapping)):
            continue
        evals, epochs = trial.get("eval_acc1es"), trial.get("epochs")
        if isinstance(evals, Mapping) and isinstance(epochs, numbers.Integral):
            value = evals.get(f"{test_set}@{int(epochs) - 1}")
            if isinstance(value, numbers.Real):
                accs.append(float(value))
    return sum(accs) / len(accs) / 100.0 if accs else None


def benchmark_from_dict(data: Any, where: str = "NAS-Bench-201 file") -> NB201Benchmark:
    """The lookup table of a loaded benchmark dict (layout in the module docstring)."""
    if not isinstance(data, Mapping) or not {"meta_archs", "arch2infos"} <= set(data):
        raise ValueError(f"{where}: not a NAS-Bench-201 file (expected a dict with meta_archs and arch2infos)")
    archs, infos = data["meta_archs"], data["arch2infos"]
    if not isinstance(archs, (list, tuple)) or not isinstance(infos, Mapping):
        raise ValueError(f"{where}: meta_archs must be a list and arch2infos a dict")
    table: dict[str, dict[str, float]] = {}
    for index, info in infos.items():
        if not isinstance(index, int) or not 0 <= index < len(archs) or not isinstance(info, Mapping):
            raise ValueError(f"{where}: arch2infos key {index!r} is not an index into meta_archs")
        try:
            key = str(parse_arch(archs[index]))
        except ValueError as err:
            raise ValueError(f"{where}: meta_archs[{index}]: {err}") from None
        accs = {ours: acc for ours, (theirs, test_set) in BENCH_DATASETS.items()
                if (acc := _mean_test_accuracy(info.get("full"), theirs, test_set)) is not None}
        table[key] = accs
    return NB201Benchmark(table)


def numpy_data_globals() -> list[Any]:
    """numpy's scalar/array/dtype constructors, which build data only: admitted besides torch's own safe set in
    case the benchmark's numbers were saved as numpy values."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "uint8", "bool")]
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


@lru_cache(maxsize=2)
def load_benchmark(path: str) -> NB201Benchmark:
    """Load (once per process) the benchmark file at ``path`` without executing code."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"NAS-Bench-201 file {path} not found (nb201_benchmark)")
    try:
        with torch.serialization.safe_globals(numpy_data_globals()):
            data = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's weights_only refusal names the culprit after "WeightsUnpickler error: "
        detail = str(err).partition("WeightsUnpickler error: ")[2].strip().splitlines()
        if detail and "global" in detail[0].lower():
            raise ValueError(f"{path}: refused to load: it holds objects other than tensors and plain "
                             f"containers, which could run code ({detail[0][:160]})") from None
        raise ValueError(f"{path}: not a readable torch file ({(detail or ['corrupted'])[0][:160]})") from None
    except Exception as err:  # torch raises many types here (RuntimeError, EOFError, OSError, ...)
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable torch file ({first})") from None
    return benchmark_from_dict(data, str(path))
