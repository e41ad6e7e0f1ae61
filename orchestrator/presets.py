"""Presets (``tune_configs/*.yaml``, the README's *Presets*): loaded with ``yaml.safe_load``, overridden by
``--set`` (:func:`apply_sets`: ``search.k=8`` or ``k=8``, ``seeds=[0,1]``, ``evaluate.epochs=3``; values parsed
as YAML) and validated once, before Ray starts. Every problem is one ``ValueError`` line naming the key.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pcdarts_core.config import EvalConfig, SearchConfig, eval_config, search_config_from_dict

from .cli import did_you_mean

CONFIG_DIR = Path(__file__).resolve().parent.parent / "tune_configs"
TOP_LEVEL_KEYS = {"name", "description", "search", "grid", "configurations", "seeds", "resources",
                  "max_concurrent_trials", "evaluate", "hpo", "failure", "distributed"}


@dataclass(frozen=True)
class Preset:
    name: str
    search: Mapping[str, Any]
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    resources: Mapping[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    max_concurrent_trials: int = 0  # 0: as many as resources allow
    evaluate: Mapping[str, Any] = field(default_factory=dict)
    hpo: Mapping[str, Any] = field(default_factory=dict)
    failure: Mapping[str, Any] = field(default_factory=dict)
    distributed: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    configurations: tuple[Mapping[str, Any], ...] = ()

    def groups(self) -> list[dict[str, Any]]:
        """One search-config dict per configuration and grid point (without the seed)."""
        keys = list(self.grid)
        out = []
        for base in self.configurations or ({},):
            for values in itertools.product(*(self.grid[k] for k in keys)) if keys else [()]:
                cfg = dict(self.search)
                cfg.update(base)
                cfg.update(zip(keys, values))
                if cfg not in out:
                    out.append(cfg)
        return out

    def group_keys(self) -> list[str]:
        """The settings that tell the groups apart (grid keys and the configurations' keys), in first-seen order."""
        keys: list[str] = []
        for conf in self.configurations:
            keys += [k for k in conf if k not in keys]
        return keys + [k for k in self.grid if k not in keys]

    def search_config(self, overrides: Mapping[str, Any] | None = None, seed: int | None = None) -> SearchConfig:
        values = dict(self.search)
        values.update(overrides or {})
        if seed is not None:
            values["seed"] = seed
        return search_config_from_dict(values)

    def failure_spec(self) -> FailureSpec:
        return failure_spec(self.failure)

    def evaluation(self) -> EvaluateSpec:
        """The ``evaluate:`` section: the evaluation protocol and what to evaluate (validated)."""
        return evaluate_spec(self.evaluate, self.search, self.resources, self.max_concurrent_trials)

    def hpo_spec(self) -> HpoSpec:
        """The ``hpo:`` section (``ValueError`` when the preset has none)."""
        if not self.hpo:
            raise ValueError(f"preset {self.name!r} has no 'hpo' section: add one (see tune_configs/local.yaml)")
        return hpo_spec(self.hpo, self.search, self.resources, self.max_concurrent_trials)

    def datasets(self) -> list[tuple[str, str | None]]:
        """The distinct (dataset, data_dir) pairs the sweep's searches and evaluations read."""
        out: list[tuple[str, str | None]] = []
        for group in self.groups():
            pair = (str(group.get("dataset", "cifar10")), group.get("data_dir"))
            if pair not in out:
                out.append(pair)
        if self.evaluate:
            cfg = self.evaluation().config
            if (cfg.dataset, cfg.data_dir) not in out:
                out.append((cfg.dataset, cfg.data_dir))
        return out


# -- the validation of every section ----------------------------------------------------------------------------
class Section(BaseModel):
    """A typed section of a preset, validated once at the boundary: unknown keys get "did you mean", values
    their ranges, NaN and infinities are refused, and every problem is one ``ValueError`` line naming the key."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=False)

    @classmethod
    def parse(cls, values: Mapping[str, Any], where: str) -> Any:
        try:
            return cls.model_validate(dict(values))
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"][:1])
            if first["type"] == "extra_forbidden":
                raise ValueError(f"unknown {where} key {key!r}{did_you_mean(key, cls.model_fields)}; known: "
                                 f"{', '.join(cls.model_fields)}") from None
            message = first["msg"].removeprefix("Value error, ")
            if first["type"] != "value_error":  # pydantic's own words: say what was given
                message += f", got {first.get('input')!r}"
            raise ValueError(f"{where}.{key}: {message}" if key else f"{where}: {message}") from None


# -- sections ----------------------------------------------------------------------------------------------------
class FailureSpec(Section):
    """``failure:``: a crashing trial is retried ``max_failures`` times from its last checkpoint, then failed.

    ``checkpoints_to_keep`` per trial (None: all). Tune deletes older ones as new ones arrive, while its
    experiment state (what a resumed sweep starts from) is saved every ~10 s: a driver killed outright (not
    Ctrl-C) may leave a state naming a checkpoint already deleted when epochs take under a few seconds, so
    keep all for such tiny runs.
    """

    max_failures: int = Field(2, ge=-1)  # -1: retry forever
    fail_fast: bool = False  # stop the whole sweep at the first trial that fails for good
    checkpoints_to_keep: int | None = Field(5, ge=1)


def failure_spec(raw: Mapping[str, Any]) -> FailureSpec:
    return FailureSpec.parse(raw, "failure")


EVALUATE_KEYS = {"seeds", "top_k", "consensus", "random_baseline", "genotypes", "after_sweep", "resources",
                 "max_concurrent_trials"}


@dataclass(frozen=True)
class EvaluateSpec:
    """``evaluate:``: retrain derived genotypes from scratch under one protocol, several seeds each."""

    config: EvalConfig  # the protocol (seed is set per evaluation trial)
    seeds: tuple[int, ...] = (0,)
    top_k: int | None = None  # per group: the k searches with the best val_acc; None: every search
    consensus: bool = True
    random_baseline: int = 0
    genotypes: tuple[str, ...] = ()
    after_sweep: bool = False
    resources: Mapping[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    max_concurrent_trials: int = 0


def evaluate_spec(raw: Mapping[str, Any], search: Mapping[str, Any], resources: Mapping[str, float],
                  max_concurrent_trials: int) -> EvaluateSpec:
    where = "evaluate"
    protocol = {k: v for k, v in raw.items() if k not in EVALUATE_KEYS}
    dataset = str(protocol.pop("dataset", search.get("dataset", "cifar10")))
    if "data_dir" not in protocol and search.get("data_dir") is not None and \
            dataset == search.get("dataset", "cifar10"):
        protocol["data_dir"] = search["data_dir"]
    if "seed" in protocol:
        raise ValueError(f"{where}: set evaluation seeds with the 'seeds' list, not 'seed'")
    protocol.setdefault("search_space", search.get("search_space", "darts"))  # its cells' evaluation network
    try:
        config = eval_config(dataset, **protocol)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    seeds = _seeds(raw.get("seeds", [0]), f"{where}.seeds")
    top_k = raw.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"{where}.top_k must be an integer >= 1, or null for every search")
    random_baseline = raw.get("random_baseline", 0)
    if not _is_int(random_baseline) or random_baseline < 0:
        raise ValueError(f"{where}.random_baseline must be an integer >= 0")
    for key in ("consensus", "after_sweep"):
        if not isinstance(raw.get(key, False), bool):
            raise ValueError(f"{where}.{key} must be true or false")
    genotypes = raw.get("genotypes") or []
    if isinstance(genotypes, str):
        genotypes = [genotypes]
    if not isinstance(genotypes, list) or not all(isinstance(g, str) for g in genotypes):
        raise ValueError(f"{where}.genotypes must be a list of published names or genotype files")
    from pcdarts_core.genotypes import load_genotype

    for name in genotypes:
        load_genotype(name)  # ValueError (one line) for unknown names and bad files
    res = _resources(raw.get("resources", resources), f"{where}.resources")
    conc = raw.get("max_concurrent_trials", max_concurrent_trials)
    if not _is_int(conc) or conc < 0:
        raise ValueError(f"{where}.max_concurrent_trials must be an integer >= 0")
    return EvaluateSpec(config, seeds, top_k, bool(raw.get("consensus", True)), random_baseline,
                        tuple(genotypes), bool(raw.get("after_sweep", False)), res, conc)


HPO_KEYS = {"num_samples", "seeds", "space", "max_concurrent_trials", "scheduler", "grace_period",
            "reduction_factor", "sampler", "seed", "resources", "study_storage"}
PARAM_KINDS = ("loguniform", "uniform", "int", "choice")


@dataclass(frozen=True)
class ParamSpec:
    """One tuned search setting: ``kind`` in loguniform/uniform (floats), int (inclusive bounds), choice."""

    name: str
    kind: str
    values: tuple[Any, ...]  # (low, high), or the choices

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "int":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper bound is exclusive
        return tune.choice(list(self.values))


@dataclass(frozen=True)
class HpoSpec:
    """``hpo:``: Optuna over search settings, two objectives per configuration measured over ``seeds``:
    the mean final val_acc (maximized) and the mean pairwise genotype distance between seeds (minimized)."""

    space: tuple[ParamSpec, ...]
    num_samples: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)
    max_concurrent_trials: int = 0
    scheduler: str = "asha"  # 'asha' (on the running mean val_acc, per seed) or 'none'
    grace_period: int = 1  # seeds every configuration completes before ASHA may stop it
    reduction_factor: int = 2
    sampler: str = "tpe"  # 'tpe' (multi-objective TPE), 'nsga2' or 'random'
    seed: int = 0  # the sampler's seed
    resources: Mapping[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    study_storage: str | None = None  # an Optuna storage URL; default sqlite under the experiment dir


def hpo_spec(raw: Mapping[str, Any], search: Mapping[str, Any], resources: Mapping[str, float],
             max_concurrent_trials: int) -> HpoSpec:
    where = "hpo"
    _known(where, raw, HPO_KEYS)
    space_raw = raw.get("space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise ValueError(f"{where}.space must map search settings to distributions, e.g. "
                         "arch_lr: {loguniform: [1.0e-4, 1.0e-2]}")
    space = tuple(_param(name, spec, search) for name, spec in space_raw.items())
    num_samples = raw.get("num_samples", 8)
    if not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"{where}.num_samples must be an integer >= 1")
    seeds = _seeds(raw.get("seeds", [0, 1, 2]), f"{where}.seeds")
    if len(seeds) < 2:
        raise ValueError(f"{where}.seeds needs at least 2 seeds: stability is measured between seeds")
    scheduler = raw.get("scheduler", "asha")
    if scheduler not in ("asha", "none"):
        raise ValueError(f"{where}.scheduler must be asha or none, got {scheduler!r}")
    sampler = raw.get("sampler", "tpe")
    if sampler not in ("tpe", "nsga2", "random"):
        raise ValueError(f"{where}.sampler must be tpe, nsga2 or random, got {sampler!r}")
    ints = {}
    for key, default, low in (("grace_period", 1, 1), ("reduction_factor", 2, 2), ("seed", 0, 0),
                              ("max_concurrent_trials", max_concurrent_trials, 0)):
        value = raw.get(key, default)
        if not _is_int(value) or value < low:
            raise ValueError(f"{where}.{key} must be an integer >= {low}")
        ints[key] = value
    if ints["grace_period"] > len(seeds):
        raise ValueError(f"{where}.grace_period ({ints['grace_period']}) exceeds the {len(seeds)} seeds")
    storage = raw.get("study_storage")
    if storage is not None and (not isinstance(storage, str) or "://" not in storage):
        raise ValueError(f"{where}.study_storage must be an Optuna storage URL such as sqlite:///path/study.db")
    return HpoSpec(space, num_samples, seeds, ints["max_concurrent_trials"], scheduler, ints["grace_period"],
                   ints["reduction_factor"], sampler, ints["seed"],
                   _resources(raw.get("resources", resources), f"{where}.resources"), storage)


def _param(name: Any, spec: Any, search: Mapping[str, Any]) -> ParamSpec:
    where = f"hpo.space.{name}"
    if name == "seed":
        raise ValueError("hpo.space cannot tune 'seed': seeds are what stability is measured over")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"{where} must be one of {{loguniform: [lo, hi]}}, {{uniform: [lo, hi]}}, "
                         "{int: [lo, hi]}, {choice: [...]}")
    (kind, values), = spec.items()
    if kind not in PARAM_KINDS:
        raise ValueError(f"{where}: unknown distribution {kind!r}; known: {', '.join(PARAM_KINDS)}")
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}.{kind} must be a non-empty list")
    if kind == "choice":
        points = list(values)
    else:
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{where}.{kind} must be [low, high]")
        low, high = values
        if kind == "int" and not (_is_int(low) and _is_int(high)):
            raise ValueError(f"{where}.int bounds must be integers")
        if not all(math.isfinite(v) for v in values) or not low < high:
            raise ValueError(f"{where}: need finite low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"{where}: loguniform needs low > 0")
        points = [low, high]
        values = [float(low), float(high)] if kind != "int" else [int(low), int(high)]
    for point in points:  # every bound/choice must give a valid search config on top of the base
        try:
            search_config_from_dict({**search, str(name): point})
        except ValueError as err:
            raise ValueError(f"{where}={point!r}: {err}") from None
    return ParamSpec(str(name), kind, tuple(values))


def _known(where: str, raw: Mapping[str, Any], known: set[str]) -> None:
    unknown = set(raw) - known
    if unknown:
        key = sorted(unknown, key=str)[0]
        raise ValueError(f"unknown {where} key {key!r}{did_you_mean(key, sorted(known))}; "
                         f"known: {', '.join(sorted(known))}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: at most this many seeds per sweep (each is a search), and seeds below 2**32 (numpy's and CUDA's seed range)
MAX_SEEDS = 10_000
MAX_SEED = 2**32 - 1


def _seeds(seeds: Any, where: str) -> tuple[int, ...]:
    """A count (``3``: seeds 0, 1, 2) or a list of distinct seeds, bounded before anything is built."""
    if _is_int(seeds) and not 1 <= seeds <= MAX_SEEDS:
        raise ValueError(f"{where} must be a count in [1, {MAX_SEEDS}] or a list of seeds, got {seeds}")
    if _is_int(seeds):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) and 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"{where} must be a count or a non-empty list of integers in [0, {MAX_SEED}]")
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"{where} lists {len(seeds)} seeds; at most {MAX_SEEDS}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{where} has duplicates")
    return tuple(seeds)


def _resources(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping like {{cpu: 1, gpu: 0}}")
    bad = set(raw) - {"cpu", "gpu"}
    if bad or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in raw.values()):
        raise ValueError(f"{where} takes cpu and gpu amounts >= 0")
    out = {"cpu": raw.get("cpu", 1), "gpu": raw.get("gpu", 0)}
    if out["cpu"] <= 0 and out["gpu"] <= 0:
        raise ValueError(f"{where}: a trial needs some cpu or gpu")
    if out["gpu"] > 1 and out["gpu"] != int(out["gpu"]):
        raise ValueError(f"{where}: more than one GPU per trial must be a whole number, got {out['gpu']}")
    return out


def check_resources(per_trial: Mapping[str, float], available: Mapping[str, float], where: str = "resources") -> None:
    """One line when a single trial asks for more CPUs or GPUs than the whole cluster has."""
    for key, label in (("cpu", "CPU"), ("gpu", "GPU")):
        want, have = float(per_trial.get(key, 0) or 0), float(available.get(label, 0) or 0)
        if want > have + 1e-9:
            raise ValueError(f"{where}: a trial asks for {want:g} {label}(s) but the cluster has {have:g}; "
                             f"lower {where}.{key} or add nodes")


def check_data(preset: Preset) -> None:
    """Every dataset the sweep reads is present (one-line ``DatasetError`` naming the path and how to get it)."""
    from pcdarts_core.data import check_dataset

    for dataset, data_dir in preset.datasets():
        check_dataset(dataset, data_dir)


def preset_path(name_or_path: str) -> Path:
    """A preset name from ``tune_configs/`` or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"sweep config {path} does not exist")
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"unknown preset {name_or_path!r}; known presets: {', '.join(known)}")
    return candidate


