"""``python -m orchestrator.genotype``: look at a genotype, size its evaluation network, derive one from alphas.

- ``info NAME_OR_FILE --dataset cifar10|cifar100|imagenet``: parameters (auxiliary head excluded) and
  multiply-adds of the evaluation network, as DARTS/PC-DARTS tables report them.
- ``show NAME_OR_FILE [--svg FILE]``: both cells, node by node (and drawn as an SVG file).
- ``derive FILE``: the PC-DARTS derivation rule applied to saved arch parameters (JSON or a ``.pt`` checkpoint,
  loaded with ``weights_only=True``: nothing is unpickled).

``--json`` makes the last line of stdout a JSON object. Bad input is one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import pickle  # only for its exception type: nothing is unpickled outside torch's weights_only loader
from pathlib import Path
from typing import Any, NoReturn, Sequence

import torch
from rich.console import Console
from rich.table import Table

from pcdarts_core.genotypes import CELL_TYPES, Genotype, derive_genotype, load_genotype
from pcdarts_core.model import NetworkCIFAR, NetworkImageNet
from pcdarts_core.ops import PRIMITIVES, check_op_name
from pcdarts_core.profile import count_madds, count_parameters

from .cli import fail, run_cli

#: dataset -> (classes, input resolution, default C, default layers): DARTS Sec. 3.3 (CIFAR) and 3.4 (mobile).
DATASETS: dict[str, tuple[int, int, int, int]] = {
    "cifar10": (10, 32, 36, 20),
    "cifar100": (100, 32, 36, 20),
    "imagenet": (1000, 224, 48, 14),
}
MAX_CHANNELS, MAX_LAYERS = 1024, 100
MAX_FILE_BYTES = 64 * 1024 * 1024
ARCH_KEYS = ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the project's single ``error: ...`` line (exit 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


# -- info --------------------------------------------------------------------------------------------------------
def build_eval_network(genotype: Genotype, dataset: str, channels: int, layers: int) -> torch.nn.Module:
    """The evaluation network of ``dataset`` (auxiliary head on, as trained; it is excluded from the counts)."""
    num_classes = DATASETS[dataset][0]
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"--channels must be in 1..{MAX_CHANNELS}, got {channels}")
    if not 3 <= layers <= MAX_LAYERS:
        raise ValueError(f"--layers must be in 3..{MAX_LAYERS} (two distinct reduction cells), got {layers}")
    cls = NetworkImageNet if dataset == "imagenet" else NetworkCIFAR
    return cls(channels, num_classes, layers, True, genotype)


def network_info(genotype: Genotype, dataset: str, channels: int | None = None,
                 layers: int | None = None) -> dict[str, Any]:
    _, size, default_c, default_layers = DATASETS[dataset]
    channels = default_c if channels is None else channels
    layers = default_layers if layers is None else layers
    with torch.no_grad():
        model = build_eval_network(genotype, dataset, channels, layers)
        params, madds = count_parameters(model), count_madds(model, size)
    return {"params": params, "madds": madds, "dataset": dataset, "channels": channels, "layers": layers,
            "input_size": size, "genotype": genotype.to_dict()}


def _human(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f}M)"


def cmd_info(args: argparse.Namespace, console: Console) -> None:
    genotype = load_genotype(args.genotype)
    info = network_info(genotype, args.dataset, args.channels, args.layers)
    table = Table(title=f"Evaluation network: {args.genotype}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("dataset", f"{info['dataset']} ({info['input_size']}x{info['input_size']})")
    table.add_row("channels C / cells", f"{info['channels']} / {info['layers']}")
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


def cmd_show(args: argparse.Namespace, console: Console) -> None:
    genotype = load_genotype(args.genotype)
    print_genotype(genotype, console)
    if args.svg:
        from .drawing import write_genotype_svg

        console.print(f"cell diagrams: {write_genotype_svg(genotype, args.svg, args.genotype)}", markup=False)
    if args.json:
        print(genotype.to_json())


# -- derive ------------------------------------------------------------------------------------------------------
def read_arch_file(path_text: str) -> dict[str, Any]:
    """The arch parameters saved in a JSON file or a torch checkpoint, as a dict with ``alphas_normal`` etc."""
    path = Path(path_text)
    if not path.exists():
        raise ValueError(f"{path_text}: no such file")
    if not path.is_file():
        raise ValueError(f"{path_text}: not a regular file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path_text}: file is too large for saved arch parameters")
    with path.open("rb") as fh:
        head = fh.read(64).lstrip()
    if path.suffix.lower() == ".json" or head.startswith((b"{", b"[")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path_text}: not valid JSON ({str(err).splitlines()[0]})") from None
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{path_text}: not a readable torch checkpoint (corrupted, or it holds objects other "
                             f"than tensors and plain containers, which weights_only loading refuses)") from None
        except Exception as err:  # torch raises many types (RuntimeError, EOFError, OSError...) here
            first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path_text}: not a readable torch checkpoint ({first[:160]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path_text}: expected an object with alphas_normal/alphas_reduce, got {type(data).__name__}")
    if "alphas_normal" not in data:
        for key in ("model", "state_dict"):
            if isinstance(data.get(key), dict):
                arch = _from_state_dict(data[key], path_text)
                if "primitives" in data:
                    arch["primitives"] = data["primitives"]
                data = arch
                break
    missing = [k for k in ARCH_KEYS[:2] if k not in data]
    if missing:
        raise ValueError(f"{path_text}: missing {', '.join(missing)} (expected alphas_normal, alphas_reduce and "
                         f"optionally betas_*, primitives, or a 'model' state dict holding them)")
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


def _tensor(value: Any, name: str, dims: int) -> torch.Tensor:
    try:
        t = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a {dims}-d array of numbers") from None
    if t.dim() != dims or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty {dims}-d array of numbers, got shape {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return t


def _op_names(value: Any, n_ops: int, n_edges: int, what: str) -> list[str] | list[list[str]]:
    """One op list for all edges, or one per edge (P-DARTS's pruned stages); every name must be a known op."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{what} must be a non-empty list of op names")
    if all(isinstance(v, str) for v in value):
        names = [str(v) for v in value]
        _check_row(names, n_ops, what)
        return names
    if not all(isinstance(v, (list, tuple)) and all(isinstance(n, str) for n in v) for v in value):
        raise ValueError(f"{what} must be a list of op names or one such list per edge")
    rows = [[str(n) for n in v] for v in value]
    if len(rows) != n_edges:
        raise ValueError(f"{what} gives op names for {len(rows)} edges, the alphas have {n_edges}")
    for row in rows:
        _check_row(row, n_ops, what)
    return rows


def _check_row(names: list[str], n_ops: int, what: str) -> None:
    if len(names) != n_ops:
        raise ValueError(f"{what} names {len(names)} ops but the alphas have {n_ops} columns")
    for name in names:
        check_op_name(name)


def genotype_from_arch(data: dict[str, Any]) -> Genotype:
    """Validate saved alphas/betas/primitives and apply ``derive_genotype`` (PC-DARTS Sec. 3.3)."""
    alphas = {c: _tensor(data[f"alphas_{c}"], f"alphas_{c}", 2) for c in CELL_TYPES}
    if alphas["normal"].shape != alphas["reduce"].shape:
        raise ValueError(f"alphas_normal {list(alphas['normal'].shape)} and alphas_reduce "
                         f"{list(alphas['reduce'].shape)} differ in shape")
    n_edges, n_ops = alphas["normal"].shape
    betas: dict[str, torch.Tensor | None] = {}
    for c in CELL_TYPES:
        raw = data.get(f"betas_{c}")
        betas[c] = None if raw is None else _tensor(raw, f"betas_{c}", 1)
        if betas[c] is not None and betas[c].shape[0] != n_edges:  # type: ignore[union-attr]
            raise ValueError(f"betas_{c} has {betas[c].shape[0]} entries, the alphas have {n_edges} edges")  # type: ignore[union-attr]
    if (betas["normal"] is None) != (betas["reduce"] is None):
        raise ValueError("give both betas_normal and betas_reduce, or neither")
    prims = data.get("primitives", list(PRIMITIVES))
    if isinstance(prims, dict):
        if set(prims) != set(CELL_TYPES):
            raise ValueError("primitives given per cell type must have exactly the keys 'normal' and 'reduce'")
        p_normal = _op_names(prims["normal"], n_ops, n_edges, "primitives['normal']")
        p_reduce = _op_names(prims["reduce"], n_ops, n_edges, "primitives['reduce']")
    else:
        p_normal = p_reduce = _op_names(prims, n_ops, n_edges, "primitives")
    return derive_genotype(alphas["normal"], alphas["reduce"], betas["normal"], betas["reduce"], p_normal, p_reduce)


def cmd_derive(args: argparse.Namespace, console: Console) -> None:
    try:
        genotype = genotype_from_arch(read_arch_file(args.file))
    except ValueError as err:
        msg = str(err)
        raise ValueError(msg if msg.startswith(args.file) else f"{args.file}: {msg}") from None
    print_genotype(genotype, console)
    console.print(str(genotype), markup=False, highlight=False, soft_wrap=True)
    if args.json:
        print(genotype.to_json())


# -- entry point -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m orchestrator.genotype", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    info = sub.add_parser("info", help="parameters and multiply-adds of the evaluation network")
    info.add_argument("genotype", metavar="NAME_OR_FILE")
    info.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    info.add_argument("--channels", type=int, default=None, help="initial channels C (36 CIFAR, 48 ImageNet)")
    info.add_argument("--layers", type=int, default=None, help="cells (20 CIFAR, 14 ImageNet)")
    info.add_argument("--json", action="store_true", help="last line of stdout: a JSON object")
    show = sub.add_parser("show", help="print both cells")
    show.add_argument("genotype", metavar="NAME_OR_FILE")
    show.add_argument("--json", action="store_true", help="last line of stdout: the genotype JSON")
    show.add_argument("--svg", metavar="FILE", help="also draw the cells into an SVG file")
    derive = sub.add_parser("derive", help="derive a genotype from saved arch parameters (.json or .pt)")
    derive.add_argument("file", metavar="FILE")
    derive.add_argument("--json", action="store_true", help="last line of stdout: the genotype JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(highlight=False)
    {"info": cmd_info, "show": cmd_show, "derive": cmd_derive}[args.command](args, console)
    return 0


if __name__ == "__main__":
    run_cli(main)
