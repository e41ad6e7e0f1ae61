"""Sweep definitions (``tune_configs/*.yaml``): loaded with ``yaml.safe_load`` and validated before Ray starts.

A preset file looks like::

    name: smoke                  # default experiment name
    search:                      # the base search config: SearchConfig fields (method, dataset, epochs, ...)
      method: pcdarts
      dataset: synthetic
      epochs: 2
    grid:                        # optional: key -> values; their cartesian product gives the configuration groups
      k: [2, 4]
    seeds: [0, 1, 2]             # every group runs once per seed
    resources: {cpu: 1, gpu: 0}  # per trial (fractional GPUs allowed)
    max_concurrent_trials: 2
    evaluate:                    # optional: EvalConfig fields for evaluation trials, plus seeds/top_k/random_baseline
      epochs: 5

``--set key=value`` overrides use dotted paths (``search.k=8``, ``seeds=[0,1]``, ``evaluate.epochs=3``); values are
parsed as YAML scalars/lists. Every key is checked; the first problem is one ``ValueError`` line.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from pcdarts_core.config import SearchConfig, search_config_from_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "tune_configs"
TOP_LEVEL_KEYS = {"name", "description", "search", "grid", "seeds", "resources", "max_concurrent_trials",
                  "evaluate", "hpo", "failure", "distributed"}


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

    def groups(self) -> list[dict[str, Any]]:
        """One search-config dict per grid point (without the seed)."""
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)) if keys else [()]:
            cfg = dict(self.search)
            cfg.update(zip(keys, values))
            out.append(cfg)
        return out

    def search_config(self, overrides: Mapping[str, Any] | None = None, seed: int | None = None) -> SearchConfig:
        values = dict(self.search)
        values.update(overrides or {})
        if seed is not None:
            values["seed"] = seed
        return search_config_from_dict(values)


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


def _apply(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"--set {'.'.join(path)}: {part} is not a section")
        node = nxt
    node[path[-1]] = value


def load_preset(name_or_path: str = "local", sets: Sequence[str] = ()) -> Preset:
    """Load, override and validate a preset. Raises ``ValueError``/``FileNotFoundError`` with one line."""
    path = preset_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep config must be a mapping")
    raw = copy.deepcopy(raw)
    for key_path, value in parse_set(sets):
        if key_path[0] not in TOP_LEVEL_KEYS and len(key_path) == 1:
            key_path = ["search", *key_path]  # --set k=8 means search.k=8
        _apply(raw, key_path, value)
    return preset_from_dict(raw, default_name=path.stem, where=str(path))


def preset_from_dict(raw: Mapping[str, Any], default_name: str = "sweep", where: str = "config") -> Preset:
    unknown = set(raw) - TOP_LEVEL_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    search = raw.get("search") or {}
    if not isinstance(search, dict):
        raise ValueError(f"{where}: 'search' must be a mapping of search settings")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"{where}: 'grid' must map each key to a non-empty list of values")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise ValueError(f"{where}: 'seeds' must be a count or a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}: 'seeds' has duplicates")
    if "seed" in grid or "seed" in search:
        raise ValueError(f"{where}: set seeds with the top-level 'seeds' list, not in search/grid")
    resources = dict(raw.get("resources") or {"cpu": 1, "gpu": 0})
    bad = set(resources) - {"cpu", "gpu"}
    if bad or not all(isinstance(v, (int, float)) and v >= 0 for v in resources.values()):
        raise ValueError(f"{where}: 'resources' takes cpu and gpu amounts >= 0")
    resources.setdefault("cpu", 1)
    resources.setdefault("gpu", 0)
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
                    description=str(raw.get("description") or ""), raw=dict(raw))
    # Validate every configuration group now, before Ray starts.
    for group in preset.groups():
        try:
            search_config_from_dict({**group, "seed": seeds[0]})
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return preset