def parse_set(assignments: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``key.sub=value`` strings into (path, YAML-parsed value) pairs."""
    out = []
    for text in assignments:
        if "=" not in text:
            raise ValueError(f"--set expects key=value, got {text!r}")
        key, value = text.split("=", 1)
        if not key.strip():
            raise ValueError(f"--set has an empty key in {text!r}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise ValueError(f"--set {key}: cannot parse value {value!r}") from None
        out.append((key.strip().split("."), parsed))
    return out


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``raw[path[0]][path[1]]... = value`` for one ``--set``, creating sections as needed."""
    node = raw
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"--set {'.'.join(path)}: {part} is not a section")
        node = nxt
    node[path[-1]] = value


def apply_sets(raw: dict[str, Any], sets: Sequence[str], section: str = "search") -> dict[str, Any]:
    """``raw`` with every ``--set`` applied: a one-part key that is not a top-level key belongs to ``section``
    (``k=8`` means ``search.k=8``); a search key that is a grid axis replaces that axis (``k=1`` searches k=1
    only; ``k=[1,2]`` both), so a ``--set`` is never silently ignored."""
    for key_path, value in parse_set(sets):
        if key_path[0] not in TOP_LEVEL_KEYS and len(key_path) == 1:
            key_path = [section, *key_path]
        grid = raw.get("grid")
        if len(key_path) == 2 and key_path[0] == "search" and isinstance(grid, dict) and key_path[1] in grid:
            axis = grid[key_path[1]]
            scalar_axis = not any(isinstance(v, list) for v in axis) if isinstance(axis, list) else True
            key_path, value = ["grid", key_path[1]], value if isinstance(value, list) and scalar_axis else [value]
        apply_override(raw, key_path, value)
    return raw


