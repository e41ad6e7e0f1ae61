"""The stability report's charts (matplotlib, in the style and op colours of :mod:`pcdarts_core.visualize`): heatmaps,
accuracy forest plots, per-epoch line panels, op-probability small multiples and the accuracy-vs-stability Pareto
front. Every function takes plain numbers and labels; what they mean is decided by :mod:`orchestrator.report`.
"""

from __future__ import annotations

import textwrap
from typing import Any, NamedTuple, Sequence

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from pcdarts_core.visualize import ACCENT, GRID, INK, MUTED, new_figure, op_color, op_label, styled


#: a reference level drawn as a marked line: (value, label with its value)
Level = tuple[float, str]


def _wrap(label: str, width: int = 36) -> str:
    """A long label on several lines (a legend or tick label as wide as the figure leaves no room to lay it out)."""
    return "\n".join(textwrap.wrap(label, width, break_on_hyphens=False)) or label


def _vlines(ax: Any, lines: Sequence[Level]) -> None:
    """Reference levels across the x axis: dotted accent lines, labelled at the top with their values."""
    for value, label in lines:
        ax.axvline(value, color=ACCENT, lw=0.9, ls=":", zorder=1)
        ax.annotate(label, (value, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2), textcoords="offset points",
                    ha="left", va="top", fontsize=6.5, color=ACCENT)


def _hlines(ax: Any, lines: Sequence[Level]) -> None:
    for value, label in lines:
        ax.axhline(value, color=ACCENT, lw=0.8, ls=":")
        ax.annotate(label, (0.99, value), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                    fontsize=6, color=ACCENT)


def series_color(i: int) -> str:
    return to_hex(colormaps["tab10"](i % 10))  # matplotlib's default colour cycle


#: a light grid behind the data; titles on the left
_GRID = {"axes.grid": True, "axes.axisbelow": True, "grid.color": GRID, "grid.linewidth": 0.6,
         "axes.titlelocation": "left"}


def _styled(rc: dict):  # visualize.styled, with the settings rc on top
    return lambda build: styled(rc_context(rc)(build))


# -- heatmap ----------------------------------------------------------------------------------------------------
@_styled({"axes.spines.left": False, "axes.spines.bottom": False})
def heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, *, cmap: str = "Blues",
            fmt: str = "{:.2f}", row_colors: Sequence[str] = (), colorbar: str = "") -> Figure:
    """A labelled heatmap of values in [0, 1], written in the cells (blank where zero)."""
    m = np.asarray(matrix, dtype=float)
    cell = 0.36 if max(m.shape) <= 20 else 0.2
    ax = new_figure(max(3.4, 2.2 + cell * m.shape[1]), max(2.2, 1.2 + cell * m.shape[0])).add_subplot()
    image = ax.imshow(m, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    slanted = max(map(len, cols), default=0) > 3
    ax.set_xticks(range(len(cols)), cols, rotation=50 if slanted else 0, ha="right" if slanted else "center",
                  rotation_mode="anchor")
    ax.set(yticks=range(len(rows)), yticklabels=rows, title=title)
    for tick, color in zip(ax.get_yticklabels(), row_colors):
        tick.set_color(color)
    ax.tick_params(length=0)
    for (i, j), v in np.ndenumerate(m) if max(m.shape) <= 24 else ():
        if np.isfinite(v) and v != 0:
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6.5, color="white" if v > 0.55 else INK)
    bar = ax.figure.colorbar(image, ax=ax, shrink=0.8, pad=0.02)
    bar.ax.tick_params(labelsize=6)
    bar.set_label(colorbar, fontsize=7)
    return ax.figure


# -- accuracy forest ---------------------------------------------------------------------------------------------
class ForestRow(NamedTuple):
    """One row of a forest plot: its seeds' values as dots, the mean as a diamond, the CI as a bar."""

    label: str
    values: Sequence[float]
    mean: float
    ci: tuple[float, float] | None = None
    best_minus_mean: float | None = None
    color: str = "#1f77b4"


