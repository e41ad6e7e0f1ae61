"""Pictures of searched cells: any cell as a graph (input nodes, intermediate nodes, (src, dst, op) edges, output),
drawn with matplotlib as SVG (no graphviz needed), and the one colour and short label of each op that every
figure of the project uses (the report's charts take them from here).

:class:`CellGraph` is the one thing the drawer knows. Converters make it from what the project stores:

- :func:`darts_cell_graph`: one cell ('normal' or 'reduce') of a DARTS-space :class:`Genotype` (inputs
  ``c_{k-2}``, ``c_{k-1}``; intermediate nodes 0..n-1; output ``c_{k}`` = concat of ``*_concat``);
- :func:`edge_list_cell_graph`: a cell given as ``(src_node, dst_node, op)`` edges over numbered nodes, node 0
  the input and the last node the output, as NAS-Bench-201 cells are (``none`` edges drawn faint and dotted);
- :func:`cell_graphs`: every cell of a stored genotype text, whatever its space (DARTS JSON / ``Genotype(...)``
  text, or an NB201 architecture string ``|op~0|+|op~0|op~1|+|...|``).

Layout: inputs on the left, intermediate nodes left to right in topological order on a zig-zag, the output on
the right; an edge is straight when that clears every other node, else it takes the gentlest arc (either side)
that does, and its label slides along it away from nodes and other labels.
Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot: no global figure state, safe in a
sweep driver's threads) and saved as SVG with text kept as text.
"""

from __future__ import annotations

import functools
import io
import math
import re
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch
from matplotlib.transforms import Bbox

from .genotypes import CELL_TYPES, Genotype, parse_genotype

INK = "#222222"
MUTED = "#8a8a8a"
GRID = "#e6e6e6"
ACCENT = "#c0392b"

#: one colour per op, the same in every figure: convolutions greens/blues/purples, pools raspberry and mustard,
#: the parameter-free skip in a warning orange (collapse is skips taking over), the zero op the only grey; the ops
#: of one space differ clearly (CIELAB distance >= 20, tests/test_report.py)
_OP_COLORS = {
    "none": "#b3b3b3",
    "skip_connect": "#e67e22",
    "max_pool_3x3": "#c2477f",
    "avg_pool_3x3": "#d4a017",
    "sep_conv_3x3": "#27ae60",
    "sep_conv_5x5": "#1e7d45",
    "sep_conv_7x7": "#145a32",
    "dil_conv_3x3": "#8e44ad",
    "dil_conv_5x5": "#5b2c6f",
    "sharp_sep_conv_3x3": "#16a085",
    "sharp_sep_conv_5x5": "#0e6655",
    "nor_conv_1x1": "#2e86c1",
    "nor_conv_3x3": "#1b4f72",
    "noise": "#a04000",
}
_FALLBACK = ("#d35400", "#2874a6", "#7d3c98", "#117a65", "#b7950b", "#922b21", "#566573")
_OP_LABELS = {"skip_connect": "skip", "none": "none", "noise": "noise", "nor_conv_1x1": "conv 1x1",
              "nor_conv_3x3": "conv 3x3"}


def op_color(op: str) -> str:
    """The op's colour (a fixed one for known ops, a stable pick by name for others)."""
    return _OP_COLORS.get(op) or _FALLBACK[zlib.crc32(op.encode()) % len(_FALLBACK)]


def op_label(op: str) -> str:
    """A short label: ``sep_conv_3x3`` -> ``sep 3x3``, ``skip_connect`` -> ``skip``."""
    if op in _OP_LABELS:
        return _OP_LABELS[op]
    return re.sub(r"_(conv|pool)_", " ", op).replace("sharp_sep", "sharp").replace("_", " ")


_RC = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "axes.edgecolor": "#555555",
       "axes.linewidth": 0.6, "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8,
       "axes.formatter.useoffset": False,
       "legend.frameon": False, "axes.spines.top": False, "axes.spines.right": False, "axes.titlecolor": INK,
       "text.color": INK, "axes.labelcolor": INK}


