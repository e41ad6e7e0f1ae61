"""Stability statistics of independent searches: how alike are the cells that seeds of one configuration find,
and how much does their accuracy vary? Pure numpy over genotypes and numbers (no Ray, no Parquet); the
orchestrator applies it to an experiment's tables (:mod:`orchestrator.stability`).

Following the literature (mean ± std over independent searches, not over retrains of the one best cell;
collapse measured as skip-connects in the normal cell):

- accuracy: mean, sample std (ddof=1), a percentile-bootstrap CI of the mean, best, and best - mean (papers
  usually report best-of-N; the gap says how much that flatters a method);
- genotype agreement: mean pairwise :func:`~pcdarts_core.genotypes.genotype_distance` (fraction of the 16
  (input, op) choices that differ, ignoring order inside a node), the number of distinct genotypes (distance 0
  counts as equal), the consensus genotype (per node, the most often chosen (op, input) pairs) and the mean
  distance of the seeds to it, per-edge / per-(edge, op) selection frequencies and per-op shares;
- collapse: skip-connects in the normal cell, and the fraction of seeds with at least ``collapse_threshold``
  of them (default 3: P-DARTS caps the final cell at 2 and DARTS+ stops the search at 2, so 3 or more is a cell
  those methods would not have returned);
- convergence: the epoch from which each seed's derived genotype never changed again.

Genotype comparisons are vectorized through a count encoding (seed x cell x node x input x op) packed into bits,
which makes the 4950 pairs of 100 seeds a fraction of a millisecond.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .genotypes import CELL_TYPES, Genotype, consensus_genotype, parse_genotype
from .nb201_arch import NB201Arch
from .ops import OPS
from .spaces import get_space

#: Normal-cell skip-connects from which a searched cell counts as collapsed (P-DARTS and DARTS+ allow 2).
COLLAPSE_SKIP_THRESHOLD = 3

_OP_NAMES: tuple[str, ...] = tuple(OPS)  # `none` too: NAS-Bench-201 cells choose it on an edge
_OP_INDEX: dict[str, int] = {op: i for i, op in enumerate(_OP_NAMES)}
_SKIP = _OP_INDEX["skip_connect"]

GenotypeLike = Genotype | NB201Arch | str


@dataclass(frozen=True)
class StabilityOptions:
    """How :func:`stability_table` computes its statistics."""

    n_boot: int = 2000
    alpha: float = 0.05
    seed: int = 0
    collapse_threshold: int = COLLAPSE_SKIP_THRESHOLD


# -- accuracy statistics ---------------------------------------------------------------------------------------
def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap ``1 - alpha`` interval of the mean; the same ``seed`` gives the same interval.

    With few seeds (the usual case) this is honest about how little a mean of 3-10 searches pins down.
    One value gives ``(v, v)``; no values raise ``ValueError``.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap of an empty set of values")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    if x.size == 1 or np.all(x == x[0]):
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def best_minus_mean(values: Sequence[float] | np.ndarray) -> float:
    """Best-of-N minus mean-of-N: how much reporting the best search overstates the typical one."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("best - mean of an empty set of values")
    return float(x.max() - x.mean())


@dataclass(frozen=True)
class Summary:
    """Mean, sample std (None below 2 values), bootstrap CI, best and best - mean of one metric over seeds."""

    n: int
    mean: float | None = None
    std: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    best: float | None = None
    best_minus_mean: float | None = None


