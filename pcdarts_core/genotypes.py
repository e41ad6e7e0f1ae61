"""Genotypes: the discrete cells a search derives, their safe (de)serialization and the published ones.

A genotype lists, for each of the 4 intermediate nodes of the normal and the reduction cell, the (op, input)
pairs feeding it. Inputs 0 and 1 are the cell's two inputs, input ``i + 2`` is intermediate node ``i``.
DARTS-style searches keep exactly two inputs per node; EnTranNAS-DST may keep any number, so the number of inputs
per node is stored explicitly (``normal_counts``) rather than assumed.

Text is parsed with :mod:`ast` and :mod:`json` only: nothing a user supplies is ever evaluated. A NAS-Bench-201
string (``|op~0|+...``) or its stored JSON parses to a :class:`~pcdarts_core.nb201_arch.NB201Arch` instead, and
the consensus of such cells is per-edge (``consensus_arch``).
"""

from __future__ import annotations

import ast
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .nb201_arch import JSON_KEY as NB201_JSON_KEY
from .nb201_arch import NB201Arch, arch_from_dict, consensus_arch, parse_arch
from .ops import OPS, PRIMITIVES, check_op_name

Edge = tuple[str, int]
CELL_TYPES = ("normal", "reduce")


@dataclass(frozen=True)
class Genotype:
    """A derived architecture. ``normal``/``reduce`` are flat (op, input) lists, node by node, as in DARTS."""

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]
    normal_counts: tuple[int, ...] = (2, 2, 2, 2)
    reduce_counts: tuple[int, ...] = (2, 2, 2, 2)

    def __post_init__(self) -> None:
        for cell in CELL_TYPES:
            edges = tuple((str(op), int(inp)) for op, inp in getattr(self, cell))
            counts = tuple(int(c) for c in getattr(self, f"{cell}_counts"))
            concat = tuple(int(c) for c in getattr(self, f"{cell}_concat"))
            object.__setattr__(self, cell, edges)
            object.__setattr__(self, f"{cell}_counts", counts)
            object.__setattr__(self, f"{cell}_concat", concat)
            _validate_cell(cell, edges, counts, concat)

    # -- structure -------------------------------------------------------------------------------------------
    def nodes(self, cell: str) -> list[list[Edge]]:
        """The (op, input) pairs of each intermediate node of ``cell`` ('normal' or 'reduce')."""
        edges, counts = getattr(self, cell), getattr(self, f"{cell}_counts")
        out, start = [], 0
        for n in counts:
            out.append(list(edges[start : start + n]))
            start += n
        return out

    @property
    def steps(self) -> int:
        return len(self.normal_counts)

    def count_op(self, op: str, cell: str = "normal") -> int:
        return sum(1 for name, _ in getattr(self, cell) if name == op)

    # -- serialization ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "normal": [[op, i] for op, i in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[op, i] for op, i in self.reduce],
            "reduce_concat": list(self.reduce_concat),
            "normal_counts": list(self.normal_counts),
            "reduce_counts": list(self.reduce_counts),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def __str__(self) -> str:
        """The official repositories' text form (with counts only when a node does not have two inputs)."""

        def fmt(cell: str) -> str:
            pairs = ", ".join(f"({op!r}, {i})" for op, i in getattr(self, cell))
            concat = getattr(self, f"{cell}_concat")
            if concat == tuple(range(2, 2 + self.steps)):
                concat_text = f"range(2, {2 + self.steps})"
            else:
                concat_text = str(list(concat))
            return f"{cell}=[{pairs}], {cell}_concat={concat_text}"

        extra = ""
        if any(c != 2 for c in self.normal_counts + self.reduce_counts):
            extra = f", normal_counts={list(self.normal_counts)}, reduce_counts={list(self.reduce_counts)}"
        return f"Genotype({fmt('normal')}, {fmt('reduce')}{extra})"