def styled(build: Callable[..., Figure]) -> Callable[..., Figure]:
    """Run a figure builder under the report's style (matplotlib reads most settings when artists are made)."""
    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(_RC):
            return build(*args, **kwargs)

    return wrapper


def new_figure(width: float, height: float, constrained: bool = True) -> Figure:
    """A figure; constrained layout unless the caller places its axes itself (it costs ~0.2 s per axes)."""
    return Figure(figsize=(width, height), layout="constrained" if constrained else None)


def figure_svg(fig: Figure, key: str) -> str:
    """The figure as an inline ``<svg>`` element (no XML prolog, no date; ids salted by ``key`` so several SVGs
    in one page never share an id)."""
    buf = io.StringIO()
    with matplotlib.rc_context({**_RC, "svg.hashsalt": key}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.index("<svg"):], count=1, flags=re.S)
    # matplotlib names every group figure_1, patch_1, ...: unreferenced, and duplicates once several SVGs share
    # a page. The ids that are referenced (clip paths, markers) are salted hashes without an _N suffix. Legends
    # keep a class (the report's page checks that no legend covers other text).
    text = re.sub(r'<g id="legend_\d+"', '<g class="mpl-legend"', text)
    return re.sub(r'\sid="[A-Za-z][\w.]*_\d+"', "", text)


Edge = tuple[str, str, str]

#: op names drawn as absent edges (faint, dotted): the zero op
ZERO_OPS = frozenset({"none"})


@dataclass(frozen=True)
class CellGraph:
    """A cell: ``inputs`` and ``nodes`` (names, in topological order), ``edges`` (src, dst, op) and ``output``,
    the nodes whose concatenation (or, for a single node, itself) is the cell's output."""

    inputs: tuple[str, ...]
    nodes: tuple[str, ...]
    edges: tuple[Edge, ...]
    output: tuple[str, ...]
    output_name: str = "c_{k}"

    def __post_init__(self) -> None:
        known = set(self.inputs) | set(self.nodes)
        if len(known) != len(self.inputs) + len(self.nodes):
            raise ValueError("cell graph node names must be distinct")
        order = {n: i for i, n in enumerate(self.inputs + self.nodes)}
        for src, dst, op in self.edges:
            if src not in known or dst not in self.nodes:
                raise ValueError(f"cell graph edge {src}->{dst} ({op}) names an unknown node")
            if order[src] >= order[dst]:
                raise ValueError(f"cell graph edge {src}->{dst} goes backwards")
        if not self.output or not set(self.output) <= known:
            raise ValueError(f"cell graph output {list(self.output)} names unknown nodes")

    def slots(self) -> list[tuple[str, str]]:
        """Every edge the cell could have, in the supernet's order (the rows of its alphas): node by node, each
        from every input and earlier node."""
        states = self.inputs + self.nodes
        return [(src, dst) for i, dst in enumerate(self.nodes) for src in states[:len(self.inputs) + i]]

    def edge_key(self, src: str, dst: str) -> str:
        """The edge's key in :mod:`orchestrator.stability`'s frequency tables: ``"<src state>-><dst node + 2>"``."""
        return f"{(self.inputs + self.nodes).index(src)}->{self.nodes.index(dst) + 2}"


# -- converters -------------------------------------------------------------------------------------------------
def _darts_name(index: int) -> str:
    """State ``index`` of a DARTS cell: 0/1 the inputs c_{k-2}/c_{k-1}, i >= 2 intermediate node i - 2."""
    return {0: "c_{k-2}", 1: "c_{k-1}"}.get(index, str(index - 2))


def darts_cell_graph(genotype: Genotype, cell: str) -> CellGraph:
    """The ``cell`` ('normal' or 'reduce') of a DARTS-space genotype as a graph."""
    if cell not in CELL_TYPES:
        raise ValueError(f"cell must be one of {', '.join(CELL_TYPES)}, got {cell!r}")
    nodes = genotype.nodes(cell)
    edges = tuple((_darts_name(inp), _darts_name(node + 2), op) for node, pairs in enumerate(nodes)
                  for op, inp in pairs)
    concat = tuple(_darts_name(i) for i in getattr(genotype, f"{cell}_concat"))
    return CellGraph(("c_{k-2}", "c_{k-1}"), tuple(str(i) for i in range(len(nodes))), edges, concat)


