"""``python -m orchestrator.genotype``: look at a genotype, size its evaluation network, derive one from alphas.

- ``info NAME_OR_FILE --dataset cifar10|cifar100|imagenet``: parameters (auxiliary head excluded) and
  multiply-adds of the evaluation network, as DARTS/PC-DARTS tables report them. ``--space nb201`` takes a
  NAS-Bench-201 string (``|nor_conv_3x3~0|+...``) and sizes the benchmark's network (C=16, N=5) on
  cifar10|cifar100|imagenet16-120, as the benchmark's ``params`` column.
- ``show NAME_OR_FILE [--space S] [--svg FILE]``: both cells node by node (nb201: the cell's six edges), and
  drawn into an SVG file.
- ``derive FILE``: the PC-DARTS derivation rule applied to saved arch parameters: JSON, or any checkpoint this
  project writes (a single run's ``checkpoint.pt``, a Ray Train ``search.pt``, a sweep trial's ``state.pt``, or
  the folder holding one), loaded with ``weights_only=True``: nothing is unpickled.

``--json`` makes the last line of stdout a JSON object. Bad input is one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.table import Table

from pcdarts_core.config import eval_config
from pcdarts_core.genotypes import CELL_TYPES, Genotype, genotype_from_arch, load_genotype
from pcdarts_core.nb201_arch import NB201Arch
from pcdarts_core.profile import count_madds, count_parameters
from pcdarts_core.runtime import load_checkpoint
from pcdarts_core.spaces import SPACE_NAMES, get_space

from .cli import Parser, run_cli
from .distributed import RAY_CHECKPOINT_FILE
from .run import CHECKPOINT_FILE
from .trainable import CHECKPOINT_FILE as TRIAL_CHECKPOINT_FILE

#: dataset -> (classes, input resolution, default C, default layers): DARTS Sec. 3.3 (CIFAR) and 3.4 (mobile).
DATASETS: dict[str, tuple[int, int, int, int]] = {
    "cifar10": (10, 32, 36, 20),
    "cifar100": (100, 32, 36, 20),
    "imagenet": (1000, 224, 48, 14),
}
#: The same for NAS-Bench-201's network (Dong & Yang, Sec. 2): C=16, N=5 cells per stage, 16x16 ImageNet16-120.
NB201_DATASETS: dict[str, tuple[int, int, int, int]] = {
    "cifar10": (10, 32, 16, 5),
    "cifar100": (100, 32, 16, 5),
    "imagenet16-120": (120, 16, 16, 5),
}
#: search space -> its datasets table (s1-s4 derive DARTS genotypes: DARTS's networks)
SPACE_DATASETS: dict[str, dict[str, tuple[int, int, int, int]]] = {
    **{name: DATASETS for name in SPACE_NAMES if name != "nb201"}, "nb201": NB201_DATASETS}
MAX_CHANNELS, MAX_LAYERS = 1024, 100
MAX_JSON_BYTES = 64 * 1024 * 1024
#: the checkpoint files of a single run, a Ray Train run and a sweep trial (orchestrator.distributed/trainable)
CHECKPOINT_FILES = (CHECKPOINT_FILE, RAY_CHECKPOINT_FILE, TRIAL_CHECKPOINT_FILE)
ARCH_KEYS = ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce")


# -- info --------------------------------------------------------------------------------------------------------
def dataset_info(space: str, dataset: str) -> tuple[int, int, int, int]:
    """(classes, input size, default C, default layers) of ``dataset`` in ``space``'s evaluation network."""
    table = SPACE_DATASETS[get_space(space).name]
    if dataset not in table:
        raise ValueError(f"--dataset {dataset} is not one of search space {space}'s: {', '.join(table)}")
    return table[dataset]


def build_eval_network(genotype: Genotype | NB201Arch, dataset: str, channels: int, layers: int,
                       space: str = "darts") -> torch.nn.Module:
    """The evaluation network of ``dataset`` in ``space`` (DARTS's with its auxiliary head on, as trained; the
    head is excluded from the counts; NAS-Bench-201's ``TinyNetwork``)."""
    num_classes = dataset_info(space, dataset)[0]
    min_layers = 1 if space == "nb201" else 3
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"--channels must be in 1..{MAX_CHANNELS}, got {channels}")
    if not min_layers <= layers <= MAX_LAYERS:
        raise ValueError(f"--layers must be in {min_layers}..{MAX_LAYERS}, got {layers}")
    cfg = eval_config(dataset, search_space=space, init_channels=channels, layers=layers)
    return get_space(space).eval_network(cfg, genotype, num_classes)


