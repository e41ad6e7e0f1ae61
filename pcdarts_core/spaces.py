"""Search spaces by name: ``search_space: darts | nb201 | s1 | s2 | s3 | s4`` in search and evaluation configs.

- ``darts``: the DARTS cell (Liu et al., ICLR 2019): 8 ops on each of 14 edges, normal and reduction cells.
- ``s1``-``s4``: RobustDARTS's reduced DARTS spaces (Zela et al., ICLR 2020, ``src/spaces.py`` of
  automl/RobustDARTS): the same cells and supernet with fewer candidate ops per edge. S1 has its own pair of ops
  on each edge of each cell type, S2 {skip_connect, sep_conv_3x3}, S3 {none, skip_connect, sep_conv_3x3},
  S4 {noise, sep_conv_3x3} on every edge. Their derived cells are DARTS genotypes, evaluated in the DARTS networks.
- ``nb201``: NAS-Bench-201 (Dong & Yang, ICLR 2020): one 4-node cell, 6 edges, 5 ops, in the benchmark's own
  skeleton (:mod:`pcdarts_core.nb201`); a derived cell is an :class:`~pcdarts_core.nb201_arch.NB201Arch`.

A :class:`SearchSpace` builds a method's supernet and a derived cell's evaluation network, checks which methods
and settings it admits (one-line ``ValueError`` naming the reason), and adds per-epoch metrics (NAS-Bench-201's
tabulated accuracies when a benchmark file is configured).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from torch import nn

from .genotypes import random_genotype
from .nb201_arch import NB201_OPS, NB201Arch, random_arch
from .ops import PARAMETER_FREE_OPS, PRIMITIVES

if TYPE_CHECKING:
    from .config import EvalConfig, SearchConfig
    from .methods.base import SearchMethod

CELL_TYPES = ("normal", "reduce")
#: per-epoch metrics the spaces add that trial rows carry and the stability table summarizes (mean, CI)
TRIAL_METRIC_PREFIXES = ("bench_acc_", "param_free_share_")
EdgeOps = dict[str, list[tuple[str, ...]]]


# -- the DARTS cell and its reduced variants --------------------------------------------------------------------
def _every_edge(ops: Sequence[str]) -> EdgeOps:
    return {t: [tuple(ops)] * 14 for t in CELL_TYPES}


#: RobustDARTS S1 (``primitives_1``): the two ops DARTS ranked highest on each edge, per cell type.
S1_EDGE_OPS: EdgeOps = {
    "normal": [("skip_connect", "dil_conv_3x3"), ("skip_connect", "dil_conv_5x5"), ("skip_connect", "dil_conv_5x5"),
               ("skip_connect", "sep_conv_3x3"), ("skip_connect", "dil_conv_3x3"), ("max_pool_3x3", "skip_connect"),
               ("skip_connect", "sep_conv_3x3"), ("skip_connect", "sep_conv_3x3"), ("skip_connect", "dil_conv_3x3"),
               ("skip_connect", "sep_conv_3x3"), ("max_pool_3x3", "skip_connect"), ("skip_connect", "dil_conv_3x3"),
               ("dil_conv_3x3", "dil_conv_5x5"), ("dil_conv_3x3", "dil_conv_5x5")],
    "reduce": [("max_pool_3x3", "avg_pool_3x3"), ("max_pool_3x3", "dil_conv_3x3"), ("max_pool_3x3", "avg_pool_3x3"),
               ("max_pool_3x3", "avg_pool_3x3"), ("skip_connect", "dil_conv_5x5"), ("max_pool_3x3", "avg_pool_3x3"),
               ("max_pool_3x3", "sep_conv_3x3"), ("skip_connect", "dil_conv_3x3"), ("skip_connect", "dil_conv_5x5"),
               ("max_pool_3x3", "avg_pool_3x3"), ("max_pool_3x3", "avg_pool_3x3"), ("skip_connect", "dil_conv_5x5"),
               ("skip_connect", "dil_conv_5x5"), ("skip_connect", "dil_conv_5x5")],
}


def restrict(space_ops: EdgeOps, method_ops: Sequence[str], space: str) -> EdgeOps:
    """The space's per-edge ops without the DARTS ops a method leaves out on purpose (ROME drops `none`).

    Only `none` may go: a method whose op set lacks any other op of the space (sharpDARTS's official table has no
    dil_conv_3x3 or avg_pool_3x3, which S1 needs) is refused, as the space would no longer be the published one.
    """
    dropped = set(PRIMITIVES) - set(method_ops)
    out: EdgeOps = {}
    for t, edges in space_ops.items():
        out[t] = []
        for ops in edges:
            lost = sorted(op for op in ops if op in dropped and op != "none")
            if lost:
                raise ValueError(f"search space {space} needs {', '.join(lost)}, which this method's op set "
                                 f"({', '.join(method_ops)}) leaves out")
            out[t].append(tuple(op for op in ops if op not in dropped))
    return out


def darts_supernet(method: "SearchMethod", cfg: "SearchConfig", num_classes: int) -> nn.Module:
    """PC-DARTS's :class:`~pcdarts_core.supernet.SearchNetwork` with the method's weighting and the space's ops."""
    from .supernet import SearchNetwork

    return SearchNetwork(cfg.init_channels, num_classes, cfg.layers, k=cfg.k, edge_norm=cfg.edge_norm,
                         primitives=method.edge_primitives(cfg), channel_sampling=cfg.channel_sampling,
                         stem="imagenet" if cfg.dataset == "imagenet" else "cifar",
                         weighting=method.weighting(cfg), seed=cfg.seed, execution=cfg.execution)