def edge_list_cell_graph(edges: Iterable[tuple[int, int, str]], n_inputs: int = 1) -> CellGraph:
    """A cell given as ``(src_node, dst_node, op)`` over nodes 0..N (the first ``n_inputs`` are inputs), its
    output the last node: NAS-Bench-201's form (node 0 the input, node 3 the output)."""
    edges = [(int(s), int(d), str(op)) for s, d, op in edges]
    if not edges:
        raise ValueError("a cell needs at least one edge")
    last = max(d for _, d, _ in edges)
    names = [str(i) for i in range(last + 1)]
    return CellGraph(tuple(names[:n_inputs]), tuple(names[n_inputs:]),
                     tuple((names[s], names[d], op) for s, d, op in edges), (names[last],), output_name="out")


def cell_graphs(genotype: Any) -> list[tuple[str, CellGraph]]:
    """(cell name, graph) of every cell of a genotype (object or stored text): 'normal' and 'reduce' in the
    DARTS space; one 'cell' for an architecture that lists its own ``edges()`` as ``(src, dst, op)`` (a
    NAS-Bench-201 cell) or for an NB201 architecture string."""
    if isinstance(genotype, str):
        genotype = parse_genotype(genotype)  # an NB201 string gives an NB201Arch, which lists its edges()
    if callable(getattr(genotype, "edges", None)):
        return [("cell", edge_list_cell_graph(genotype.edges()))]
    return [(cell, darts_cell_graph(genotype, cell)) for cell in CELL_TYPES]


# -- layout -----------------------------------------------------------------------------------------------------
_DX, _DY = 2.0, 1.2
_RADIUS = 0.3  # intermediate nodes (data units)


def layout(graph: CellGraph) -> dict[str, tuple[float, float]]:
    """Node positions: inputs stacked in the first column, then one column per intermediate node in topological
    order on a zig-zag (so edges into one node arrive from different distances and their labels spread out), the
    output (key ``"__output__"``) in a last column."""
    pos: dict[str, tuple[float, float]] = {}
    for i, name in enumerate(graph.inputs):
        pos[name] = (0.0, ((len(graph.inputs) - 1) / 2 - i) * _DY * 1.6)
    for i, name in enumerate(graph.nodes):
        pos[name] = ((i + 1) * _DX, (_DY / 2 if i % 2 == 0 else -_DY / 2) if len(graph.nodes) > 1 else 0.0)
    pos["__output__"] = ((len(graph.nodes) + 1) * _DX, 0.0)
    return pos


def _bend(pos: dict[str, tuple[float, float]], src: str, dst: str) -> float:
    """arc3 ``rad`` of an edge: straight when that clears the other nodes, else the gentlest bend (either side)
    that keeps farthest from them."""
    others = [p for name, p in pos.items() if name not in (src, dst)]

    def clearance(rad: float) -> float:
        points = [_point_on_arc(pos[src], pos[dst], rad, t) for t in np.linspace(0.08, 0.92, 15)]
        return min([math.hypot(x - a, y - b) for x, y in points for a, b in others] + [10.0])

    best, best_clear = 0.0, -1.0
    for rad in (0.0, 0.25, -0.25, 0.4, -0.4, 0.55, -0.55):
        c = clearance(rad)
        if c >= _RADIUS + 0.3:
            return rad
        if c > best_clear:
            best, best_clear = rad, c
    return best


def _point_on_arc(p0: tuple[float, float], p1: tuple[float, float], rad: float, t: float = 0.5) -> tuple[float, float]:
    """A point of matplotlib's arc3 quadratic Bezier (control point = midpoint + rad * (dy, -dx))."""
    (x0, y0), (x1, y1) = p0, p1
    cx, cy = (x0 + x1) / 2 + rad * (y1 - y0), (y0 + y1) / 2 - rad * (x1 - x0)
    a, b, c = (1 - t) ** 2, 2 * (1 - t) * t, t ** 2
    return a * x0 + b * cx + c * x1, a * y0 + b * cy + c * y1


