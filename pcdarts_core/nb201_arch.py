"""NAS-Bench-201 cells (Dong & Yang, ICLR 2020) and their architecture strings.

A cell has 4 nodes: node 0 is the cell's input, node ``j`` (1..3) is the sum of one op applied to every earlier
node, and node 3 is the output. The 6 edges, in the benchmark's order (its sorted ``"j<-i"`` keys), are
1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2; each carries one of ``none, skip_connect, nor_conv_1x1, nor_conv_3x3,
avg_pool_3x3`` (15,625 cells). The benchmark writes a cell as
``|nor_conv_3x3~0|+|nor_conv_3x3~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|``: one
``|op~input|`` group per node, nodes joined by ``+``. Strings are parsed with ``str`` methods only.

:class:`NB201Arch` offers the parts of :class:`~pcdarts_core.genotypes.Genotype`'s interface that comparisons and
storage use (``nodes``, ``steps``, ``count_op``, ``to_dict``, ``to_json``), so stability statistics and Parquet
columns treat both alike: ``nodes`` lists every edge's ``(op, input)``, `none` included, so the genotype distance
of two cells is the fraction of the six edges whose op differs. :meth:`NB201Arch.edges` gives the same edges as
``(src_node, dst_node, op)`` for drawing.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

#: The benchmark's op set, in its order (xautodl ``NAS_BENCH_201``): the alphas' columns follow it.
NB201_OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
N_NODES = 4
#: (source, destination) of each edge, in the benchmark's edge order.
EDGES: tuple[tuple[int, int], ...] = tuple((i, j) for j in range(1, N_NODES) for i in range(j))
#: ``to_dict`` key that marks a NAS-Bench-201 cell in stored JSON
JSON_KEY = "nb201"
MAX_TEXT = 1000


@dataclass(frozen=True)
class NB201Arch:
    """One NAS-Bench-201 cell: ``ops[e]`` is the op on edge ``EDGES[e]``."""

    ops: tuple[str, ...]

    def __post_init__(self) -> None:
        ops = tuple(self.ops)
        if len(ops) != len(EDGES):
            raise ValueError(f"a NAS-Bench-201 cell has {len(EDGES)} edges, got {len(ops)} ops")
        for (src, dst), op in zip(EDGES, ops):
            if op not in NB201_OPS:
                raise ValueError(f"NAS-Bench-201 edge {src}->{dst}: unknown op {op!r}; known ops: "
                                 f"{', '.join(NB201_OPS)}")
        object.__setattr__(self, "ops", ops)

    # -- structure -------------------------------------------------------------------------------------------
    def edges(self) -> list[tuple[int, int, str]]:
        """All six edges as ``(src_node, dst_node, op)``, `none` included (node 0 the input, node 3 the output)."""
        return [(src, dst, op) for (src, dst), op in zip(EDGES, self.ops)]

    @property
    def steps(self) -> int:
        """Nodes that compute something (1..3)."""
        return N_NODES - 1

    def nodes(self, cell: str = "normal") -> list[list[tuple[str, int]]]:
        """Per computing node (1..3), its ``(op, input)`` edges, `none` included. The one cell type is 'normal';
        'reduce' has no edges (NAS-Bench-201 reduces with fixed residual blocks)."""
        out: list[list[tuple[str, int]]] = [[] for _ in range(self.steps)]
        if cell == "normal":
            for src, dst, op in self.edges():
                out[dst - 1].append((op, src))
        return out

    def count_op(self, op: str, cell: str = "normal") -> int:
        return sum(1 for o in self.ops if o == op) if cell == "normal" else 0

    # -- text ------------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        groups = []
        for dst in range(1, N_NODES):
            groups.append("|" + "|".join(f"{op}~{src}" for src, d, op in self.edges() if d == dst) + "|")
        return "+".join(groups)

    def to_dict(self) -> dict[str, Any]:
        return {JSON_KEY: str(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def parse_arch(text: str) -> NB201Arch:
    """Parse the benchmark's string; ``ValueError`` with a one-line reason on anything malformed."""
    if not isinstance(text, str):
        raise ValueError(f"NAS-Bench-201 architecture must be a string, got {type(text).__name__}")
    text = text.strip()
    if len(text) > MAX_TEXT:
        raise ValueError("NAS-Bench-201 architecture string is too long")
    groups = text.split("+")
    if len(groups) != N_NODES - 1:
        raise ValueError(f"NAS-Bench-201 architecture needs {N_NODES - 1} '+'-separated node groups, got "
                         f"{len(groups)}: {text[:80]!r}")
    chosen: dict[tuple[int, int], str] = {}
    for dst, group in enumerate(groups, start=1):
        if len(group) < 2 or not (group.startswith("|") and group.endswith("|")):
            raise ValueError(f"NAS-Bench-201 node {dst}: expected '|op~input|...|', got {group[:60]!r}")
        items = group[1:-1].split("|")
        if len(items) != dst:
            raise ValueError(f"NAS-Bench-201 node {dst} needs {dst} inputs (0..{dst - 1}), got {len(items)}")
        for item in items:
            op, sep, src_text = item.partition("~")
            if not sep or not src_text.isdigit():
                raise ValueError(f"NAS-Bench-201 node {dst}: expected 'op~input', got {item[:40]!r}")
            src = int(src_text)
            if src >= dst:
                raise ValueError(f"NAS-Bench-201 node {dst} cannot take input {src} (valid: 0..{dst - 1})")
            if (src, dst) in chosen:
                raise ValueError(f"NAS-Bench-201 node {dst} takes input {src} twice")
            if op not in NB201_OPS:
                raise ValueError(f"NAS-Bench-201 edge {src}->{dst}: unknown op {op!r}; known ops: "
                                 f"{', '.join(NB201_OPS)}")
            chosen[(src, dst)] = op
    return NB201Arch(tuple(chosen[e] for e in EDGES))


def arch_from_dict(data: Any) -> NB201Arch:
    """The cell stored by :meth:`NB201Arch.to_dict`."""
    if not isinstance(data, dict) or set(data) != {JSON_KEY} or not isinstance(data[JSON_KEY], str):
        raise ValueError(f"a NAS-Bench-201 cell is stored as {{\"{JSON_KEY}\": \"|op~0|+...\"}}")
    return parse_arch(data[JSON_KEY])


# -- comparing cells -------------------------------------------------------------------------------------------
def arch_distance(a: NB201Arch, b: NB201Arch) -> float:
    """Fraction of the six edges whose op differs (0: the same cell, 1: nothing in common)."""
    return sum(x != y for x, y in zip(a.ops, b.ops)) / len(EDGES)


def consensus_arch(archs: Iterable[NB201Arch]) -> NB201Arch:
    """Per edge the op chosen most often; ties go to the op seen first, so identical cells give that cell."""
    cells = list(archs)
    if not cells:
        raise ValueError("consensus of an empty set of NAS-Bench-201 cells")
    ops = []
    for e in range(len(EDGES)):
        counts = Counter(c.ops[e] for c in cells)
        order = {op: i for i, op in reversed(list(enumerate(c.ops[e] for c in cells)))}
        ops.append(min(counts, key=lambda op: (-counts[op], order[op])))
    return NB201Arch(tuple(ops))


def random_arch(index: int, seed: int = 0) -> NB201Arch:
    """A uniformly random cell, the same for the same (index, seed) (the random-search baseline)."""
    rng = random.Random(f"nb201-random-{seed}-{index}")
    return NB201Arch(tuple(rng.choice(NB201_OPS) for _ in EDGES))