def summarize(values: Sequence[float] | np.ndarray, options: StabilityOptions = StabilityOptions()) -> Summary:
    """The :class:`Summary` of ``values`` (NaNs dropped); all fields None but ``n`` when there are none."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Summary(0)
    low, high = bootstrap_ci(x, options.n_boot, options.alpha, options.seed)
    mean = float(x.mean())
    return Summary(int(x.size), mean, float(x.std(ddof=1)) if x.size > 1 else None, low, high,
                   float(x.max()), float(x.max()) - mean)


# -- genotype encoding -----------------------------------------------------------------------------------------
def as_genotype(value: GenotypeLike) -> Genotype:
    return value if isinstance(value, (Genotype, NB201Arch)) else parse_genotype(value)  # type: ignore[return-value]


@dataclass(frozen=True)
class Encoded:
    """Genotypes as counts ``x[seed, cell, node, input, op]`` of each (input, op) choice, and inputs per node.

    Two genotypes are at distance 0 exactly when their count rows are equal, so equality, distances and
    frequencies are array operations.
    """

    counts: np.ndarray  # (n, 2, steps, steps + 1, n_ops) uint8
    node_sizes: np.ndarray  # (n, 2 * steps) int
    steps: int

    @property
    def n(self) -> int:
        return int(self.counts.shape[0])


@lru_cache(maxsize=4096)
def _choices(g: Genotype) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(steps, flat count-array positions of g's (input, op) choices, inputs per node), cached per genotype."""
    steps, n_ops = g.steps, len(_OP_NAMES)
    flat: list[int] = []
    sizes: list[int] = []
    for c, cell in enumerate(CELL_TYPES):
        for node, pairs in enumerate(g.nodes(cell)):
            sizes.append(len(pairs))
            base = (c * steps + node) * (steps + 1)
            flat.extend((base + inp) * n_ops + _OP_INDEX[op] for op, inp in pairs)
    return steps, tuple(flat), tuple(sizes)


def encode(genotypes: Iterable[GenotypeLike]) -> Encoded:
    """Count-encode genotypes that share a number of intermediate nodes (``ValueError`` otherwise)."""
    choices = [_choices(as_genotype(g)) for g in genotypes]
    steps = choices[0][0] if choices else 4
    for other, _, _ in choices:
        if other != steps:
            raise ValueError(f"genotypes with {other} and {steps} intermediate nodes cannot be compared")
    width = len(CELL_TYPES) * steps * (steps + 1) * len(_OP_NAMES)
    counts = np.zeros(len(choices) * width, dtype=np.uint8)
    rows = np.repeat(np.arange(len(choices), dtype=np.int64) * width, [len(f) for _, f, _ in choices])
    flat = np.fromiter((i for _, f, _ in choices for i in f), dtype=np.int64, count=len(rows))
    np.add.at(counts, rows + flat, 1)
    sizes = np.array([s for _, _, s in choices], dtype=np.int64).reshape(len(choices), len(CELL_TYPES) * steps)
    return Encoded(counts.reshape(len(choices), len(CELL_TYPES), steps, steps + 1, len(_OP_NAMES)), sizes, steps)


def _bit_levels(counts: np.ndarray) -> list[np.ndarray]:
    """Per level t = 1, 2, ...: the rows' indicators [count >= t], packed 64 to a word."""
    flat = counts.reshape(counts.shape[0], -1)
    levels = []
    for t in range(1, int(flat.max(initial=0)) + 1):
        packed = np.packbits(flat >= t, axis=1)
        pad = (-packed.shape[1]) % 8
        if pad:
            packed = np.pad(packed, ((0, 0), (0, pad)))
        levels.append(np.ascontiguousarray(packed).view(np.uint64))
    return levels


def _popcount(words: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    as_bytes = words.view(np.uint8).reshape(*words.shape, 8)  # numpy < 2.0: count bits byte by byte
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1)