#: where along its edge a label may sit (fractions of the arc), in the order tried
_LABEL_TS = (0.5, 0.4, 0.6, 0.32, 0.68, 0.25, 0.75, 0.45, 0.55, 0.2, 0.8, 0.36, 0.64, 0.15, 0.85)


def _overlap(a: Any, b: Any, pad: float) -> float:
    """The area two display boxes (``Bbox``) share, each grown by ``pad`` pixels."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0) + 2 * pad
    h = min(a.y1, b.y1) - max(a.y0, b.y0) + 2 * pad
    return max(0.0, w) * max(0.0, h)


def _place_labels(ax: Any, pos: dict[str, tuple[float, float]], arcs: Sequence[tuple[str, str, float]],
                  texts: Sequence[Any], obstacles: Sequence[Any]) -> None:
    """Slide each edge's label (a placed ``Text``) along its arc to the first spot whose laid-out box clears the
    ``obstacles`` (display ``Bbox``es, or artists such as the title) and the labels placed before it (else the
    spot overlapping them least)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(ax.figure).get_renderer()
    taken = [o if isinstance(o, Bbox) else o.get_window_extent(renderer) for o in obstacles]
    for (src, dst, rad), text in zip(arcs, texts):
        best, best_cost = None, math.inf
        for t in _LABEL_TS:
            text.set_position(_point_on_arc(pos[src], pos[dst], rad, t))
            box = text.get_window_extent(renderer)
            cost = sum(_overlap(box, other, 2.0) for other in taken)
            if cost < best_cost:
                best, best_cost = (text.get_position(), box), cost
            if cost == 0:
                break
        text.set_position(best[0])
        taken.append(best[1])


# -- drawing ----------------------------------------------------------------------------------------------------
_BOX = (0.9, 0.46)  # inputs and output (width, height)
_INCH = 0.45  # inches per data unit: every diagram at the same scale


def node_label(name: str) -> str:
    """A node name as matplotlib text: ``c_{k-1}`` as mathtext, plain names as they are."""
    return f"${name}$" if "_" in name else name


@styled
def draw_cell(graph: CellGraph, title: str = "") -> Figure:
    """A figure of the cell: nodes as circles, edges as arrows coloured and labelled by op."""
    pos = layout(graph)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()] + [_point_on_arc(pos[s], pos[d], _bend(pos, s, d))[1]
                                        for s, d, _ in graph.edges]
    x_lo, x_hi = min(xs) - 0.55, max(xs) + 0.55
    y_lo, y_hi = min(ys) - 0.75, max(ys) + 0.75
    top = 0.3 if title else 0.0
    fig = Figure(figsize=((x_hi - x_lo) * _INCH, (y_hi - y_lo) * _INCH + top))
    ax = fig.add_axes((0, 0, 1, 1 - top / ((y_hi - y_lo) * _INCH + top)))
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.axis("off")
    heading = fig.suptitle(title, fontsize=9.5, color=INK, y=0.995, va="top") if title else None
    boxed = set(graph.inputs) | {"__output__"}

    def shrink(name: str) -> float:  # points from the node's centre to its outline
        return (_BOX[0] / 2 if name in boxed else _RADIUS) * _INCH * 72 + 1

    arcs, labels = [], []
    for src, dst, op in graph.edges:
        rad = _bend(pos, src, dst)
        zero = op in ZERO_OPS
        color = op_color(op)
        ax.add_patch(FancyArrowPatch(pos[src], pos[dst], connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                     mutation_scale=10, lw=0.9 if zero else 1.7, color=color,
                                     linestyle=":" if zero else "-", alpha=0.6 if zero else 0.95,
                                     shrinkA=shrink(src), shrinkB=shrink(dst), zorder=1))
        arcs.append((src, dst, rad))
        labels.append(ax.text(0, 0, op_label(op), fontsize=7.5, ha="center", va="center",
                              color=MUTED if zero else color, zorder=3,
                              bbox={"boxstyle": "round,pad=0.12", "fc": "white", "ec": "none", "alpha": 0.9}))
    for name in graph.output:
        ax.add_patch(FancyArrowPatch(pos[name], pos["__output__"], arrowstyle="-|>", mutation_scale=8, lw=0.8,
                                     color=MUTED, linestyle="--", zorder=0, shrinkA=shrink(name),
                                     shrinkB=shrink("__output__")))
    for name in graph.inputs:
        _node(ax, pos[name], node_label(name), "#dbe7f3", boxed=True)
    for name in graph.nodes:
        _node(ax, pos[name], name, "#f4f4f4")
    _node(ax, pos["__output__"], node_label(graph.output_name), "#fdebd3", boxed=True)
    # the labels keep clear of the nodes' shapes and the title (in display units, as laid out)
    to_display = ax.transData.transform
    shapes = [Bbox(to_display([(x - w / 2, y - h / 2), (x + w / 2, y + h / 2)])) for name, (x, y) in pos.items()
              for w, h in [_BOX if name in boxed else (2 * _RADIUS, 2 * _RADIUS)]]
    _place_labels(ax, pos, arcs, labels, shapes + ([heading] if heading is not None else []))
    return fig