def network_info(genotype: Genotype | NB201Arch, dataset: str, channels: int | None = None,
                 layers: int | None = None, space: str = "darts") -> dict[str, Any]:
    _, size, default_c, default_layers = dataset_info(space, dataset)
    channels = default_c if channels is None else channels
    layers = default_layers if layers is None else layers
    with torch.no_grad():
        model = build_eval_network(genotype, dataset, channels, layers, space)
        params, madds = count_parameters(model), count_madds(model, size)
    return {"params": params, "madds": madds, "dataset": dataset, "space": space, "channels": channels,
            "layers": layers, "input_size": size, "genotype": genotype.to_dict()}


def load_for_space(text: str, space: str) -> Genotype | NB201Arch:
    """A genotype (name, file or text) that must belong to ``space``: NAS-Bench-201 cells to nb201, DARTS
    genotypes to the others."""
    genotype = load_genotype(text)
    if isinstance(genotype, NB201Arch) != (space == "nb201"):
        kind = "a NAS-Bench-201 cell" if isinstance(genotype, NB201Arch) else "a DARTS genotype"
        hint = "--space nb201" if isinstance(genotype, NB201Arch) else "--space darts (or s1-s4)"
        raise ValueError(f"{text[:80]!r} is {kind}, not a cell of search space {space}; use {hint}")
    return genotype


def _human(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f}M)"


def cmd_info(args: argparse.Namespace, console: Console) -> None:
    genotype = load_for_space(args.genotype, args.space)
    info = network_info(genotype, args.dataset, args.channels, args.layers, args.space)
    table = Table(title=f"Evaluation network: {args.genotype}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("search space", args.space)
    table.add_row("dataset", f"{info['dataset']} ({info['input_size']}x{info['input_size']})")
    table.add_row("channels C / " + ("cells per stage N" if args.space == "nb201" else "cells"),
                  f"{info['channels']} / {info['layers']}")
    table.add_row("parameters (no aux head)", _human(info["params"]))
    table.add_row("multiply-adds", _human(info["madds"]))
    console.print(table)
    if args.json:
        print(json.dumps(info, sort_keys=True))


# -- show --------------------------------------------------------------------------------------------------------
def input_name(index: int) -> str:
    """Inputs 0/1 are the cell inputs c_{k-2}/c_{k-1}; input i >= 2 is intermediate node i - 2."""
    return {0: "c_{k-2}", 1: "c_{k-1}"}.get(index, f"node {index - 2}")


def print_genotype(genotype: Genotype, console: Console) -> None:
    for cell in CELL_TYPES:
        table = Table(title=f"{cell} cell")
        table.add_column("node")
        table.add_column("input")
        table.add_column("op")
        for node, edges in enumerate(genotype.nodes(cell)):
            for k, (op, inp) in enumerate(edges):
                table.add_row(f"node {node}" if k == 0 else "", input_name(inp), op)
        console.print(table)
        concat = ", ".join(input_name(i) for i in getattr(genotype, f"{cell}_concat"))
        console.print(f"output = concat({concat})", markup=False, highlight=False)


def print_nb201_arch(arch: NB201Arch, console: Console) -> None:
    table = Table(title="NAS-Bench-201 cell")
    table.add_column("node")
    table.add_column("input")
    table.add_column("op")
    for src, dst, op in arch.edges():
        table.add_row(f"node {dst}" if src == 0 else "", "input (node 0)" if src == 0 else f"node {src}", op)
    console.print(table)
    console.print(f"output = node 3; {arch}", markup=False, highlight=False, soft_wrap=True)


def cmd_show(args: argparse.Namespace, console: Console) -> None:
    genotype = load_for_space(args.genotype, args.space)
    if isinstance(genotype, NB201Arch):
        print_nb201_arch(genotype, console)
    else:
        print_genotype(genotype, console)
    if args.svg:
        from pcdarts_core.visualize import write_genotype_svg  # matplotlib only when drawing

        console.print(f"cell diagrams: {write_genotype_svg(genotype, args.svg, args.genotype)}", markup=False)
    if args.json:
        print(genotype.to_json())


# -- derive ------------------------------------------------------------------------------------------------------
def read_arch_file(path: Path) -> dict[str, Any]:
    """The arch parameters saved in a JSON file or a checkpoint, as a dict with ``alphas_normal`` etc.

    Checkpoints are read with ``weights_only=True``: a bare state dict, one with a ``model`` state dict, or any
    checkpoint this project writes (:func:`search_state`).
    """
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    with path.open("rb") as fh:
        head = fh.read(64).lstrip()
    if path.suffix.lower() == ".json" or head.startswith((b"{", b"[")):
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{path}: file is too large for saved arch parameters")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({str(err).splitlines()[0]})") from None
    else:
        data = load_checkpoint(path)  # weights_only; a truncated or foreign file is one error naming it
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object with alphas_normal/alphas_reduce, got {type(data).__name__}")
    if "alphas_normal" not in data:
        data = search_state(data, str(path))
        for key in ("model", "state_dict"):
            if isinstance(data.get(key), dict):
                arch = _from_state_dict(data[key], str(path))
                method_state = data.get("method")  # P-DARTS keeps its pruned per-edge op lists there
                primitives = data.get("primitives", method_state.get("primitives")
                                      if isinstance(method_state, dict) else None)
                if primitives is not None:
                    arch["primitives"] = primitives
                data = arch
                break
    missing = [k for k in ARCH_KEYS[:2] if k not in data]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (expected alphas_normal, alphas_reduce and "
                         f"optionally betas_*, primitives, a 'model' state dict holding them, or a checkpoint "
                         f"of this project)")
    return data