def darts_eval_network(cfg: "EvalConfig", genotype: Any, num_classes: int) -> nn.Module:
    from .genotypes import Genotype
    from .model import NetworkCIFAR, NetworkImageNet

    if not isinstance(genotype, Genotype):
        raise ValueError(f"search space {cfg.search_space} evaluates DARTS genotypes, got a "
                         f"{type(genotype).__name__}; set search_space: nb201 for NAS-Bench-201 cells")
    cls = NetworkImageNet if cfg.dataset == "imagenet" else NetworkCIFAR
    return cls(cfg.init_channels, num_classes, cfg.layers, cfg.auxiliary, genotype)


def check_darts_shape(cfg: "SearchConfig") -> None:
    from .supernet import validate_supernet_shape

    validate_supernet_shape(cfg.init_channels, cfg.layers, cfg.k,
                            stem="imagenet" if cfg.dataset == "imagenet" else "cifar")


def check_darts_eval(cfg: "EvalConfig") -> None:
    if cfg.init_channels < 2 or cfg.init_channels % 2:
        raise ValueError(f"init_channels must be even and >= 2, got {cfg.init_channels}")
    if cfg.layers < 3:
        raise ValueError(f"layers must be at least 3, got {cfg.layers}")


# -- NAS-Bench-201 ----------------------------------------------------------------------------------------------
def nb201_supernet(method: "SearchMethod", cfg: "SearchConfig", num_classes: int) -> nn.Module:
    from .nb201 import NB201SearchNetwork

    return NB201SearchNetwork(cfg.init_channels, num_classes, cfg.layers, k=cfg.k, edge_norm=cfg.edge_norm,
                              weighting=method.weighting(cfg), seed=cfg.seed)


def nb201_eval_network(cfg: "EvalConfig", arch: Any, num_classes: int) -> nn.Module:
    from .nb201 import NB201Network

    if not isinstance(arch, NB201Arch):
        raise ValueError(f"search space nb201 evaluates NAS-Bench-201 cells (|op~0|+...), got a "
                         f"{type(arch).__name__}")
    return NB201Network(cfg.init_channels, num_classes, cfg.layers, arch)


def check_nb201_shape(cfg: "SearchConfig") -> None:
    if cfg.init_channels < 1 or cfg.layers < 1 or cfg.k < 1 or cfg.init_channels % cfg.k:
        raise ValueError(f"nb201 needs C >= 1 divisible by K and N = layers >= 1 cells per stage, got "
                         f"C={cfg.init_channels}, K={cfg.k}, layers={cfg.layers}")
    if cfg.channel_sampling != "fixed":
        raise ValueError("nb201 supports channel_sampling: fixed only (the official PC-DARTS slice)")
    if cfg.dataset == "imagenet":
        raise ValueError("nb201 is searched on cifar10, cifar100, imagenet16-120 or synthetic, not imagenet")


