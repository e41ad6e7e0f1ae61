"""Typed, frozen configurations with the papers' defaults, validated once when they are built.

``search_config(method, dataset, **overrides)`` layers: the PC-DARTS CIFAR-10 defaults (Xu et al., Sec. 4.1),
then the dataset's (ImageNet search: K=2, batch 1024, lr 0.5, Sec. 4.3), then the search space's (NAS-Bench-201:
C=16, N=5), then the method's (e.g. DARTS: K=1, batch 64, arch lr 3e-4), then the caller's overrides. Every unknown key or impossible value raises
``ValueError`` with a one-line reason.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .compilation import COMPILE_MODES
from .data import AUGMENTS
from .device_data import PIPELINES

DATASET_NAMES = ("cifar10", "cifar100", "imagenet", "imagenet16-120", "synthetic")
DEVICES = ("cpu", "cuda", "auto")


#: method name -> its ``SearchMethod``: filled by ``pcdarts_core.methods`` (which the package imports), so this
#: module never imports the methods, which import it.
METHODS: dict[str, Any] = {}


def register_method(name: str, method: Any) -> None:
    METHODS[name] = method


def get_method(name: str) -> Any:
    """The method called ``name``; ``ValueError`` naming the known methods otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class MethodOptions:
    """Base of each method's own options (a method with none uses this)."""


@dataclass(frozen=True)
class SearchConfig:
    method: str = "pcdarts"
    dataset: str = "cifar10"
    search_space: str = "darts"  # darts | nb201 | s1 | s2 | s3 | s4 (pcdarts_core.spaces)
    nb201_benchmark: str | None = None  # NAS-Bench-201 file: bench_acc_<dataset> of each epoch's derived cell
    data_dir: str | None = None
    epochs: int = 50
    batch_size: int = 256
    lr: float = 0.1
    lr_min: float = 0.0
    lr_warmup_epochs: int = 0  # linear lr warm-up (PC-DARTS ImageNet: 5 epochs)
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: float = 6e-4
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    warmup_epochs: int = 15  # epochs with the arch frozen (PC-DARTS: 15 of 50 on CIFAR)
    init_channels: int = 16
    layers: int = 8
    k: int = 4
    edge_norm: bool = True
    channel_sampling: str = "fixed"  # 'fixed' (official slice) or 'random' (a fresh sample each step)
    execution: str = "fused"  # 'fused' (ops batched over edges) or 'reference' (one mixed op per edge, official)
    order: str = "first"  # 'first' or 'second' (DARTS unrolled)
    train_portion: float = 0.5
    seed: int = 0  # the search's seed: weights, arch init, data order, channel sampling
    data_seed: int = 0  # the dataset's own draw (synthetic data, ImageNet subsets): fixed across search seeds
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    num_workers: int = 0
    data_pipeline: str = "auto"  # 'loader', 'device' (batches made on the device) or 'auto' (device on CUDA)
    compile: str = "none"  # torch.compile mode: 'none', 'default', 'reduce-overhead', 'max-autotune'
    image_size: int | None = None  # None: the dataset's own size
    synthetic_samples: int | tuple[int, int] | None = None  # train size, or (train, test) sizes
    augment: str = "standard"  # search data: 'standard' (crop + flip) or 'autoaugment' (+ AutoAugment CIFAR-10 policy)
    cutout: int = 0  # cutout length on the search data (0: none; sharpDARTS searches with 16)
    steps_per_epoch: int | None = None  # cap the steps of an epoch (quick runs, tests)
    eval_steps: int | None = None  # cap the validation batches of an epoch
    # read the step statistics every N steps (a progress record, divergence caught then); 0: once per epoch,
    # the only host read of an epoch's steps (each read makes the host wait for the device)
    progress_every: int = 0
    hessian_every: int = 0  # RobustDARTS: dominant Hessian eigenvalue every N epochs (0: off)
    early_stop: bool = False  # DARTS-ES on that eigenvalue (needs hessian_every > 0)
    options: MethodOptions = field(default_factory=MethodOptions)

    def __post_init__(self) -> None:
        method = get_method(self.method)
        if not isinstance(self.options, method.options_type):
            raise ValueError(f"options for method {self.method!r} must be {method.options_type.__name__}")
        _check_common(self)
        from .spaces import get_space

        get_space(self.search_space).validate(self, method)
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be in [0, epochs={self.epochs}): "
                             f"the arch would never be trained")
        if not 0 < self.train_portion < 1:
            raise ValueError(f"train_portion must be in (0, 1), got {self.train_portion}")
        if self.k > 1 and self.order == "second" and self.channel_sampling == "random":
            raise ValueError("second-order updates need a fixed channel slice (channel_sampling='fixed')")
        _choice("channel_sampling", self.channel_sampling, ("fixed", "random"))
        _choice("execution", self.execution, ("fused", "reference"))
        _choice("order", self.order, ("first", "second"))
        _choice("augment", self.augment, AUGMENTS)
        if self.augment == "autoaugment" and self.dataset not in ("cifar10", "cifar100"):
            raise ValueError(f"augment 'autoaugment' is AutoAugment's CIFAR-10 policy, for CIFAR images; "
                             f"dataset {self.dataset!r} uses 'standard'")
        if self.cutout < 0:
            raise ValueError(f"cutout must be >= 0, got {self.cutout}")
        if len(self.arch_betas) != 2:
            raise ValueError(f"arch_betas must be two numbers in [0, 1), got {self.arch_betas}")
        if self.hessian_every < 0 or (self.early_stop and self.hessian_every == 0):
            raise ValueError("early_stop (DARTS-ES) needs hessian_every > 0")
        method.validate(self)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        d["arch_betas"] = list(self.arch_betas)
        d["options"] = dataclasses.asdict(self.options)
        return d