def load_preset(name_or_path: str = "local", sets: Sequence[str] = ()) -> Preset:
    """Load, override and validate a preset. Raises ``ValueError``/``FileNotFoundError`` with one line."""
    path = preset_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep config must be a mapping")
    raw = apply_sets(copy.deepcopy(raw), sets)
    # with --set, a bad value may be the override's: name both
    return preset_from_dict(raw, default_name=path.stem, where=f"{path} with --set" if sets else str(path))


def preset_from_dict(raw: Mapping[str, Any], default_name: str = "sweep", where: str = "config") -> Preset:
    try:
        _known("top-level", raw, TOP_LEVEL_KEYS)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    search = raw.get("search") or {}
    if not isinstance(search, dict):
        raise ValueError(f"{where}: 'search' must be a mapping of search settings")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"{where}: 'grid' must map each key to a non-empty list of values")
    try:
        seeds = list(_seeds(raw.get("seeds", [0]), "seeds"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    configurations = raw.get("configurations") or []
    if not isinstance(configurations, list) or not all(isinstance(c, dict) for c in configurations):
        raise ValueError(f"{where}: 'configurations' must be a list of mappings of search settings")
    if "seed" in grid or "seed" in search or any("seed" in c for c in configurations):
        raise ValueError(f"{where}: set seeds with the top-level 'seeds' list, not in search/grid/configurations")
    try:
        resources = _resources(raw.get("resources") or {"cpu": 1, "gpu": 0}, "resources")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    max_conc = raw.get("max_concurrent_trials", 0)
    if not isinstance(max_conc, int) or max_conc < 0:
        raise ValueError(f"{where}: 'max_concurrent_trials' must be an integer >= 0")
    for section in ("evaluate", "hpo", "failure", "distributed"):
        if not isinstance(raw.get(section) or {}, dict):
            raise ValueError(f"{where}: '{section}' must be a mapping")
    preset = Preset(name=str(raw.get("name") or default_name), search=dict(search), grid=dict(grid),
                    seeds=tuple(seeds), resources=resources, max_concurrent_trials=max_conc,
                    evaluate=dict(raw.get("evaluate") or {}), hpo=dict(raw.get("hpo") or {}),
                    failure=dict(raw.get("failure") or {}), distributed=dict(raw.get("distributed") or {}),
                    description=str(raw.get("description") or ""), raw=dict(raw),
                    configurations=tuple(dict(c) for c in configurations))
    # Validate every configuration group and section now, before Ray starts.
    for group in preset.groups():
        try:
            search_config_from_dict({**group, "seed": seeds[0]})
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    try:
        preset.failure_spec()
        if preset.evaluate:
            preset.evaluation()
        if preset.hpo:
            preset.hpo_spec()
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return preset