@_styled({**_GRID, "axes.grid.axis": "x"})
def forest(rows: Sequence[ForestRow], title: str, lines: Sequence[Level] = ()) -> Figure:
    """Horizontal forest plot of accuracies, one row per entry, top to bottom; best - mean written on the right;
    ``lines``: reference levels (chance accuracy)."""
    ax = new_figure(6.0, 1.0 + 0.36 * len(rows)).add_subplot()
    rng = np.random.default_rng(0)
    for y, row in zip(range(len(rows) - 1, -1, -1), rows):  # the first row on top
        values = np.asarray(row.values, dtype=float)  # finite, at least one
        jitter = rng.uniform(-0.13, 0.13, values.size) if values.size > 1 else np.zeros(1)
        ax.scatter(values, y + jitter, s=16, color=row.color, alpha=0.55, lw=0, zorder=2)
        if row.ci is not None:
            ax.plot(row.ci, (y, y), color=row.color, lw=3.2, alpha=0.45, solid_capstyle="round", zorder=3)
        ax.scatter([row.mean], [y], marker="D", s=34, color=row.color, edgecolor="white", lw=0.8, zorder=4)
        if row.best_minus_mean is not None:
            ax.annotate(f"best−mean {row.best_minus_mean:+.3f}", (1.0, y), xycoords=("axes fraction", "data"),
                        xytext=(4, 0), textcoords="offset points", va="center", fontsize=7.5, color=MUTED)
    ax.set_yticks(range(len(rows)), [_wrap(r.label) for r in reversed(rows)])
    ax.set(ylim=(-0.6, len(rows) + (0.3 if lines else -0.4)), xlabel="accuracy", title=title)
    _vlines(ax, lines)
    return ax.figure


# -- line panels -----------------------------------------------------------------------------------------------
class Series(NamedTuple):
    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: str = "#1f77b4"
    dashed: bool = False
    marks: Sequence[float] = ()  # x positions to mark on this series (e.g. where the genotype stopped changing)


class Panel(NamedTuple):
    title: str
    ylabel: str
    series: Sequence[Series]
    hlines: Sequence[tuple[float, str]] = ()
    ylim: tuple[float, float] | None = None


@_styled({**_GRID, "axes.titlesize": 9})
def line_panels(panels: Sequence[Panel]) -> Figure:
    """A grid of per-epoch line charts, three a row, sharing one legend (series labels of the first panel)."""
    columns = max(1, min(3, len(panels)))
    nrows = -(-len(panels) // columns)
    fig = new_figure(3.1 * columns + 0.9, 2.3 * nrows)
    axes = fig.subplots(nrows, columns, squeeze=False)
    handles: dict[str, object] = {}
    for ax, panel in zip(axes.flat, panels):
        for s in panel.series:
            x, y = np.asarray(s.x, dtype=float), np.asarray(s.y, dtype=float)
            (line,) = ax.plot(x, y, color=s.color, lw=1.3, ls="--" if s.dashed else "-", marker="o" if x.size < 3
                              else None, ms=3, label=s.label)
            if not s.dashed:
                handles.setdefault(s.label, line)
            if (marked := np.isin(x, s.marks)).any():
                ax.scatter(x[marked], y[marked], marker="v", s=34, color=s.color, edgecolor=INK, lw=0.5, zorder=5)
        _hlines(ax, panel.hlines)
        ax.set(title=panel.title, xlabel="epoch", ylabel=panel.ylabel, ylim=panel.ylim)  # None: autoscaled
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    if handles:
        fig.legend(list(handles.values()), [_wrap(h, 24) for h in handles], loc="outside right upper", fontsize=7)
    return fig


# -- op probabilities per edge -----------------------------------------------------------------------------------
@_styled({**_GRID, "grid.linewidth": 0.5})
def op_probability_grid(epochs: np.ndarray, probs: np.ndarray, edges: Sequence[tuple[str, str]],
                        ops: Sequence[str], title: str, chosen: Sequence[set[str]] = ()) -> Figure:
    """Small multiples, one per edge laid out node by node (a row per target node): the probability of each op
    over the epochs (``probs``: epochs x edges x ops). ``chosen[e]`` names the ops the final cell kept on edge
    ``e``; their lines are drawn thick, and edges that kept nothing are greyed."""
    per_row = [[e for e, (_, dst) in enumerate(edges) if dst == t] for t in dict.fromkeys(dst for _, dst in edges)]
    columns = max(len(r) for r in per_row)
    width, height = 1.55 * columns + 1.4, 1.15 * len(per_row) + 0.8
    fig = new_figure(width, height, constrained=False)
    axes = fig.subplots(len(per_row), columns, squeeze=False, sharex=True, sharey=True)
    fig.subplots_adjust(left=0.75 / width, right=1 - 1.15 / width, bottom=0.5 / height, top=1 - 0.62 / height,
                        wspace=0.12, hspace=0.45)
    for r, row in enumerate(per_row):
        for ax in axes[r, len(row):]:
            ax.set_visible(False)
        for ax, e in zip(axes[r], row):
            kept = chosen[e] if chosen else set()
            for k, op in enumerate(ops):
                ax.plot(epochs, probs[:, e, k], color=op_color(op), lw=2.0 if op in kept else 0.9,
                        alpha=1.0 if (op in kept or not chosen) else 0.55, label=op_label(op))
            ax.set_ylim(0, max(0.3, float(np.nanmax(probs)) * 1.05) if probs.size else 1)
            ax.set_title(f"{edges[e][0]} → {edges[e][1]}", fontsize=7, color=INK if kept or not chosen else MUTED)
            ax.tick_params(labelsize=6)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))  # epochs; tick labels never touch
            if chosen and not kept:
                ax.set_facecolor("#f7f7f7")
    handles = [Line2D([], [], color=op_color(op), lw=1.6) for op in ops]
    fig.legend(handles, [op_label(op) for op in ops], loc="upper right", fontsize=7)
    fig.suptitle(title, x=0.01, y=1 - 0.08 / height, ha="left", va="top", fontsize=9)
    fig.supxlabel("epoch", fontsize=7, y=0.02)
    fig.supylabel("softmax(α)", fontsize=7, x=0.01)
    return fig