def _common(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise multiset-intersection sizes of count rows: sum over levels t of popcount(a_t & b_t).

    min(p, q) = sum_t [p >= t][q >= t], and t stays 1 unless a node repeats a pair. Bit operations rather than
    a float matrix product: multithreaded BLAS on a few shared cores was 100x slower for these small matrices.
    """
    out = np.zeros((a.shape[0], b.shape[0]), dtype=np.int64)
    chunk = max(1, (1 << 22) // max(1, b.shape[0] * 8))
    for la, lb in zip(_bit_levels(a), _bit_levels(b)):
        for start in range(0, la.shape[0], chunk):
            block = la[start:start + chunk, None, :] & lb[None, :, :]
            out[start:start + chunk] += _popcount(block).sum(axis=-1, dtype=np.int64)
    return out


def cross_distances(a: Encoded, b: Encoded) -> np.ndarray:
    """``genotype_distance`` between every genotype of ``a`` and every one of ``b``, as an (a.n, b.n) matrix."""
    if a.steps != b.steps:
        raise ValueError(f"genotypes with {a.steps} and {b.steps} intermediate nodes cannot be compared")
    common = _common(a.counts, b.counts)
    if a.n and b.n and np.all(a.node_sizes == a.node_sizes[0]) and np.all(b.node_sizes == a.node_sizes[0]):
        total = np.full(common.shape, float(a.node_sizes[0].sum()))
    else:
        total = np.maximum(a.node_sizes[:, None, :], b.node_sizes[None, :, :]).sum(-1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (total - common) / np.where(total > 0, total, 1.0), 0.0).astype(np.float64)


def pairwise_distances(genotypes: Iterable[GenotypeLike] | Encoded) -> np.ndarray:
    """The symmetric matrix of :func:`~pcdarts_core.genotypes.genotype_distance` over the genotypes."""
    enc = genotypes if isinstance(genotypes, Encoded) else encode(genotypes)
    return cross_distances(enc, enc)


def pairwise_distance_mean(genotypes: Iterable[GenotypeLike] | Encoded) -> float | None:
    """Mean distance over the n(n-1)/2 pairs of seeds: 0 when all searches agree; None below two genotypes."""
    d = pairwise_distances(genotypes)
    n = d.shape[0]
    if n < 2:
        return None
    return float(d[np.triu_indices(n, k=1)].mean())


#: random cells whose mean pairwise distance is a space's reference level (4950 pairs)
RANDOM_REFERENCE_CELLS = 100


@lru_cache(maxsize=None)
def random_distance_mean(space: str, n: int = RANDOM_REFERENCE_CELLS) -> float:
    """The mean pairwise distance between the first ``n`` random cells of ``space`` (its random baseline's cells,
    ``SearchSpace.random_cell``): where seeds that agree on nothing beyond chance would land."""
    cell = get_space(space).random_cell
    return float(pairwise_distance_mean([cell(i) for i in range(n)]))


def n_distinct(genotypes: Iterable[GenotypeLike] | Encoded) -> int:
    """Distinct genotypes, two being equal when at distance 0 (same pairs per node, in any order)."""
    enc = genotypes if isinstance(genotypes, Encoded) else encode(genotypes)
    if enc.n == 0:
        return 0
    rows = np.concatenate([enc.counts.reshape(enc.n, -1), enc.node_sizes.astype(np.uint8)], axis=1)
    return len({row.tobytes() for row in rows})


def canonical_key(genotype: GenotypeLike) -> tuple:
    """A hashable key equal for two genotypes exactly when their distance is 0 (order inside nodes ignored)."""
    g = as_genotype(genotype)
    return tuple(tuple(tuple(sorted(pairs)) for pairs in g.nodes(cell)) for cell in CELL_TYPES)


def consensus(genotypes: Iterable[GenotypeLike]) -> tuple[Genotype, np.ndarray]:
    """The consensus genotype (:func:`~pcdarts_core.genotypes.consensus_genotype`) and each seed's distance to it."""
    genos = [as_genotype(g) for g in genotypes]
    cons = consensus_genotype(genos)
    return cons, cross_distances(encode(genos), encode([cons]))[:, 0]


# -- collapse --------------------------------------------------------------------------------------------------
def skip_counts(genotypes: Iterable[GenotypeLike] | Encoded, cell: str = "normal") -> np.ndarray:
    """skip_connect count of each genotype's ``cell``: the collapse signal of DARTS (Chen et al.; Liang et al.)."""
    enc = genotypes if isinstance(genotypes, Encoded) else encode(genotypes)
    return enc.counts[:, CELL_TYPES.index(cell), :, :, _SKIP].reshape(enc.n, -1).sum(axis=1).astype(np.int64)


def is_collapsed(genotype: GenotypeLike, threshold: int = COLLAPSE_SKIP_THRESHOLD) -> bool:
    """True when the normal cell has at least ``threshold`` skip-connects (default 3; P-DARTS/DARTS+ allow 2)."""
    return as_genotype(genotype).count_op("skip_connect", "normal") >= threshold


# -- selection frequencies -------------------------------------------------------------------------------------
def _edge_label(inp: int, node: int) -> str:
    return f"{inp}->{node + 2}"


@dataclass(frozen=True)
class SelectionFrequencies:
    """How often each choice was made over ``n`` genotypes, per cell type.

    ``edge[cell]["j->k"]``: fraction of genotypes whose node k (state index, 2..5) takes input j;
    ``edge_op[cell]["j->k"][op]``: fraction that take input j into node k through ``op``;
    ``op[cell][op]``: share of the cell's selected edges that are ``op`` (sums to 1 per cell).
    Choices never made are left out.
    """

    n: int
    edge: dict[str, dict[str, float]] = field(default_factory=dict)
    edge_op: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    op: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self, what: str) -> str:
        """``what`` ('edge', 'edge_op' or 'op') as JSON text, for a Parquet string column."""
        return json.dumps(getattr(self, what), sort_keys=False, separators=(",", ":"))