def _validate_cell(cell: str, edges: tuple[Edge, ...], counts: tuple[int, ...], concat: tuple[int, ...]) -> None:
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"genotype {cell}: every node needs at least one input, got counts {list(counts)}")
    if sum(counts) != len(edges):
        raise ValueError(f"genotype {cell}: {len(edges)} edges do not match node input counts {list(counts)}")
    start = 0
    for node, n in enumerate(counts):
        for op, inp in edges[start : start + n]:
            if op not in OPS or op == "none":
                known = ", ".join(k for k in OPS if k != "none")
                raise ValueError(f"genotype {cell}: unknown op {op!r} at node {node}; known ops: {known}")
            if not 0 <= inp < node + 2:
                raise ValueError(f"genotype {cell}: node {node} cannot take input {inp} (valid: 0..{node + 1})")
        start += n
    if not concat or any(not 0 <= c < len(counts) + 2 for c in concat):
        raise ValueError(f"genotype {cell}_concat {list(concat)} is out of range 0..{len(counts) + 1}")


# -- parsing ---------------------------------------------------------------------------------------------------
_FIELDS = {"normal", "normal_concat", "reduce", "reduce_concat", "normal_counts", "reduce_counts"}


def genotype_from_dict(data: Any) -> Genotype:
    """Build a genotype from the JSON dict; raise ``ValueError`` on anything malformed."""
    if not isinstance(data, dict):
        raise ValueError(f"genotype must be a JSON object, got {type(data).__name__}")
    unknown = set(data) - _FIELDS
    if unknown:
        raise ValueError(f"genotype has unknown fields: {', '.join(sorted(unknown))}")
    missing = {"normal", "reduce"} - set(data)
    if missing:
        raise ValueError(f"genotype is missing fields: {', '.join(sorted(missing))}")
    kwargs: dict[str, Any] = {}
    for cell in CELL_TYPES:
        kwargs[cell] = tuple(_edge(e, cell) for e in _list(data[cell], cell))
        steps_guess = None
        if f"{cell}_counts" in data:
            kwargs[f"{cell}_counts"] = tuple(_int(c, f"{cell}_counts") for c in _list(data[f"{cell}_counts"],
                                                                                     f"{cell}_counts"))
        else:
            if len(kwargs[cell]) % 2:
                raise ValueError(f"genotype {cell}: {len(kwargs[cell])} edges cannot be two per node")
            steps_guess = len(kwargs[cell]) // 2
            kwargs[f"{cell}_counts"] = (2,) * steps_guess
        steps = len(kwargs[f"{cell}_counts"])
        concat = data.get(f"{cell}_concat", list(range(2, 2 + steps)))
        kwargs[f"{cell}_concat"] = tuple(_int(c, f"{cell}_concat") for c in _list(concat, f"{cell}_concat"))
    return Genotype(**kwargs)


def _list(value: Any, what: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"genotype {what} must be a list, got {type(value).__name__}")
    return list(value)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"genotype {what}: expected an integer, got {value!r}")
    return value


def _edge(value: Any, cell: str) -> Edge:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not isinstance(value[0], str):
        raise ValueError(f"genotype {cell}: each edge must be an (op, input) pair, got {value!r}")
    return value[0], _int(value[1], cell)


