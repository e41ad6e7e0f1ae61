"""``python -m orchestrator.search``: one PC-DARTS-family search, in this process or data-parallel on Ray Train.

Both commands take a preset's ``search:`` section, write a sweep trial's layout under ``<storage>/<name>/`` and
resume a run of the same name. Bad input exits with 2, a failed search with 3 (one ``error:`` line), Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

from .cli import DEFAULT_STORAGE_ENV, EXIT_FAILED, Parser, check_name, fail, resolve_storage, run_cli
from .presets import DistributedOptions, Preset, apply_sets, load_preset, preset_from_dict

#: the ``distributed`` flags, which override the preset's ``distributed:`` section
DISTRIBUTED_FLAGS = ("num_workers", "use_gpu", "cpus_per_worker", "max_failures")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m orchestrator.search", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    single = sub.add_parser("single", help="one search in this process")
    distributed = sub.add_parser("distributed", help="one data-parallel search on Ray Train workers")
    for p in (single, distributed):
        p.add_argument("--preset", help="a preset in tune_configs/ (e.g. smoke, imagenet) or a YAML file; "
                                        "without one: the papers' defaults for --method/--dataset")
        p.add_argument("--method", help="search method (pcdarts, darts, pdarts, sharpdarts, rome, entrannas)")
        p.add_argument("--dataset", help="cifar10, cifar100, imagenet or synthetic (offline)")
        p.add_argument("--data-dir", help="dataset root (CIFAR: the folder holding cifar-10-batches-py; "
                                          "ImageNet: the folder holding train/ and val/)")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a preset value (search.k=2, or just k=2; distributed.num_workers=4)")
        p.add_argument("--seed", type=int, help="search seed (default: the preset's first seed, else 0)")
        p.add_argument("--storage", help=f"results root: a directory or s3://bucket/prefix (default "
                                         f"${DEFAULT_STORAGE_ENV} or ./results)")
        p.add_argument("--name", help="run name (default: PRESET-METHOD-DATASET-sSEED, plus -dp for distributed); "
                                      "the same name resumes")
        p.add_argument("--resume", action="store_true",
                       help="insist on resuming: fail if no run of this name exists (resuming is automatic anyway)")
    single.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, all cores)")
    distributed.add_argument("--num-workers", help="N, or MIN-MAX for an elastic worker group "
                                                   "(default: the preset's distributed.num_workers)")
    distributed.add_argument("--gpu", dest="use_gpu", action="store_true", default=None,
                             help="one GPU per worker (NCCL)")
    distributed.add_argument("--cpus-per-worker", type=float, help="Ray CPUs (and torch threads) per worker")
    distributed.add_argument("--max-failures", type=int,
                             help="restarts of the worker group from the last checkpoint (default 3)")
    return parser


def resolve(args: argparse.Namespace) -> tuple[Preset, dict[str, Any], str, str]:
    """(preset, the run's flat search values incl. seed, storage, name) from the command line."""
    if args.preset:
        preset = load_preset(args.preset, args.sets)
    else:  # the papers' defaults, with --set on top
        preset = preset_from_dict(apply_sets({"name": "search", "search": {}}, args.sets), default_name="search",
                                  where="--set")
    flags = {"method": args.method, "dataset": args.dataset,
             "data_dir": args.data_dir and os.path.abspath(os.path.expanduser(args.data_dir))}
    values = {**preset.search, **{k: v[0] for k, v in preset.grid.items() if len(v) == 1},  # picked with --set k=2
              **{k: v for k, v in flags.items() if v}}
    values.setdefault("method", "pcdarts")
    values.setdefault("dataset", "cifar10")
    values["seed"] = args.seed if args.seed is not None else preset.seeds[0]
    preset.search_config({k: v for k, v in values.items() if k != "seed"}, seed=values["seed"])  # validate
    suffix = "-dp" if args.command == "distributed" else ""  # default names never collide across commands
    name = check_name(args.name or f"{preset.name}-{values['method']}-{values['dataset']}-s{values['seed']}{suffix}")
    return preset, values, resolve_storage(args.storage), name


def main(argv: Sequence[str] | None = None) -> int:
    from .distributed import run_distributed
    from .run import RunFailed, run_single

    args = build_parser().parse_args(argv)
    preset, values, storage, name = resolve(args)
    opts = DistributedOptions.from_mapping(preset.distributed, **{k: getattr(args, k, None) for k in DISTRIBUTED_FLAGS})
    try:
        if args.command == "single":
            if args.threads is not None:
                if args.threads < 1:
                    raise ValueError(f"--threads must be >= 1, got {args.threads}")
                import torch

                torch.set_num_threads(args.threads)
            result = run_single(values, storage, name, resume=args.resume, lr_reference_batch=opts.lr_reference_batch)
        else:
            if args.num_workers is None and "num_workers" not in preset.distributed:
                raise ValueError("distributed needs --num-workers N (or distributed.num_workers in the preset)")
            result = run_distributed(values, opts, storage, name, resume=args.resume)
    except RunFailed as err:
        fail(str(err), EXIT_FAILED)
    print(f"{'resumed' if result.resumed else 'finished'} {result.name}: {result.epochs_done} epochs; "
          f"results in {result.root}")
    print(f"genotype: {result.genotype.to_json()}")
    return 0


if __name__ == "__main__":
    run_cli(main)
