"""``python -m orchestrator.search``: one PC-DARTS-family search, in this process or data-parallel on Ray Train.

- ``single [--preset NAME] [--method M] [--dataset D] [--data-dir P] [--set key=value ...] [--seed S]
  [--storage S] [--name N] [--resume] [--threads T]``: the search in this process (no Ray), a checkpoint after
  every epoch.
- ``distributed --num-workers N|MIN-MAX [--gpu] [--cpus-per-worker C] [--max-failures F] [...same options]``: the
  same search on N Ray Train workers (``TorchTrainer``; gloo on CPUs, NCCL on GPUs), one checkpoint per epoch
  through ``ray.train.report``; a killed worker group restarts from it up to F times.

A preset's ``search:`` section is the config (its ``grid`` and ``seeds`` are for sweeps: pick a grid value with
``--set k=2``, a seed with ``--seed``); its ``distributed:`` section gives the defaults of the distributed flags.
``batch_size`` is the global batch: each of N workers gets ``batch_size // N``.

Results go to ``<storage>/<name>/``: ``epochs.parquet`` (one row per epoch), ``trials.parquet`` (the run's row),
``genotype.json`` (the final genotype, the core's JSON), ``search_config.json``, and the checkpoints. Running the
same command again resumes the run (a finished run just reports its result); settings that would change the
search are refused. Bad input is one ``error: ...`` line and exit status 2; a search that fails exits with 3
(one ``error:`` line; the trial row keeps the error); Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from .cli import DEFAULT_STORAGE_ENV, EXIT_FAILED, Parser, check_name, resolve_storage, run_cli
from .presets import Preset, apply_sets, load_preset, preset_from_dict


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a preset in tune_configs/ (e.g. smoke, imagenet) or a YAML file; "
                                    "without one: the papers' defaults for --method/--dataset")
    p.add_argument("--method", help="search method (pcdarts, darts, pdarts, sharpdarts, rome, entrannas)")
    p.add_argument("--dataset", help="cifar10, cifar100, imagenet or synthetic (offline)")
    p.add_argument("--data-dir", help="dataset root (CIFAR: the folder holding cifar-10-batches-py; "
                                      "ImageNet: the folder holding train/ and val/)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value (search.k=2, or just k=2; distributed.num_workers=4)")
    p.add_argument("--seed", type=int, help="search seed (default: the preset's first seed, else 0)")
    p.add_argument("--storage", default=None,
                   help=f"results root: a directory or s3://bucket/prefix (default ${DEFAULT_STORAGE_ENV} or "
                        f"./results)")
    p.add_argument("--name", help="run name (default: PRESET-METHOD-DATASET-sSEED, plus -dp for distributed); "
                                  "the same name resumes")
    p.add_argument("--resume", action="store_true",
                   help="insist on resuming: fail if no run of this name exists (resuming is automatic anyway)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m orchestrator.search", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    single = sub.add_parser("single", help="one search in this process")
    _common(single)
    single.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, all cores)")
    distributed = sub.add_parser("distributed", help="one data-parallel search on Ray Train workers")
    _common(distributed)
    distributed.add_argument("--num-workers", help="N, or MIN-MAX for an elastic worker group "
                                                   "(default: the preset's distributed.num_workers)")
    distributed.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker (NCCL)")
    distributed.add_argument("--cpus-per-worker", type=float, help="Ray CPUs (and torch threads) per worker")
    distributed.add_argument("--max-failures", type=int,
                             help="restarts of the worker group from the last checkpoint (default 3)")
    return parser


def _raw_preset(args: argparse.Namespace) -> Preset:
    """The preset with ``--set`` applied, or an empty one (the papers' defaults) when none is named."""
    if args.preset:
        return load_preset(args.preset, args.sets)
    raw = apply_sets({"name": "search", "search": {}}, args.sets)
    return preset_from_dict(raw, default_name="search", where="--set")


def resolve(args: argparse.Namespace) -> tuple[Preset, dict[str, Any], str, str]:
    """(preset, the run's flat search values incl. seed, storage, name) from the command line."""
    preset = _raw_preset(args)
    values = dict(preset.search)
    values.update({k: v[0] for k, v in preset.grid.items() if len(v) == 1})  # a grid value picked with --set k=2
    if args.method:
        values["method"] = args.method
    if args.dataset:
        values["dataset"] = args.dataset
    if args.data_dir:
        values["data_dir"] = os.path.abspath(os.path.expanduser(args.data_dir))
    values.setdefault("method", "pcdarts")
    values.setdefault("dataset", "cifar10")
    values["seed"] = args.seed if args.seed is not None else preset.seeds[0]
    preset.search_config({k: v for k, v in values.items() if k != "seed"}, seed=values["seed"])  # validate
    storage = resolve_storage(args.storage)
    suffix = "-dp" if args.command == "distributed" else ""  # default names never collide across commands
    name = check_name(args.name or f"{preset.name}-{values['method']}-{values['dataset']}-s{values['seed']}{suffix}")
    return preset, values, storage, name


def main(argv: Sequence[str] | None = None) -> int:
    from .distributed import DistributedOptions, run_distributed
    from .run import RunFailed, run_single

    args = build_parser().parse_args(argv)
    preset, values, storage, name = resolve(args)
    try:
        if args.command == "single":
            opts = DistributedOptions.from_mapping(preset.distributed)
            if args.threads is not None:
                if args.threads < 1:
                    raise ValueError(f"--threads must be >= 1, got {args.threads}")
                import torch

                torch.set_num_threads(args.threads)
            result = run_single(values, storage, name, resume=args.resume,
                                lr_reference_batch=opts.lr_reference_batch)
        else:
            opts = DistributedOptions.from_mapping(
                preset.distributed, num_workers=args.num_workers, use_gpu=args.gpu,
                cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures)
            if args.num_workers is None and "num_workers" not in preset.distributed:
                raise ValueError("distributed needs --num-workers N (or distributed.num_workers in the preset)")
            result = run_distributed(values, opts, storage, name, resume=args.resume)
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    print(f"{'resumed' if result.resumed else 'finished'} {result.name}: {result.epochs_done} epochs; "
          f"results in {result.root}")
    print(f"genotype: {result.genotype.to_json()}")
    return 0


if __name__ == "__main__":
    run_cli(main)