def _literal(node: ast.AST, what: str) -> Any:
    """Turn a restricted AST (lists, tuples, str/int constants, ``range(a, b)``) into Python values."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, what) for e in node.elts]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
            and not node.keywords and 1 <= len(node.args) <= 2):
        bounds = [_literal(a, what) for a in node.args]
        if not all(isinstance(b, int) for b in bounds) or bounds[-1] > 64:
            raise ValueError(f"genotype {what}: bad range(...)")
        return list(range(*bounds))
    raise ValueError(f"genotype {what}: unsupported expression {ast.dump(node)[:60]}")


def parse_genotype(text: str) -> Genotype | NB201Arch:
    """Parse the core's JSON or the official ``Genotype(normal=[...], ...)`` text, without ``eval``; a
    NAS-Bench-201 string (``|op~0|+...``) or its JSON gives an :class:`~pcdarts_core.nb201_arch.NB201Arch`.

    Raises ``ValueError`` with a one-line message on anything malformed or unknown.
    """
    if not isinstance(text, str):
        raise ValueError(f"genotype text must be a string, got {type(text).__name__}")
    text = text.strip()
    if len(text) > 100_000:
        raise ValueError("genotype text is too long")
    if not text:
        raise ValueError("genotype text is empty")
    if text.startswith("|"):
        return parse_arch(text)
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"genotype JSON is malformed: {err}") from None
        if isinstance(data, dict) and NB201_JSON_KEY in data:
            return arch_from_dict(data)
        return genotype_from_dict(data)
    if "=" in text.split("(", 1)[0]:  # "NAME = Genotype(...)" as written in the official genotypes.py
        text = text.split("=", 1)[1].strip()
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"genotype text is malformed: {err.msg}") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "Genotype"):
        raise ValueError("genotype text must be JSON or Genotype(normal=[...], normal_concat=..., reduce=[...], ...)")
    if call.args:
        names = ["normal", "normal_concat", "reduce", "reduce_concat"]
        if len(call.args) > len(names):
            raise ValueError("genotype text has too many positional fields")
        fields = {name: _literal(arg, name) for name, arg in zip(names, call.args)}
    else:
        fields = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ValueError("genotype text may not use ** arguments")
        if kw.arg in fields:
            raise ValueError(f"genotype field {kw.arg} given twice")
        fields[kw.arg] = _literal(kw.value, kw.arg)
    return genotype_from_dict(fields)


# -- derivation ------------------------------------------------------------------------------------------------
def edge_count(steps: int = 4) -> int:
    """Edges of a cell with ``steps`` intermediate nodes: node i has i + 2 inputs (14 for 4 nodes)."""
    return sum(2 + i for i in range(steps))


def node_edge_slices(steps: int = 4) -> list[slice]:
    """Row ranges of each node's incoming edges in the (14, n_ops) alpha matrix."""
    out, start = [], 0
    for i in range(steps):
        out.append(slice(start, start + i + 2))
        start += i + 2
    return out


