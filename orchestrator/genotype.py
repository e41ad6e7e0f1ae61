"""``python -m orchestrator.genotype``: look at a genotype, size its evaluation network, derive one from alphas.

``derive`` reads JSON or any checkpoint of this project with ``weights_only=True``: nothing is unpickled. ``--json``:
the last line of stdout is a JSON object. Bad input is one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.table import Column, Table

from pcdarts_core.config import eval_config
from pcdarts_core.data import DATASETS
from pcdarts_core.genotypes import CELL_TYPES, Genotype, genotype_from_arch, load_genotype, saved_arch
from pcdarts_core.nb201_arch import NB201Arch
from pcdarts_core.profile import count_madds, count_parameters
from pcdarts_core.runtime import load_checkpoint
from pcdarts_core.spaces import SPACE_NAMES, get_space

from .cli import Parser, run_cli
from .distributed import RAY_CHECKPOINT_FILE
from .run import CHECKPOINT_FILE
from .trainable import CHECKPOINT_FILE as TRIAL_CHECKPOINT_FILE

#: search space -> the datasets of its evaluation network: DARTS's (CIFAR, mobile ImageNet) for darts and s1-s4,
#: NAS-Bench-201's (C=16, N=5; its ImageNet is the 16x16 ImageNet16-120); classes, sizes and defaults: the core's
SPACE_DATASETS = {name: ("cifar10", "cifar100", "imagenet16-120" if name == "nb201" else "imagenet")
                  for name in SPACE_NAMES}
MAX_CHANNELS, MAX_LAYERS = 1024, 100
MAX_JSON_BYTES = 64 * 1024 * 1024
#: the checkpoint files of a single run, a Ray Train run and a sweep trial (orchestrator.distributed/trainable)
CHECKPOINT_FILES = (CHECKPOINT_FILE, RAY_CHECKPOINT_FILE, TRIAL_CHECKPOINT_FILE)


# -- info --------------------------------------------------------------------------------------------------------
def load_for_space(text: str, space: str) -> Genotype | NB201Arch:
    """A genotype (name, file or text) of ``space``: NAS-Bench-201 cells for nb201, DARTS genotypes otherwise."""
    genotype = load_genotype(text)
    if isinstance(genotype, NB201Arch) != (space == "nb201"):
        kind, hint = (("a NAS-Bench-201 cell", "--space nb201") if isinstance(genotype, NB201Arch)
                      else ("a DARTS genotype", "--space darts (or s1-s4)"))
        raise ValueError(f"{text[:80]!r} is {kind}, not a cell of search space {space}; use {hint}")
    return genotype


def cmd_info(args: argparse.Namespace, console: Console) -> str:
    """Parameters (auxiliary head excluded) and multiply-adds of the evaluation network; returns them as JSON."""
    genotype = load_for_space(args.genotype, args.space)
    dataset, space = args.dataset, args.space
    if dataset not in SPACE_DATASETS[get_space(space).name]:
        raise ValueError(f"--dataset {dataset} is not one of search space {space}'s: "
                         f"{', '.join(SPACE_DATASETS[space])}")
    defaults = eval_config(dataset, search_space=space)
    channels = defaults.init_channels if args.channels is None else args.channels
    layers = defaults.layers if args.layers is None else args.layers
    for flag, value, low, high in (("--channels", channels, 1, MAX_CHANNELS),
                                   ("--layers", layers, 1 if space == "nb201" else 3, MAX_LAYERS)):
        if not low <= value <= high:
            raise ValueError(f"{flag} must be in {low}..{high}, got {value}")
    cfg = eval_config(dataset, search_space=space, init_channels=channels, layers=layers)
    size = DATASETS[dataset].image_size
    with torch.no_grad():
        model = get_space(space).eval_network(cfg, genotype, DATASETS[dataset].num_classes)
        params, madds = count_parameters(model), count_madds(model, size)
    table = Table(Column("what", style="bold"), Column("value", justify="right"),
                  title=f"Evaluation network: {args.genotype}", show_header=False)
    table.add_row("search space", space)
    table.add_row("dataset", f"{dataset} ({size}x{size})")
    table.add_row("channels C / " + ("cells per stage N" if space == "nb201" else "cells"), f"{channels} / {layers}")
    for label, n in (("parameters (no aux head)", params), ("multiply-adds", madds)):
        table.add_row(label, f"{n:,} ({n / 1e6:.2f}M)")
    console.print(table)
    return json.dumps({"params": params, "madds": madds, "dataset": dataset, "space": space, "channels": channels,
                       "layers": layers, "input_size": size, "genotype": genotype.to_dict()}, sort_keys=True)


# -- show --------------------------------------------------------------------------------------------------------
def input_name(index: int) -> str:
    """Inputs 0/1 are the cell inputs c_{k-2}/c_{k-1}; input i >= 2 is intermediate node i - 2."""
    return {0: "c_{k-2}", 1: "c_{k-1}"}.get(index, f"node {index - 2}")


def print_cell(console: Console, title: str, rows: list[tuple[str, str, str]], output: str, **kwargs: Any) -> None:
    """One cell as a (node, input, op) table, then the line saying what the cell outputs."""
    table = Table("node", "input", "op", title=title)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(output, markup=False, highlight=False, **kwargs)


def print_genotype(genotype: Genotype, console: Console) -> None:
    """Both cells of a DARTS genotype, node by node."""
    for cell in CELL_TYPES:
        rows = [(f"node {node}" if k == 0 else "", input_name(inp), op)
                for node, edges in enumerate(genotype.nodes(cell)) for k, (op, inp) in enumerate(edges)]
        concat = ", ".join(input_name(i) for i in getattr(genotype, f"{cell}_concat"))
        print_cell(console, f"{cell} cell", rows, f"output = concat({concat})")


def cmd_show(args: argparse.Namespace, console: Console) -> str:
    genotype = load_for_space(args.genotype, args.space)
    if isinstance(genotype, NB201Arch):
        rows = [(f"node {dst}" if src == 0 else "", "input (node 0)" if src == 0 else f"node {src}", op)
                for src, dst, op in genotype.edges()]
        print_cell(console, "NAS-Bench-201 cell", rows, f"output = node 3; {genotype}", soft_wrap=True)
    else:
        print_genotype(genotype, console)
    if args.svg:
        from pcdarts_core.visualize import write_genotype_svg  # matplotlib only when drawing

        console.print(f"cell diagrams: {write_genotype_svg(genotype, args.svg, args.genotype)}", markup=False)
    return genotype.to_json()


# -- derive ------------------------------------------------------------------------------------------------------
def read_saved(path: Path) -> tuple[Path, dict[str, Any]]:
    """(the file, what it holds, unwrapped from a run's ``searcher``): JSON or a checkpoint, or for a folder the
    checkpoint in it or in its newest ``checkpoint_*`` folder."""
    if path.is_dir():
        folders = [path, *sorted((p for p in path.glob("checkpoint_*") if p.is_dir()), reverse=True)]
        files = [f / name for f in folders for name in CHECKPOINT_FILES if (f / name).is_file()]
        if not files:
            raise ValueError(f"{path}: a directory without a checkpoint ({', '.join(CHECKPOINT_FILES)}, directly or "
                             f"in a checkpoint_* folder)")
        path = files[0]
    if not path.is_file():
        raise ValueError(f"{path}: " + ("not a regular file" if path.exists() else "no such file or directory"))
    with path.open("rb") as fh:
        head = fh.read(64).lstrip()
    if path.suffix.lower() == ".json" or head.startswith((b"{", b"[")):
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{path}: file is too large for saved arch parameters")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected an object with alphas_normal/alphas_reduce, got {type(data).__name__}")
    else:
        data = load_checkpoint(path)  # a truncated or foreign file is one error naming it
    while "alphas_normal" not in data and "searcher" in data:
        if not isinstance(data["searcher"], dict):
            raise ValueError(f"{path}: this checkpoint holds no running search (an HPO trial saved between two "
                             f"seeds: the finished seeds' genotypes are in the experiment's results)")
        data = data["searcher"]
    return path, data


def cmd_derive(args: argparse.Namespace, console: Console) -> str:
    path, data = read_saved(Path(args.file))
    try:
        genotype = genotype_from_arch(saved_arch(data))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    print_genotype(genotype, console)
    console.print(str(genotype), markup=False, highlight=False, soft_wrap=True)
    return genotype.to_json()


# -- entry point -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m orchestrator.genotype", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    info = sub.add_parser("info", help="parameters and multiply-adds of the evaluation network")
    show = sub.add_parser("show", help="print both cells")
    derive = sub.add_parser("derive", help="derive a genotype from saved arch parameters (.json, a checkpoint "
                                           "of this project, or its folder)")
    for command in (info, show):
        command.add_argument("genotype", metavar="NAME_OR_FILE")
        command.add_argument("--space", default="darts", choices=SPACE_NAMES, help="search space of the cell" + (
            " (nb201: a NAS-Bench-201 string |op~0|+...)" if command is info else ""))
    info.add_argument("--dataset", required=True, choices=sorted({d for t in SPACE_DATASETS.values() for d in t}))
    info.add_argument("--channels", type=int, help="initial channels C (36 CIFAR, 48 ImageNet; nb201: 16)")
    info.add_argument("--layers", type=int, help="cells (20 CIFAR, 14 ImageNet; nb201: N=5 cells per stage)")
    derive.add_argument("file", metavar="FILE", help="a .json/.pt file or a checkpoint folder")
    for command in (info, show, derive):
        command.add_argument("--json", action="store_true", help="last line of stdout: " + (
            "a JSON object" if command is info else "the genotype JSON"))
    show.add_argument("--svg", metavar="FILE", help="also draw the cells into an SVG file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    as_json = {"info": cmd_info, "show": cmd_show, "derive": cmd_derive}[args.command](args, Console(highlight=False))
    if args.json:
        print(as_json)
    return 0


if __name__ == "__main__":
    run_cli(main)