def _node(ax, xy: tuple[float, float], text: str, face: str, boxed: bool = False) -> None:
    if boxed:
        w, h = _BOX
        ax.add_patch(FancyBboxPatch((xy[0] - w / 2, xy[1] - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.12",
                                    fc=face, ec=INK, lw=0.8, zorder=2))
    else:
        ax.add_patch(Circle(xy, _RADIUS, fc=face, ec=INK, lw=0.8, zorder=2))
    ax.text(xy[0], xy[1], text, fontsize=9, ha="center", va="center", color=INK, zorder=3)


def cell_svg(graph: CellGraph, title: str = "", key: str = "cell") -> str:
    """:func:`draw_cell` as inline SVG text."""
    return figure_svg(draw_cell(graph, title), key)


def genotype_svgs(text: Any, label: str = "", key: str = "cell") -> list[tuple[str, str]]:
    """(cell name, SVG) of every cell of a genotype, titled ``"<label> <cell> cell"``."""
    out = []
    for cell, graph in cell_graphs(text):
        name = "" if cell == "cell" else f"{cell} cell"
        title = " — ".join(t for t in (label, name) if t)
        out.append((cell, cell_svg(graph, title, key=f"{key}-{cell}")))
    return out


def svg_document(svgs: Sequence[str], gap: float = 6.0) -> str:
    """Inline SVGs stacked top to bottom as one standalone SVG file (sizes read from their pt width/height)."""
    sizes = []
    for svg in svgs:
        head = svg[:svg.index(">")]
        w, h = (float(re.search(rf'\b{a}="([\d.]+)pt"', head).group(1)) for a in ("width", "height"))
        sizes.append((w, h))
    width = max((w for w, _ in sizes), default=0.0)
    height = sum(h for _, h in sizes) + gap * max(0, len(sizes) - 1)
    body, y = [], 0.0
    for svg, (_, h) in zip(svgs, sizes):
        head, rest = svg.split(">", 1)  # child sizes in the parent's user units (its viewBox is in pt)
        head = re.sub(r'\b(width|height)="([\d.]+)pt"', r'\1="\2"', head).replace("<svg ", f'<svg x="0" y="{y:.1f}" ', 1)
        body.append(f"{head}>{rest}")
        y += h + gap
    return ('<?xml version="1.0" encoding="utf-8" standalone="no"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{width:.1f}pt" height="{height:.1f}pt" viewBox="0 0 {width:.1f} {height:.1f}" version="1.1">'
            + "".join(body) + "</svg>\n")


def write_genotype_svg(genotype: Any, path: str, label: str = "") -> str:
    """Every cell of a genotype as one standalone SVG file at ``path`` (``genotype show --svg``)."""
    text = svg_document([svg for _, svg in genotype_svgs(genotype, label)])
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