def normalized_betas(betas: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """PC-DARTS edge normalization (Xu et al., Sec. 3.3): softmax of the betas over each node's inputs."""
    return torch.cat([F.softmax(betas[s], dim=-1) for s in node_edge_slices(steps)])


def _edge_op_names(primitives: Any, n_edges: int, n_ops: int) -> list[list[str]]:
    """One op list for all edges, or one per edge (P-DARTS's pruned stages): ``n_ops`` known op names each."""
    is_names = lambda v: isinstance(v, (list, tuple)) and v and all(isinstance(n, str) for n in v)  # noqa: E731
    if is_names(primitives):
        rows = [list(primitives)] * n_edges
    elif isinstance(primitives, (list, tuple)) and primitives and all(is_names(p) for p in primitives):
        if len(primitives) != n_edges:
            raise ValueError(f"primitives gives op names for {len(primitives)} edges, the alphas have {n_edges}")
        rows = [list(p) for p in primitives]
    else:
        raise ValueError("primitives must be a non-empty list of op names, or one such list per edge")
    for row in {tuple(r) for r in rows}:
        if len(row) != n_ops:
            raise ValueError(f"primitives names {len(row)} ops but the alphas have {n_ops} columns")
        for name in row:
            check_op_name(name)
    return rows


def edge_op_weights(alphas: torch.Tensor, betas: torch.Tensor | None = None, steps: int = 4) -> torch.Tensor:
    """W = softmax(alpha) per edge, scaled by the node-wise softmax of the betas when given (PC-DARTS Sec. 3.3)."""
    weights = F.softmax(alphas.detach().float(), dim=-1)
    if betas is not None:
        weights = weights * normalized_betas(betas.detach().float(), steps).unsqueeze(-1)
    return weights


def derive_cell(weights: torch.Tensor, op_names: Sequence[str] | Sequence[Sequence[str]], steps: int = 4,
                n_inputs: int = 2) -> list[Edge]:
    """Per node keep the ``n_inputs`` inputs whose strongest non-`none` op weighs most, each with that op.

    Ties go to the lower input index and the earlier op, as in the official ``_parse`` (stable sort).
    """
    names = _edge_op_names(op_names, weights.shape[0], weights.shape[1])
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("cannot derive a cell from arch weights that are NaN or infinite (the search diverged)")
    gene: list[Edge] = []
    for node, rows in enumerate(node_edge_slices(steps)):
        candidates = []
        for j in range(node + 2):
            row, ops = weights[rows.start + j].tolist(), names[rows.start + j]
            scored = [(w, k) for k, w in enumerate(row) if ops[k] != "none"]
            if not scored:
                continue
            best_w = max(w for w, _ in scored)
            best_k = next(k for w, k in scored if w == best_w)
            candidates.append((best_w, j, ops[best_k]))
        candidates.sort(key=lambda c: -c[0])
        if len(candidates) < n_inputs:
            raise ValueError(f"node {node} has fewer than {n_inputs} inputs with a non-none op")
        gene.extend((op, j) for _, j, op in candidates[:n_inputs])
    return gene


def derive_genotype(alphas_normal: torch.Tensor, alphas_reduce: torch.Tensor,
                    betas_normal: torch.Tensor | None = None, betas_reduce: torch.Tensor | None = None,
                    primitives: Sequence[str] | Sequence[Sequence[str]] = PRIMITIVES,
                    primitives_reduce: Sequence[str] | Sequence[Sequence[str]] | None = None) -> Genotype:
    """The PC-DARTS derivation rule (official ``genotype()``): two strongest inputs per node, argmax op on each.

    ``primitives`` names the alpha columns: one list for all edges, or one list per edge (P-DARTS prunes per edge).
    """
    steps = _steps_for(alphas_normal.shape[0])
    normal = derive_cell(edge_op_weights(alphas_normal, betas_normal, steps), primitives, steps)
    reduce = derive_cell(edge_op_weights(alphas_reduce, betas_reduce, steps),
                         primitives if primitives_reduce is None else primitives_reduce, steps)
    concat = tuple(range(2, 2 + steps))
    return Genotype(tuple(normal), concat, tuple(reduce), concat)


def _array(value: Any, name: str, dims: int) -> torch.Tensor:
    try:
        t = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a {dims}-d array of numbers") from None
    if t.dim() != dims or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty {dims}-d array of numbers, got shape {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return t


def genotype_from_arch(data: Any) -> Genotype:
    """:func:`derive_genotype` of saved, untrusted arch parameters: ``alphas_normal``/``alphas_reduce``, optional
    ``betas_*`` and ``primitives`` (one op list, one per edge, or ``{normal: ..., reduce: ...}``), each checked."""
    alphas = {c: _array(data[f"alphas_{c}"], f"alphas_{c}", 2) for c in CELL_TYPES}
    if alphas["normal"].shape != alphas["reduce"].shape:
        raise ValueError(f"alphas_normal {list(alphas['normal'].shape)} and alphas_reduce "
                         f"{list(alphas['reduce'].shape)} differ in shape")
    n_edges = alphas["normal"].shape[0]
    betas = {c: None if data.get(f"betas_{c}") is None else _array(data[f"betas_{c}"], f"betas_{c}", 1)
             for c in CELL_TYPES}
    for c, b in betas.items():
        if b is not None and b.shape[0] != n_edges:
            raise ValueError(f"betas_{c} has {b.shape[0]} entries, the alphas have {n_edges} edges")
    if (betas["normal"] is None) != (betas["reduce"] is None):
        raise ValueError("give both betas_normal and betas_reduce, or neither")
    prims = data.get("primitives", list(PRIMITIVES))
    if isinstance(prims, dict) and set(prims) != set(CELL_TYPES):
        raise ValueError("primitives given per cell type must have exactly the keys 'normal' and 'reduce'")
    per_cell = prims if isinstance(prims, dict) else {c: prims for c in CELL_TYPES}
    return derive_genotype(alphas["normal"], alphas["reduce"], betas["normal"], betas["reduce"], per_cell["normal"],
                           per_cell["reduce"])


#: the arch parameters a search saves: its network's alphas and (PC-DARTS edge normalization) betas
ARCH_KEYS = ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce")


def saved_arch(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """What :func:`genotype_from_arch` takes, from saved data: ``data`` itself when it holds ``alphas_normal``, else
    the arch parameters (any wrapper prefix, e.g. ``module.``) of its ``model``/``state_dict`` state dict, with the
    ``primitives`` saved beside it or in a search state's ``method`` state (P-DARTS's pruned per-edge ops)."""
    state = next((data[k] for k in ("model", "state_dict") if isinstance(data.get(k), dict)), None)
    if "alphas_normal" not in data and state is not None:
        method_state = data["method"] if isinstance(data.get("method"), dict) else {}
        primitives = data.get("primitives", method_state.get("primitives"))
        data = {} if primitives is None else {"primitives": primitives}
        for key in ARCH_KEYS:
            hits = [k for k in state if isinstance(k, str) and k.rpartition(".")[2] == key]
            if len(hits) > 1:
                raise ValueError(f"the model state dict holds several {key} entries: {', '.join(hits[:3])}")
            if hits:
                data[key] = state[hits[0]]
    missing = [k for k in ARCH_KEYS[:2] if k not in data]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (expected alphas_normal, alphas_reduce and optionally "
                         f"betas_*, primitives, a 'model' state dict holding them, or a checkpoint of this project)")
    return data


def _steps_for(n_edges: int) -> int:
    steps, total = 0, 0
    while total < n_edges:
        total += steps + 2
        steps += 1
    if total != n_edges:
        raise ValueError(f"{n_edges} edges do not form a DARTS cell (expected 2, 5, 9, 14, ...)")
    return steps


# -- comparing genotypes ---------------------------------------------------------------------------------------
def genotype_distance(a: Genotype, b: Genotype) -> float:
    """Fraction of (input, op) choices that differ, node by node, ignoring order inside a node.

    For two-input genotypes this is the fraction of the 16 choices (2 cells x 4 nodes x 2) that differ;
    0 means the same cell, 1 means nothing in common. Nodes with different input counts are compared as
    multisets, the denominator being the larger of the two counts.
    """
    differ = total = 0
    for cell in CELL_TYPES:
        for na, nb in zip(a.nodes(cell), b.nodes(cell), strict=True):
            common = sum((Counter(na) & Counter(nb)).values())
            size = max(len(na), len(nb))
            differ += size - common
            total += size
    return differ / total if total else 0.0


def consensus_genotype(genotypes: Iterable[Genotype], n_inputs: int = 2) -> Genotype:
    """Per node, the most often selected (op, input) pairs over the given genotypes, on distinct inputs.

    Ties are broken by first appearance, so the consensus of identical genotypes is that genotype.
    Restricting the pick to distinct inputs keeps the consensus inside the DARTS space.
    """
    genos = list(genotypes)
    if not genos:
        raise ValueError("consensus of an empty set of genotypes")
    if isinstance(genos[0], NB201Arch):  # NAS-Bench-201: per edge the op chosen most often
        return consensus_arch(genos)  # type: ignore[arg-type]
    steps = genos[0].steps
    cells: dict[str, list[Edge]] = {}
    counts_per_cell: dict[str, tuple[int, ...]] = {}
    for cell in CELL_TYPES:
        edges: list[Edge] = []
        node_counts: list[int] = []
        for node in range(steps):
            counts: Counter[Edge] = Counter()
            order: dict[Edge, int] = {}
            for g in genos:
                for pair in g.nodes(cell)[node]:
                    counts[pair] += 1
                    order.setdefault(pair, len(order))
            chosen: list[Edge] = []
            for pair in sorted(counts, key=lambda p: (-counts[p], order[p])):
                if len(chosen) < n_inputs and all(pair[1] != c[1] for c in chosen):
                    chosen.append(pair)
            edges.extend(chosen)
            node_counts.append(len(chosen))
        cells[cell] = edges
        counts_per_cell[cell] = tuple(node_counts)
    concat = tuple(range(2, 2 + steps))
    return Genotype(tuple(cells["normal"]), concat, tuple(cells["reduce"]), concat,
                    counts_per_cell["normal"], counts_per_cell["reduce"])


#: the ops a derived DARTS cell may use (``none`` is never selected)
RANDOM_OPS = tuple(op for op in PRIMITIVES if op != "none")


def random_genotype(index: int) -> Genotype:
    """The ``index``-th random DARTS-space cell pair (the random baseline): per node two distinct inputs drawn
    uniformly from the earlier states, each with an op drawn uniformly from ``RANDOM_OPS``; ``random.Random(index)``
    makes ``random:3`` the same cells in every experiment."""
    rng = random.Random(int(index))
    cells: dict[str, list[Edge]] = {cell: [] for cell in CELL_TYPES}
    for cell in CELL_TYPES:
        for node in range(4):
            cells[cell] += [(rng.choice(RANDOM_OPS), inp) for inp in sorted(rng.sample(range(node + 2), 2))]
    return Genotype(tuple(cells["normal"]), (2, 3, 4, 5), tuple(cells["reduce"]), (2, 3, 4, 5))


def genotype_to_dict_safe(text_or_genotype: str | Genotype) -> dict[str, Any]:
    """The JSON dict of a genotype given as an object or any parseable text."""
    g = text_or_genotype if isinstance(text_or_genotype, Genotype) else parse_genotype(text_or_genotype)
    return g.to_dict()


# -- published genotypes, as printed by the official repositories ----------------------------------------------
_PUBLISHED_TEXT = {
    "DARTS_V1": "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1), "
                "('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)], "
                "normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
                "('max_pool_3x3', 0), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
                "('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])",
    "DARTS_V2": "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
                "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
                "normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
                "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
                "('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])",
    "PC_DARTS_CIFAR": "Genotype(normal=[('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0), "
                      "('dil_conv_3x3', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('avg_pool_3x3', 0), "
                      "('dil_conv_3x3', 1)], normal_concat=range(2, 6), reduce=[('sep_conv_5x5', 1), "
                      "('max_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_5x5', 2), ('sep_conv_3x3', 0), "
                      "('sep_conv_3x3', 3), ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)], reduce_concat=range(2, 6))",
    "PC_DARTS_IMAGENET": "Genotype(normal=[('skip_connect', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 0), "
                         "('skip_connect', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 3), ('sep_conv_3x3', 1), "
                         "('dil_conv_5x5', 4)], normal_concat=range(2, 6), reduce=[('sep_conv_3x3', 0), "
                         "('skip_connect', 1), ('dil_conv_5x5', 2), ('max_pool_3x3', 1), ('sep_conv_3x3', 2), "
                         "('sep_conv_3x3', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 3)], reduce_concat=range(2, 6))",
    "PDARTS": "Genotype(normal=[('skip_connect', 0), ('dil_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1), "
              "('sep_conv_3x3', 1), ('sep_conv_3x3', 3), ('sep_conv_3x3', 0), ('dil_conv_5x5', 4)], "
              "normal_concat=range(2, 6), reduce=[('avg_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_3x3', 0), "
              "('dil_conv_5x5', 2), ('max_pool_3x3', 0), ('dil_conv_3x3', 1), ('dil_conv_3x3', 1), "
              "('dil_conv_5x5', 3)], reduce_concat=range(2, 6))",
}

#: The published cells, by the names the official repositories use.
PUBLISHED: dict[str, Genotype] = {name: parse_genotype(text) for name, text in _PUBLISHED_TEXT.items()}


def load_genotype(name_or_path: str) -> Genotype | NB201Arch:
    """A published genotype by name (e.g. ``PC_DARTS_CIFAR``) or a file holding JSON or ``Genotype(...)`` text."""
    if name_or_path in PUBLISHED:
        return PUBLISHED[name_or_path]
    from pathlib import Path

    path = Path(name_or_path)
    if not path.is_file():
        if name_or_path.lstrip().startswith(("{", "Genotype(", "|")):
            return parse_genotype(name_or_path)
        raise ValueError(f"{name_or_path!r} is neither a published genotype ({', '.join(PUBLISHED)}) nor a file")
    if path.stat().st_size > 1_000_000:
        raise ValueError(f"genotype file {path} is too large to be a genotype")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"genotype file {path} is not text") from None
    try:
        return parse_genotype(text)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