def check_nb201_eval(cfg: "EvalConfig") -> None:
    if cfg.init_channels < 1 or cfg.layers < 1:
        raise ValueError(f"nb201 evaluation needs C >= 1 and N = layers >= 1, got {cfg.init_channels}, {cfg.layers}")
    if cfg.dataset == "imagenet":
        raise ValueError("nb201 cells are evaluated on cifar10, cifar100, imagenet16-120 or synthetic")


def param_free_shares(genotype: Any, cell_types: Sequence[str]) -> dict[str, float]:
    """``param_free_share_<cell>``: the share of a derived cell's edges whose op has no weights (`none`, skip,
    pooling, noise): RobustDARTS's measure of a collapsed search (Zela et al., Sec. 3 and Fig. 1)."""
    out = {}
    for cell in cell_types:
        ops = [op for node in genotype.nodes(cell) for op, _ in node]
        out[f"param_free_share_{cell}"] = sum(op in PARAMETER_FREE_OPS for op in ops) / max(1, len(ops))
    return out


def darts_epoch_metrics(cfg: "SearchConfig", genotype: Any) -> dict[str, Any]:
    return param_free_shares(genotype, CELL_TYPES)


def nb201_epoch_metrics(cfg: "SearchConfig", arch: Any) -> dict[str, Any]:
    """The parameter-free share and, when a benchmark file is configured, ``bench_acc_<dataset>``: the
    benchmark's test accuracy (fraction) of the derived cell on each of its datasets."""
    out: dict[str, Any] = param_free_shares(arch, ("normal",))
    if cfg.nb201_benchmark is not None:
        from .nb201_bench import load_benchmark

        accs = load_benchmark(cfg.nb201_benchmark).accuracies(arch)
        out.update({f"bench_acc_{d}": acc for d, acc in accs.items()})
    return out


# -- the registry -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpace:
    name: str
    summary: str
    citation: str
    #: (method, search config, classes) -> supernet
    supernet: Callable[["SearchMethod", "SearchConfig", int], nn.Module]
    #: (evaluation config, derived cell, classes) -> evaluation network
    eval_network: Callable[["EvalConfig", Any, int], nn.Module]
    check_search: Callable[["SearchConfig"], None]
    check_eval: Callable[["EvalConfig"], None]
    #: per cell type, per edge: the candidate ops (None: the method's own op set on every edge)
    edge_ops: EdgeOps | None = None
    #: method -> why it does not run in this space
    unsupported: Mapping[str, str] = field(default_factory=dict)
    #: config defaults this space sets on top of the dataset's: {dataset or '*': {key: value}}
    search_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    eval_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    epoch_metrics: Callable[["SearchConfig", Any], dict[str, Any]] = darts_epoch_metrics
    ops: tuple[str, ...] = PRIMITIVES
    #: index -> the index-th random cell of the space (the random baseline, the same cells in every experiment)
    random_cell: Callable[[int], Any] = random_genotype

    def edge_primitives(self, method_ops: Sequence[str]) -> Sequence[str] | EdgeOps:
        """What the supernet gets as ``primitives``: the method's op set, or the space's per-edge ops."""
        return tuple(method_ops) if self.edge_ops is None else restrict(self.edge_ops, method_ops, self.name)

    def validate(self, cfg: "SearchConfig", method: "SearchMethod") -> None:
        if cfg.method in self.unsupported:
            raise ValueError(f"method {cfg.method} does not run in search space {self.name}: "
                             f"{self.unsupported[cfg.method]}")
        self.check_search(cfg)
        if self.ops != PRIMITIVES and tuple(method.primitives(cfg)) != PRIMITIVES:
            raise ValueError(f"search space {self.name} has its own ops ({', '.join(self.ops)}): the method's "
                             f"op set option does not apply there")
        if cfg.nb201_benchmark is not None and self.name != "nb201":
            raise ValueError("nb201_benchmark looks up NAS-Bench-201 cells: it needs search_space: nb201")
        self.edge_primitives(method.primitives(cfg))

    def defaults(self, which: str, dataset: str) -> dict[str, Any]:
        table = self.search_defaults if which == "search" else self.eval_defaults
        return {**table.get("*", {}), **table.get(dataset, {})}