def checkpoint_in(path: Path) -> Path:
    """``path`` itself, or for a directory the checkpoint in it: a single run's folder (``checkpoint.pt``), a Ray
    Train checkpoint (``search.pt``), a sweep trial's checkpoint (``state.pt``), or the newest ``checkpoint_*``
    folder holding one of them (a Train run's or a Tune trial's folder)."""
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if not path.is_dir():
        return path
    for name in CHECKPOINT_FILES:
        if (path / name).is_file():
            return path / name
    for sub in sorted((p for p in path.glob("checkpoint_*") if p.is_dir()), reverse=True):
        for name in CHECKPOINT_FILES:
            if (sub / name).is_file():
                return sub / name
    raise ValueError(f"{path}: a directory without a checkpoint ({', '.join(CHECKPOINT_FILES)}, directly or in a "
                     f"checkpoint_* folder)")


def search_state(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The search's own state (``pcdarts-search/1``: model, method state) inside the checkpoints this project
    writes: a single or Ray Train run's (``pcdarts-run/1``) and an HPO trial's (``pcdarts-hpo/1``) wrap it under
    ``searcher``; a stability sweep trial's is that state itself. Anything else is returned as it is."""
    while isinstance(data, dict) and "searcher" in data:
        if data["searcher"] is None:
            raise ValueError(f"{where}: this checkpoint holds no running search (an HPO trial saved between two "
                             f"seeds: the finished seeds' genotypes are in the experiment's results)")
        data = data["searcher"]
    return data


def _from_state_dict(state: dict[str, Any], where: str) -> dict[str, Any]:
    """Pick the search network's arch parameters out of a state dict, allowing a wrapper prefix (``module.``)."""
    out: dict[str, Any] = {}
    for key in ARCH_KEYS:
        hits = [k for k in state if isinstance(k, str) and (k == key or k.endswith("." + key))]
        if len(hits) > 1:
            raise ValueError(f"{where}: the model state dict holds several {key} entries: {', '.join(hits[:3])}")
        if hits:
            out[key] = state[hits[0]]
    return out


def cmd_derive(args: argparse.Namespace, console: Console) -> None:
    path = checkpoint_in(Path(args.file))
    data = read_arch_file(path)
    try:
        genotype = genotype_from_arch(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    print_genotype(genotype, console)
    console.print(str(genotype), markup=False, highlight=False, soft_wrap=True)
    if args.json:
        print(genotype.to_json())


# -- entry point -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m orchestrator.genotype", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    info = sub.add_parser("info", help="parameters and multiply-adds of the evaluation network")
    info.add_argument("genotype", metavar="NAME_OR_FILE")
    info.add_argument("--space", default="darts", choices=SPACE_NAMES,
                      help="search space of the cell (nb201: a NAS-Bench-201 string |op~0|+...)")
    info.add_argument("--dataset", required=True, choices=sorted({d for t in SPACE_DATASETS.values() for d in t}))
    info.add_argument("--channels", type=int, default=None,
                      help="initial channels C (36 CIFAR, 48 ImageNet; nb201: 16)")
    info.add_argument("--layers", type=int, default=None,
                      help="cells (20 CIFAR, 14 ImageNet; nb201: N=5 cells per stage)")
    info.add_argument("--json", action="store_true", help="last line of stdout: a JSON object")
    show = sub.add_parser("show", help="print both cells")
    show.add_argument("genotype", metavar="NAME_OR_FILE")
    show.add_argument("--space", default="darts", choices=SPACE_NAMES, help="search space of the cell")
    show.add_argument("--json", action="store_true", help="last line of stdout: the genotype JSON")
    show.add_argument("--svg", metavar="FILE", help="also draw the cells into an SVG file")
    derive = sub.add_parser("derive", help="derive a genotype from saved arch parameters (.json, a checkpoint "
                                           "of this project, or its folder)")
    derive.add_argument("file", metavar="FILE", help="a .json/.pt file or a checkpoint folder")
    derive.add_argument("--json", action="store_true", help="last line of stdout: the genotype JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(highlight=False)
    {"info": cmd_info, "show": cmd_show, "derive": cmd_derive}[args.command](args, console)
    return 0


if __name__ == "__main__":
    run_cli(main)