def selection_frequencies(genotypes: Iterable[GenotypeLike] | Encoded) -> SelectionFrequencies:
    """Per cell type: per edge (input -> node) selection frequency, per (edge, op) frequency, per-op shares."""
    enc = genotypes if isinstance(genotypes, Encoded) else encode(genotypes)
    if enc.n == 0:
        return SelectionFrequencies(0, {c: {} for c in CELL_TYPES}, {c: {} for c in CELL_TYPES},
                                    {c: {} for c in CELL_TYPES})
    present = enc.counts > 0
    edge_freq = present.any(axis=-1).mean(axis=0)  # (cells, steps, inputs)
    edge_op_freq = present.mean(axis=0)  # (cells, steps, inputs, ops)
    op_totals = enc.counts.sum(axis=(0, 2, 3), dtype=np.int64)  # (cells, ops)
    edge: dict[str, dict[str, float]] = {}
    edge_op: dict[str, dict[str, dict[str, float]]] = {}
    ops: dict[str, dict[str, float]] = {}
    for c, cell in enumerate(CELL_TYPES):
        edge[cell], edge_op[cell] = {}, {}
        for node in range(enc.steps):
            for inp in range(node + 2):
                f = float(edge_freq[c, node, inp])
                if f > 0:
                    label = _edge_label(inp, node)
                    edge[cell][label] = f
                    edge_op[cell][label] = {_OP_NAMES[k]: float(edge_op_freq[c, node, inp, k])
                                            for k in np.flatnonzero(edge_op_freq[c, node, inp])}
        total = int(op_totals[c].sum())
        ops[cell] = {_OP_NAMES[k]: int(op_totals[c, k]) / total for k in np.flatnonzero(op_totals[c])}
    return SelectionFrequencies(enc.n, edge, edge_op, ops)


# -- convergence -----------------------------------------------------------------------------------------------
def stopped_changing_epoch(epoch_genotypes: Sequence[GenotypeLike], epochs: Sequence[int] | None = None) -> int:
    """The epoch from which the derived genotype stayed the same to the end (distance 0 counts as the same).

    ``epoch_genotypes`` is one seed's per-epoch genotypes in epoch order; ``epochs`` their epoch numbers
    (0, 1, ... when omitted). ``[A, A, B, B]`` gives 2; a genotype that never changed gives the first epoch.
    """
    if not epoch_genotypes:
        raise ValueError("stopped_changing_epoch of an empty sequence")
    if epochs is not None and len(epochs) != len(epoch_genotypes):
        raise ValueError(f"{len(epochs)} epochs for {len(epoch_genotypes)} genotypes")
    keys = [canonical_key(g) for g in epoch_genotypes]
    i = len(keys) - 1
    while i > 0 and keys[i - 1] == keys[-1]:
        i -= 1
    return int(epochs[i]) if epochs is not None else i


# -- per-group genotype statistics -----------------------------------------------------------------------------
@dataclass(frozen=True)
class GenotypeStats:
    """What a group's genotypes say about stability (see the module docstring for the definitions)."""

    n: int
    distance_mean: float | None
    n_distinct: int
    consensus: Genotype | None
    consensus_distance_mean: float | None
    skip_normal_mean: float | None
    collapse_rate: float | None
    frequencies: SelectionFrequencies


