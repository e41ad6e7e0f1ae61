"""Presets (``tune_configs/*.yaml``, the README's *Presets*): loaded with ``yaml.safe_load``, overridden by ``--set``
(:func:`apply_sets`) and validated once, before Ray starts; every problem is one ``ValueError`` line naming the key."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, InstanceOf, PrivateAttr,
                      ValidationError, ValidationInfo, model_validator)

from pcdarts_core.config import EvalConfig, SearchConfig, eval_config, search_config_from_dict

from .cli import did_you_mean

CONFIG_DIR = Path(__file__).resolve().parent.parent / "tune_configs"


class Section(BaseModel):
    """A preset section: a problem is one ``ValueError`` line naming the key (validators' messages start with it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=False)

    @classmethod
    def parse(cls, values: Mapping[str, Any], where: str, **context: Any) -> Any:
        """``where``: the section's key (``hpo``), "" for the top level; ``context``: what validators need."""
        try:
            return cls.model_validate(dict(values), context=context)
        except ValidationError as err:
            first = err.errors()[0]
            key, message = ".".join(map(str, first["loc"])), first["msg"].removeprefix("Value error, ")
            if first["type"] == "extra_forbidden":
                raise ValueError(f"unknown {where or 'top-level'} key {key!r}{did_you_mean(key, cls.model_fields)}; "
                                 f"known: {', '.join(cls.model_fields)}") from None
            if first["type"] != "value_error":  # pydantic's own words: say what was given
                message = f"{key}: {message}, got {first.get('input')!r}"
            raise ValueError(f"{where}{'.' if key else ': '}{message}" if where else message) from None


#: at most this many seeds per sweep (each is a search), and seeds below 2**32 (numpy's and CUDA's seed range)
MAX_SEEDS = 10_000
MAX_SEED = 2**32 - 1


def _seeds(seeds: Any) -> tuple[int, ...]:
    """A count (``3``: seeds 0, 1, 2) or a list of distinct seeds, bounded before anything is built."""
    if type(seeds) is int and not 1 <= seeds <= MAX_SEEDS:
        raise ValueError(f"seeds must be a count in [1, {MAX_SEEDS}] or a list of seeds, got {seeds}")
    seeds = list(range(seeds)) if type(seeds) is int else seeds
    if not isinstance(seeds, (list, tuple)) or not 1 <= len(seeds) <= MAX_SEEDS or \
            not all(type(s) is int and 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"seeds must be a count or a list of 1 to {MAX_SEEDS} integers in [0, {MAX_SEED}]")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds has duplicates")
    return tuple(seeds)


def _resources(res: dict[str, float]) -> dict[str, float]:
    res = {"cpu": 1, "gpu": 0} | res
    if set(res) != {"cpu", "gpu"}:
        raise ValueError(f"resources takes cpu and gpu, not {', '.join(sorted(set(res) - {'cpu', 'gpu'}))}")
    if res["cpu"] <= 0 and res["gpu"] <= 0:
        raise ValueError("resources: a trial needs some cpu or gpu")
    if res["gpu"] > 1 and res["gpu"] != int(res["gpu"]):
        raise ValueError(f"resources.gpu: more than one GPU per trial must be a whole number, got {res['gpu']}")
    return res


def _workers(value: Any) -> int | tuple[int, int]:
    """``4``, ``"4"``, ``[2, 8]`` or ``"2-8"`` (elastic: at least 2, at most 8 workers)."""
    pair = isinstance(value, (list, tuple)) and len(value) == 2
    match = re.fullmatch(r"\s*(-?\d+)\s*(?:[-:,]\s*(-?\d+)\s*)?", "{}-{}".format(*value) if pair else str(value))
    if not match:
        raise ValueError(f"num_workers must be an integer N or a range MIN-MAX, got {value!r}")
    low, high = int(match[1]), int(match[2] or match[1])
    if low < 1 and match[2] is None:
        raise ValueError(f"num_workers must be >= 1, got {low}")
    if not 1 <= low <= high:
        raise ValueError(f"num_workers range must satisfy 1 <= MIN <= MAX, got {low}-{high}")
    return (low, high) if low != high else low


Int = Annotated[int, Field(strict=True)]  # not a bool, float or string
Seeds = Annotated[tuple[int, ...], BeforeValidator(_seeds)]
Resources = Annotated[dict[str, Annotated[float, Field(strict=True, ge=0)]], AfterValidator(_resources)]


class FailureSpec(Section):
    """``failure:``: a crashing trial is retried ``max_failures`` times from its last checkpoint, then failed."""

    max_failures: Int = Field(2, ge=-1)  # -1: retry forever
    fail_fast: bool = False  # stop the whole sweep at the first trial that fails for good
    checkpoints_to_keep: Int | None = Field(5, ge=1)  # per trial (None: all; see the README's resume notes)


class EvaluateSpec(Section):
    """``evaluate:``: genotypes retrained under one protocol (its other keys, defaulting to the search's data)."""

    config: InstanceOf[EvalConfig]  # the protocol (seed is set per evaluation trial)
    seeds: Seeds = (0,)
    top_k: Int | None = Field(None, ge=1)  # per group: the k searches with the best val_acc; None: every search
    consensus: bool = True
    random_baseline: Int = Field(0, ge=0)
    genotypes: Annotated[tuple[str, ...], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = ()
    after_sweep: bool = False
    resources: Resources
    max_concurrent_trials: Int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _protocol(cls, raw: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        search = {"dataset": "cifar10", "search_space": "darts", **info.context["search"]}
        protocol = {k: v for k, v in raw.items() if k not in cls.model_fields or k == "config"}
        spec = {k: v for k, v in raw.items() if k not in protocol and v is not None}
        if "seed" in protocol:
            raise ValueError("set evaluation seeds with the 'seeds' list, not 'seed'")
        dataset = str(protocol.pop("dataset", search["dataset"]))
        if search.get("data_dir") is not None and dataset == search["dataset"]:
            protocol.setdefault("data_dir", search["data_dir"])
        # the search space names its cells' evaluation network
        return {**spec, "config": eval_config(dataset, **{"search_space": search["search_space"], **protocol})}

    @model_validator(mode="after")
    def _genotypes(self) -> EvaluateSpec:
        from pcdarts_core.genotypes import load_genotype

        for name in self.genotypes:  # published names or genotype files
            load_genotype(name)  # ValueError (one line) for unknown names and bad files
        return self


class DistributedOptions(Section):
    """The ``distributed:`` section of a preset (and the CLI flags that override it)."""

    # an int, or (min, max) for an elastic worker group
    num_workers: Annotated[int | tuple[int, int], BeforeValidator(_workers)] = 1
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, le=1024)  # Ray CPUs per worker; torch uses that many threads
    max_failures: Int = Field(3, ge=-1)  # worker-group restarts from the last checkpoint (-1: forever)
    lr_reference_batch: Int | None = Field(None, ge=1)  # lr was tuned for this global batch: scale linearly
    checkpoints_to_keep: Int = Field(2, ge=1)

    elastic = property(lambda self: not isinstance(self.num_workers, int))
    min_workers = property(lambda self: self.num_workers[0] if self.elastic else self.num_workers)
    max_workers = property(lambda self: self.num_workers[1] if self.elastic else self.num_workers)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> "DistributedOptions":
        """Validated options from a preset's section; ``overrides`` that are not None win (CLI flags)."""
        return cls.parse({**dict(values or {}), **{k: v for k, v in overrides.items() if v is not None}}, "distributed")

    def scaling_config(self) -> Any:
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                             resources_per_worker={"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})})


PARAM_KINDS = ("loguniform", "uniform", "int", "choice")


class ParamSpec(Section):
    """One tuned search setting: ``kind`` in loguniform/uniform (floats), int (inclusive bounds), choice."""

    name: str
    kind: Literal[PARAM_KINDS]
    values: tuple[Any, ...]  # (low, high), or the choices

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "int":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper bound is exclusive
        return tune.choice(list(self.values)) if self.kind == "choice" else getattr(tune, self.kind)(*self.values)

    @classmethod
    def of(cls, name: str, spec: Any, search: Mapping[str, Any]) -> ParamSpec:
        """From ``{kind: [low, high]}`` or ``{choice: [...]}``, each bound or choice a valid setting in ``search``."""
        where = f"space.{name}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ValueError(f"{where} must be one of {{loguniform: [lo, hi]}}, {{uniform: [lo, hi]}}, "
                             "{int: [lo, hi]}, {choice: [...]}")
        (kind, values), = spec.items()
        if kind not in PARAM_KINDS:
            raise ValueError(f"{where} has unknown distribution {kind!r}; known: {', '.join(PARAM_KINDS)}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.{kind} must be a non-empty list")
        if kind != "choice":
            if len(values) != 2 or not all(type(v) in ((int,) if kind == "int" else (int, float)) for v in values):
                raise ValueError(f"{where}.{kind} must be [low, high]" + (" (integers)" if kind == "int" else ""))
            if not (0 if kind == "loguniform" else -math.inf) < values[0] < values[1] < math.inf:
                raise ValueError(f"{where} bounds need finite low < high{' and low > 0' * (kind == 'loguniform')}, "
                                 f"got {values}")
            values = [v if kind == "int" else float(v) for v in values]
        for point in values:
            try:
                search_config_from_dict({**search, name: point})
            except ValueError as err:
                raise ValueError(f"{where}={point!r}: {err}") from None
        return cls(name=name, kind=kind, values=tuple(values))


def _space(space: Any, info: ValidationInfo) -> list[ParamSpec]:
    if not isinstance(space, dict) or not space:
        raise ValueError("space must map search settings to distributions, e.g. "
                         "arch_lr: {loguniform: [1.0e-4, 1.0e-2]}")
    if "seed" in space:
        raise ValueError("space cannot tune 'seed': seeds are what stability is measured over")
    return [ParamSpec.of(str(name), spec, info.context["search"]) for name, spec in space.items()]


class HpoSpec(Section):
    """``hpo:``: Optuna over search settings; a configuration's mean val_acc and stability are measured over seeds."""

    space: Annotated[tuple[ParamSpec, ...], BeforeValidator(_space)]
    num_samples: Int = Field(8, ge=1)
    seeds: Seeds = (0, 1, 2)
    max_concurrent_trials: Int = Field(0, ge=0)
    scheduler: Literal["asha", "none"] = "asha"  # ASHA on the running mean val_acc, per seed
    grace_period: Int = Field(1, ge=1)  # seeds every configuration completes before ASHA may stop it
    reduction_factor: Int = Field(2, ge=2)
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"  # tpe: multi-objective TPE
    seed: Int = Field(0, ge=0)  # the sampler's seed
    resources: Resources
    study_storage: str | None = None  # an Optuna storage URL; default: sqlite under the experiment dir

    @model_validator(mode="after")
    def _checks(self) -> HpoSpec:
        if self.study_storage is not None and "://" not in self.study_storage:
            raise ValueError("study_storage must be an Optuna storage URL such as sqlite:///path/study.db")
        if len(self.seeds) < 2:
            raise ValueError("seeds needs at least 2 seeds: stability is measured between seeds")
        if self.grace_period > len(self.seeds):
            raise ValueError(f"grace_period ({self.grace_period}) exceeds the {len(self.seeds)} seeds")
        return self


class Preset(Section):
    """A sweep: groups (``search`` x ``configurations`` x ``grid``) x ``seeds``; other sections are parsed on use."""

    name: str = "sweep"
    description: str = ""
    search: dict[str, Any] = {}
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = {}
    configurations: tuple[dict[str, Any], ...] = ()
    seeds: Seeds = (0,)
    resources: Resources = {"cpu": 1, "gpu": 0}
    max_concurrent_trials: Int = Field(0, ge=0)  # 0: as many as resources allow
    evaluate: dict[str, Any] = {}
    hpo: dict[str, Any] = {}
    failure: dict[str, Any] = {}
    distributed: dict[str, Any] = {}
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _sections(self) -> Preset:
        if "seed" in self.grid or "seed" in self.search or any("seed" in c for c in self.configurations):
            raise ValueError("set seeds with the top-level 'seeds' list, not in search/grid/configurations")
        for group in self.groups():
            search_config_from_dict({**group, "seed": self.seeds[0]})
        self.failure_spec()
        DistributedOptions.from_mapping(self.distributed)
        if self.evaluate:
            self.evaluation()
        if self.hpo:
            self.hpo_spec()
        return self

    raw = property(lambda self: self._raw)  # the preset as written (with --set applied)

    def groups(self) -> list[dict[str, Any]]:
        """One search-config dict per configuration and grid point (without the seed)."""
        points = itertools.product(self.configurations or ({},), itertools.product(*self.grid.values()))
        groups = [{**self.search, **base, **dict(zip(self.grid, values))} for base, values in points]
        return [group for i, group in enumerate(groups) if group not in groups[:i]]

    def group_keys(self) -> list[str]:
        """The settings that tell the groups apart (grid keys and the configurations' keys), in first-seen order."""
        return list(dict.fromkeys([k for conf in self.configurations for k in conf] + list(self.grid)))

    def search_config(self, overrides: Mapping[str, Any] | None = None, seed: int | None = None) -> SearchConfig:
        return search_config_from_dict({**self.search, **(overrides or {}), **({} if seed is None else {"seed": seed})})

    def failure_spec(self) -> FailureSpec:
        return FailureSpec.parse(self.failure, "failure")

    def _trials(self, cls: type[Section], key: str) -> Any:
        """Section ``key`` (``evaluate``, ``hpo``): its trials' resources and concurrency default to the preset's."""
        return cls.parse({"resources": self.resources, "max_concurrent_trials": self.max_concurrent_trials,
                          **getattr(self, key)}, key, search=self.search)

    def evaluation(self) -> EvaluateSpec:
        return self._trials(EvaluateSpec, "evaluate")

    def hpo_spec(self) -> HpoSpec:
        """The ``hpo:`` section (``ValueError`` when the preset has none)."""
        if not self.hpo:
            raise ValueError(f"preset {self.name!r} has no 'hpo' section: add one (see tune_configs/local.yaml)")
        return self._trials(HpoSpec, "hpo")


def check_resources(per_trial: Mapping[str, float], available: Mapping[str, float], where: str = "resources") -> None:
    """One line when a single trial asks for more CPUs or GPUs than the whole cluster has."""
    for key, label in (("cpu", "CPU"), ("gpu", "GPU")):
        want, have = float(per_trial.get(key, 0) or 0), float(available.get(label, 0) or 0)
        if want > have + 1e-9:
            raise ValueError(f"{where}: a trial asks for {want:g} {label}(s) but the cluster has {have:g}; "
                             f"lower {where}.{key} or add nodes")


def check_data(preset: Preset) -> None:
    """Every dataset the sweep's searches and evaluations read is present (else a one-line ``DatasetError``)."""
    from pcdarts_core.data import check_dataset

    pairs = [(str(group.get("dataset", "cifar10")), group.get("data_dir")) for group in preset.groups()]
    if preset.evaluate:  # (the protocol defaults to the search's data; it is built only when there is one)
        protocol = preset.evaluation().config
        pairs.append((protocol.dataset, protocol.data_dir))
    for dataset, data_dir in dict.fromkeys(pairs):
        check_dataset(dataset, data_dir)


def apply_sets(raw: dict[str, Any], sets: Sequence[str], section: str = "search") -> dict[str, Any]:
    """``raw`` with each ``--set key.sub=value`` (a YAML value) applied; ``k=8`` means ``{section}.k=8`` unless ``k`` is
    a top-level key, and a search key that is a grid axis replaces that axis (``k=1``: k=1 only; ``k=[1,2]``: both)."""
    for text in sets:
        key, equals, value = text.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"--set expects key=value, got {text!r}")
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--set {key}: cannot parse value {value!r}") from None
        path = key.strip().split(".")
        path = [section, *path] if len(path) == 1 and path[0] not in Preset.model_fields else path
        grid = raw.get("grid") if len(path) == 2 and path[0] == "search" else None
        if isinstance(grid, dict) and path[1] in grid:
            scalar_axis = not isinstance(grid[path[1]], list) or not any(isinstance(v, list) for v in grid[path[1]])
            path, value = ["grid", path[1]], value if isinstance(value, list) and scalar_axis else [value]
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {'.'.join(path)}: {part} is not a section")
        node[path[-1]] = value
    return raw


def load_preset(name_or_path: str = "local", sets: Sequence[str] = ()) -> Preset:
    """A preset (a name in ``tune_configs/`` or a YAML file) with ``sets`` applied, validated; errors are one line."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ValueError(f"unknown preset {name_or_path!r}; known presets: {known}")
    elif not path.is_file():
        raise FileNotFoundError(f"sweep config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep config must be a mapping")
    where = f"{path} with --set" if sets else str(path)  # with --set, a bad value may be the override's: name both
    return preset_from_dict(apply_sets(raw, sets), default_name=path.stem, where=where)


def preset_from_dict(raw: Mapping[str, Any], default_name: str = "sweep", where: str = "config") -> Preset:
    """A validated preset from a mapping (an empty key, None, takes its default); errors start with ``where``."""
    try:
        preset = Preset.parse({"name": default_name, **{k: v for k, v in raw.items() if v is not None}}, "")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    preset._raw = dict(raw)
    return preset