@dataclass(frozen=True)
class EvalConfig:
    """Training a derived cell from scratch (DARTS Sec. 4.2 / PC-DARTS Sec. 4.1 protocol)."""

    dataset: str = "cifar10"
    search_space: str = "darts"  # which evaluation network: DARTS's (darts, s1-s4) or NAS-Bench-201's
    data_dir: str | None = None
    epochs: int = 600
    batch_size: int = 96
    lr: float = 0.025
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    init_channels: int = 36
    layers: int = 20
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path: float = 0.3
    cutout: int = 16
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    num_workers: int = 0
    data_pipeline: str = "auto"
    compile: str = "none"
    image_size: int | None = None
    synthetic_samples: int | tuple[int, int] | None = None
    steps_per_epoch: int | None = None
    eval_steps: int | None = None

    def __post_init__(self) -> None:
        _check_common(self)
        from .spaces import get_space

        get_space(self.search_space).check_eval(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass(frozen=True)
class Range:
    """An accepted interval of a numeric setting; ``str()`` writes it as ``[low, high]`` / ``(low, high)``."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        return ((value > self.low if self.low_open else value >= self.low)
                and (value < self.high if self.high_open else value <= self.high))

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        return f"{'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}{')' if self.high_open else ']'}"


#: The accepted range of every numeric setting of both configs. Values outside, NaN and infinities are refused
#: when a config is built, with the range in the message. The upper bounds are far above any published setting
#: (the papers use lr <= 0.5, batch <= 1024, epochs <= 600) and catch typos such as ``lr=1e30`` before a run.
RANGES: dict[str, Range] = {
    "epochs": Range(1, 10_000),
    "batch_size": Range(1, 2**20),
    "lr": Range(0, 10, low_open=True),
    "lr_min": Range(0, 10),
    "lr_warmup_epochs": Range(0, 10_000),
    "momentum": Range(0, 1, high_open=True),
    "weight_decay": Range(0, 1),
    "grad_clip": Range(0, 1e6, low_open=True),
    "arch_lr": Range(0, 10, low_open=True),
    "arch_betas": Range(0, 1, high_open=True),
    "arch_weight_decay": Range(0, 1),
    "warmup_epochs": Range(0, 10_000),
    "init_channels": Range(1, 4096),
    "layers": Range(1, 1000),
    "k": Range(1, 4096),
    "seed": Range(0, 2**32 - 1),
    "data_seed": Range(0, 2**32 - 1),
    "num_workers": Range(0, 1024),
    "image_size": Range(1, 4096),
    "synthetic_samples": Range(10, 10_000_000),
    "steps_per_epoch": Range(1, 10**9),
    "eval_steps": Range(1, 10**9),
    "progress_every": Range(0, 10**9),
    "hessian_every": Range(0, 10_000),
    "auxiliary_weight": Range(0, 100),
    "drop_path": Range(0, 1, high_open=True),
    "label_smoothing": Range(0, 1, high_open=True),
    "cutout": Range(0, 4096),
}


def check_range(name: str, value: Any, accepted: Range | None) -> None:
    """One-line ``ValueError`` (naming the range) unless ``value`` is a finite number inside ``accepted``."""
    finite = not isinstance(value, bool) and isinstance(value, (int, float)) and (
        not isinstance(value, float) or math.isfinite(value))
    if not finite or (accepted is not None and value not in accepted):
        shown = repr(value) if len(repr(value)) <= 24 else repr(value)[:20] + "..."
        what = f"in {accepted}" if finite else "a finite number" + (f" in {accepted}" if accepted else "")
        raise ValueError(f"{name} must be {what}, got {shown}")


def _check_ranges(cfg: Any) -> None:
    """Every number of ``cfg`` in its range, and finite (float fields without a range here too)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if (f.name in RANGES and v is not None) or isinstance(v, float):
                check_range(f.name, v, RANGES.get(f.name))


def _check_common(cfg: SearchConfig | EvalConfig) -> None:
    _choice("dataset", cfg.dataset, DATASET_NAMES)
    _choice("device", cfg.device, DEVICES)
    _check_ranges(cfg)
    if cfg.lr_min > cfg.lr:
        raise ValueError(f"need lr_min <= lr, got lr={cfg.lr}, lr_min={cfg.lr_min}")
    _choice("data_pipeline", cfg.data_pipeline, PIPELINES)
    _choice("compile", cfg.compile, COMPILE_MODES)
    if cfg.data_pipeline == "device" and cfg.dataset == "imagenet":
        raise ValueError("data_pipeline: device serves CIFAR-kind datasets (cifar10, cifar100, synthetic); "
                         "imagenet uses the loader")
    if cfg.data_pipeline == "device" and cfg.num_workers:
        raise ValueError("data_pipeline: device makes batches without DataLoader workers: set num_workers: 0")


# -- building configs from plain dicts (YAML, CLI --set, Tune) --------------------------------------------------
def _coerce(name: str, value: Any, default: Any) -> Any:
    """Coerce YAML/CLI values to the type of the field's default, refusing what does not fit."""
    if default is None:
        return value
    if value is None:
        raise ValueError(f"{name} needs a value, got an empty one")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            check_range(name, value if isinstance(value, float) else number, RANGES.get(name))
        return number
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ValueError(f"{name} must be a list of {len(default)} values, got {value!r}")
        return tuple(_coerce(name, v, d) for v, d in zip(value, default))
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def _unknown(kind: str, key: str, known: list[str]) -> ValueError:
    hint = difflib.get_close_matches(key, known, n=1)
    return ValueError(f"unknown {kind} key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


_OPTIONAL_INT = {"image_size", "synthetic_samples", "steps_per_epoch", "eval_steps"}
_OPTIONAL_STR = {"data_dir", "nb201_benchmark"}


def _fields_from(cls: type, values: Mapping[str, Any], kind: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(kind, key, list(fields))
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        if key == "synthetic_samples" and isinstance(value, (list, tuple)):
            default = (0, 0)
        elif key in _OPTIONAL_INT and value is not None:
            default = 0
        if key in _OPTIONAL_STR and value is not None:
            value = str(value)
        out[key] = _coerce(key, value, default)
    return out


def search_config(method: str = "pcdarts", dataset: str = "cifar10", **overrides: Any) -> SearchConfig:
    """The papers' settings for ``method`` on ``dataset``, with ``overrides`` on top (validated)."""
    m = get_method(method)
    raw_options = overrides.pop("options", None) or {}
    method_defaults = dict(m.defaults(dataset))
    default_options = method_defaults.pop("options", None) or {}  # the method's option values for this dataset
    values: dict[str, Any] = {"method": method, "dataset": dataset}
    values.update(DATASET_SEARCH_DEFAULTS.get(dataset, {}))
    values.update(_space_defaults("search", overrides.get("search_space"), dataset))
    values.update(method_defaults)
    values.update(overrides)
    values = _fields_from(SearchConfig, values, "search config")
    if not isinstance(raw_options, Mapping):
        raise ValueError("options must be a mapping of method options")
    opts = _fields_from(m.options_type, {**default_options, **raw_options}, f"{method} option")
    try:
        values["options"] = m.options_type(**opts)
    except TypeError as err:
        raise ValueError(f"bad {method} options: {err}") from None
    return SearchConfig(**values)


def search_config_from_dict(values: Mapping[str, Any]) -> SearchConfig:
    """``search_config`` from one flat mapping with ``method`` and ``dataset`` inside (YAML, Tune configs)."""
    values = dict(values)
    return search_config(str(values.pop("method", "pcdarts")), str(values.pop("dataset", "cifar10")), **values)


def eval_config(dataset: str = "cifar10", **overrides: Any) -> EvalConfig:
    values: dict[str, Any] = {"dataset": dataset}
    values.update(DATASET_EVAL_DEFAULTS.get(dataset, {}))
    values.update(_space_defaults("eval", overrides.get("search_space"), dataset))
    values.update(overrides)
    return EvalConfig(**_fields_from(EvalConfig, values, "evaluation config"))


def _space_defaults(which: str, space: Any, dataset: str) -> dict[str, Any]:
    """The search space's defaults (NAS-Bench-201's C=16, N=5 skeleton and training recipe), between the
    dataset's and the method's; an unknown space is reported when the config is validated."""
    from .spaces import SPACES

    return SPACES[space].defaults(which, dataset) if space in SPACES else {}


#: PC-DARTS ImageNet search (Sec. 4.3): 8 GPUs, batch 1024, lr 0.5 with warm-up, arch lr 6e-3, K=2, 35 frozen epochs.
DATASET_SEARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "imagenet": {"k": 2, "batch_size": 1024, "lr": 0.5, "lr_warmup_epochs": 5, "arch_lr": 6e-3,
                 "warmup_epochs": 35},
    # The offline dataset is for quick CPU runs: small and short by default.
    "synthetic": {"epochs": 10, "warmup_epochs": 3, "batch_size": 64, "init_channels": 8, "layers": 5,
                  "lr": 0.05, "arch_lr": 3e-3},
}

#: DARTS ImageNet evaluation (Sec. 4.3): C=48, 14 layers, 250 epochs, wd 3e-5, label smoothing 0.1, no drop path.
DATASET_EVAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "imagenet": {"init_channels": 48, "layers": 14, "epochs": 250, "batch_size": 128, "lr": 0.1,
                 "weight_decay": 3e-5, "label_smoothing": 0.1, "drop_path": 0.0, "cutout": 0},
    "synthetic": {"init_channels": 8, "layers": 5, "epochs": 10, "batch_size": 64, "lr": 0.05, "cutout": 0,
                  "drop_path": 0.1},
}


def global_config(values: Mapping[str, Any], lr_reference_batch: int | None = None) -> SearchConfig:
    """A data-parallel run's config (``batch_size`` = global batch), with ``lr``/``lr_min`` scaled linearly from
    ``lr_reference_batch`` to ``batch_size`` when one is given (Goyal et al.'s rule)."""
    cfg = search_config_from_dict(values)
    scale = cfg.batch_size / lr_reference_batch if lr_reference_batch else 1.0
    return dataclasses.replace(cfg, lr=cfg.lr * scale, lr_min=cfg.lr_min * scale) if scale != 1.0 else cfg


def rank_config(cfg: SearchConfig, world_size: int, device: str | None = None) -> SearchConfig:
    """What one of ``world_size`` ranks runs: ``batch_size // world_size`` samples per step, and the lr scaled by
    (batch actually processed) / (global batch), which is 1 whenever ``world_size`` divides the batch."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    per_rank = cfg.batch_size // world_size
    if per_rank < 1:
        raise ValueError(f"batch_size={cfg.batch_size} (global) is smaller than the {world_size} data-parallel "
                         f"workers: each needs at least one sample per step")
    changes: dict[str, Any] = {}
    if world_size > 1:
        changes["batch_size"] = per_rank
        scale = per_rank * world_size / cfg.batch_size
        if scale != 1.0:
            changes.update(lr=cfg.lr * scale, lr_min=cfg.lr_min * scale)
    if device is not None and device != cfg.device:
        changes["device"] = device
    return dataclasses.replace(cfg, **changes) if changes else cfg