# -- Pareto front ------------------------------------------------------------------------------------------------
def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Points not dominated when ``x`` is minimized and ``y`` maximized (NaNs never on the front)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    # dominated[i, j]: point j is at least as good as point i in both and better in one
    dominated = (x <= x[:, None]) & (y >= y[:, None]) & ((x < x[:, None]) | (y > y[:, None])) & ok
    return ok & ~dominated.any(axis=1)


@_styled(_GRID)
def pareto(x: Sequence[float], y: Sequence[float], labels: Sequence[str], title: str, xlabel: str, ylabel: str,
           yerr: Sequence[tuple[float, float] | None] = (), xlines: Sequence[Level] = (),
           ylines: Sequence[Level] = ()) -> Figure:
    """Scatter of configurations with the non-dominated ones (min x, max y) joined as a front and labelled;
    ``xlines``/``ylines``: reference levels (random cells' distance, chance accuracy)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    front = pareto_mask(xs, ys)
    ax = new_figure(6.8, 4.2).add_subplot()
    for i, err in enumerate(yerr):
        if err is not None and np.isfinite(xs[i]):
            ax.plot((xs[i], xs[i]), err, color=ACCENT if front[i] else MUTED, lw=1, alpha=0.4)
    ax.scatter(xs[~front], ys[~front], s=28, color=MUTED, alpha=0.8, label="dominated", zorder=2)
    ax.scatter(xs[front], ys[front], s=46, color=ACCENT, edgecolor="white", lw=0.8, label="Pareto front", zorder=3)
    order = np.flatnonzero(front)[np.argsort(xs[front])]
    if order.size > 1:
        ax.step(xs[order], ys[order], where="post", color=ACCENT, lw=1, alpha=0.6, zorder=1)
    at: dict[tuple[float, float], list[int]] = {}  # configurations at the same point share one label
    for i in np.flatnonzero(np.isfinite(xs) & np.isfinite(ys)):
        at.setdefault((float(xs[i]), float(ys[i])), []).append(int(i))
    for (px, py), idx in at.items():
        ax.annotate("\n".join(labels[i] for i in idx), (px, py), xytext=(5, 4), textcoords="offset points",
                    fontsize=7, color=INK if front[idx[0]] else MUTED, va="bottom")
    # margins: room for the labels of the outermost points
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xmargin=0.18, ymargin=0.1)
    _vlines(ax, xlines)
    _hlines(ax, ylines)
    ax.legend(loc="best")
    return ax.figure