def genotype_stats(genotypes: Sequence[GenotypeLike],
                   collapse_threshold: int = COLLAPSE_SKIP_THRESHOLD) -> GenotypeStats:
    """Distances, distinct count, consensus, skip-connects, collapse rate and frequencies of one group."""
    genos = [as_genotype(g) for g in genotypes]
    enc = encode(genos)
    freqs = selection_frequencies(enc)
    if not genos:
        return GenotypeStats(0, None, 0, None, None, None, None, freqs)
    cons = consensus_genotype(genos)
    to_cons = cross_distances(enc, encode([cons]))[:, 0]
    skips = skip_counts(enc)
    return GenotypeStats(enc.n, pairwise_distance_mean(enc), n_distinct(enc), cons, float(to_cons.mean()),
                         float(skips.mean()), float((skips >= collapse_threshold).mean()), freqs)


def parse_genotype_json(text: str) -> Genotype | None:
    """The core's genotype JSON as a :class:`Genotype` (validated by its constructor) at half the cost of
    :func:`~pcdarts_core.genotypes.parse_genotype`; None for anything unusual, which the full parser then handles and reports."""
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not set(data) <= _JSON_FIELDS:
        return None
    kwargs: dict[str, Any] = {}
    for cell in CELL_TYPES:
        edges = data.get(cell)
        if not isinstance(edges, list) or not all(
                isinstance(e, list) and len(e) == 2 and type(e[0]) is str and type(e[1]) is int for e in edges):
            return None
        kwargs[cell] = tuple((op, inp) for op, inp in edges)
        counts = data.get(f"{cell}_counts", [2] * (len(edges) // 2))
        concat = data.get(f"{cell}_concat", list(range(2, 2 + len(counts))))
        if not all(isinstance(v, list) and all(type(x) is int for x in v) for v in (counts, concat)):
            return None
        kwargs[f"{cell}_counts"], kwargs[f"{cell}_concat"] = tuple(counts), tuple(concat)
    return Genotype(**kwargs)


#: The (op, input) pairs node i may take, for the fast path's validation (up to 16 intermediate nodes).
_VALID_PAIRS = tuple(frozenset((op, j) for op in _OP_NAMES for j in range(i + 2)) for i in range(16))
_JSON_FIELDS = frozenset(f"{cell}{suffix}" for cell in CELL_TYPES for suffix in ("", "_concat", "_counts"))


def genotype_json_key(text: str) -> tuple | None:
    """:func:`canonical_key` of the core's genotype JSON without building a :class:`Genotype` (5x faster);
    None for anything that is not plainly valid, so the full parser handles (and reports) it.

    Per-epoch genotypes are many and mostly distinct texts, so this is the hot path of the epochs statistics.
    """
    # true/false and floats hash like ints: leave texts that contain them to the strict parser.
    if not text.startswith("{") or "." in text or "true" in text or "false" in text:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or not set(data) <= _JSON_FIELDS:
            return None
        out = []
        for cell in CELL_TYPES:
            edges = data[cell]
            counts = data.get(f"{cell}_counts", [2] * (len(edges) // 2))
            concat = data.get(f"{cell}_concat", [2])
            if (not counts or sum(counts) != len(edges) or min(counts) < 1 or len(counts) > len(_VALID_PAIRS)
                    or not concat or min(concat) < 0 or max(concat) >= len(counts) + 2):
                return None
            nodes, start = [], 0
            for node, n in enumerate(counts):
                pairs = [tuple(e) for e in edges[start:start + n]]
                start += n
                if not _VALID_PAIRS[node].issuperset(pairs):
                    return None
                nodes.append(tuple(sorted(pairs)))
            out.append(tuple(nodes))
        return tuple(out)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def frequencies_from_json(text: str | None) -> Mapping[str, Any]:
    """The dict stored in a ``*_frequencies`` column (an empty dict for null)."""
    return json.loads(text) if text else {}