_PDARTS_REDUCED = ("its stages prune 8 ops per edge to 5 and 3; S1-S4 edges offer 2 or 3 ops, so the progressive "
                   "space approximation has nothing to prune")
_ROBUST = ("Zela, Elsken, Saikia, Marrakchi, Brox, Hutter: Understanding and Robustifying Differentiable "
           "Architecture Search, ICLR 2020")

SPACES: dict[str, SearchSpace] = {
    "darts": SearchSpace(
        "darts", "DARTS cell: 8 ops x 14 edges, normal + reduction cells",
        "Liu, Simonyan, Yang: DARTS: Differentiable Architecture Search, ICLR 2019",
        darts_supernet, darts_eval_network, check_darts_shape, check_darts_eval),
    "s1": SearchSpace("s1", "DARTS cell, the two top-ranked ops per edge and cell type", _ROBUST,
                      darts_supernet, darts_eval_network, check_darts_shape, check_darts_eval,
                      edge_ops=S1_EDGE_OPS, unsupported={"pdarts": _PDARTS_REDUCED}),
    "s2": SearchSpace("s2", "DARTS cell, {skip_connect, sep_conv_3x3} on every edge", _ROBUST,
                      darts_supernet, darts_eval_network, check_darts_shape, check_darts_eval,
                      edge_ops=_every_edge(("skip_connect", "sep_conv_3x3")), unsupported={"pdarts": _PDARTS_REDUCED}),
    "s3": SearchSpace("s3", "DARTS cell, {none, skip_connect, sep_conv_3x3} on every edge", _ROBUST,
                      darts_supernet, darts_eval_network, check_darts_shape, check_darts_eval,
                      edge_ops=_every_edge(("none", "skip_connect", "sep_conv_3x3")),
                      unsupported={"pdarts": _PDARTS_REDUCED}),
    "s4": SearchSpace("s4", "DARTS cell, {noise, sep_conv_3x3} on every edge", _ROBUST,
                      darts_supernet, darts_eval_network, check_darts_shape, check_darts_eval,
                      edge_ops=_every_edge(("noise", "sep_conv_3x3")), unsupported={"pdarts": _PDARTS_REDUCED}),
    "nb201": SearchSpace(
        "nb201", "NAS-Bench-201 cell: 5 ops x 6 edges, 4 nodes, every node sums all its inputs",
        "Dong, Yang: NAS-Bench-201: Extending the Scope of Reproducible Neural Architecture Search, ICLR 2020",
        nb201_supernet, nb201_eval_network, check_nb201_shape, check_nb201_eval,
        unsupported={
            "pdarts": "its progressive depth and op pruning act on the stacked DARTS cells; NAS-Bench-201's "
                      "skeleton is fixed",
            "rome": "its Gumbel-Top2 input sampling picks 2 inputs per node; NAS-Bench-201 nodes sum all inputs",
            "entrannas": "its transit cells run a derived top-2-inputs sub-graph; NAS-Bench-201 cells keep every "
                         "edge",
        },
        # The benchmark's skeleton (C=16, N=5) for search and evaluation; its 200-epoch training recipe
        # (batch 256, lr 0.1 cosine to 0, wd 5e-4, no auxiliary head, no drop path, no cutout).
        search_defaults={"*": {"init_channels": 16, "layers": 5}, "synthetic": {"init_channels": 8, "layers": 1}},
        eval_defaults={"*": {"init_channels": 16, "layers": 5, "epochs": 200, "batch_size": 256, "lr": 0.1,
                             "weight_decay": 5e-4, "auxiliary": False, "drop_path": 0.0, "cutout": 0},
                       "synthetic": {"init_channels": 8, "layers": 1, "epochs": 10, "batch_size": 64,
                                     "lr": 0.05}},
        epoch_metrics=nb201_epoch_metrics, ops=NB201_OPS, random_cell=random_arch),
}

SPACE_NAMES: tuple[str, ...] = tuple(SPACES)


def get_space(name: str) -> SearchSpace:
    """The search space called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in SPACES:
        raise ValueError(f"unknown search_space {name!r}; known: {', '.join(SPACE_NAMES)}")
    return SPACES[name]


def supported_methods(space: str, methods: Sequence[str]) -> list[str]:
    """The methods of ``methods`` that run in ``space``."""
    return [m for m in methods if m not in get_space(space).unsupported]
