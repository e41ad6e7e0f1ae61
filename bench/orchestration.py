"""Orchestration overhead: N tiny searches through Ray Tune versus the same N one after another in one process.

    .venv/bin/python bench/orchestration.py                  # 8 smoke-size searches, 2 epochs each
    .venv/bin/python bench/orchestration.py --n 16 --epochs 3

The figures, measured in this one run, side by side:

- ``sequential``: the N searches in this process, one after another (``pcdarts_core.search``, 1 torch thread);
- ``ray start``: ``ray.init(num_cpus=...)`` of a local cluster (paid once per sweep);
- ``tune, 1 at a time``: the same N searches as the sweep runs them (``search_trainable`` under
  ``tune.with_resources``, a checkpoint every epoch, the Parquet-writing callback) with one trial at a time: the
  per-trial overhead of Tune (a fresh actor process per trial, imports, checkpoint persistence, result handling);
- ``tune, concurrent``: the same with one trial per CPU, which is what a sweep gains back;
- ``tune, reuse_actors``: one at a time again, but trials reuse the previous trial's actor process (no new
  worker process and imports per trial); and with one trial per CPU, which is what ``sweep stability`` runs.

The searches are the ``smoke`` preset's (seconds each), so the overhead is as visible as it will ever be; with real
searches (minutes to hours each) the same absolute overhead vanishes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own output off (see orchestrator.experiment.fit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="number of searches (seeds)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per search")
    parser.add_argument("--cpus", type=int, default=None, help="Ray CPUs (default: this machine's)")
    args = parser.parse_args()

    import logging

    import torch

    from orchestrator.presets import load_preset
    from orchestrator.cluster import machine_cpus
    from orchestrator.experiment import ParquetResults, trial_dirname
    from orchestrator.trainable import search_trainable
    from pcdarts_core.config import search_config_from_dict
    from pcdarts_core.search import search

    cpus = args.cpus or machine_cpus()
    preset = load_preset("smoke", [f"epochs={args.epochs}"])
    base = dict(preset.groups()[0])
    seeds = list(range(args.n))
    print(f"{args.n} searches of {args.epochs} epochs (smoke preset, k={base['k']}), {cpus} CPUs")

    torch.set_num_threads(1)
    start = time.perf_counter()
    for seed in seeds:
        for _ in search(search_config_from_dict({**base, "seed": seed})):
            pass
    sequential = time.perf_counter() - start
    print(f"sequential in one process: {sequential:.1f} s", flush=True)

    import ray
    from ray import tune

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    startup = time.perf_counter() - start
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)

    def run(concurrency: int, storage: str, reuse: bool = False) -> float:
        trainable = tune.with_resources(search_trainable, {"cpu": 1, "gpu": 0})
        tuner = tune.Tuner(
            trainable,
            param_space={"search": base, "seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, trial_dirname_creator=trial_dirname,
                                        reuse_actors=reuse),
            run_config=tune.RunConfig(name="bench", storage_path=storage, verbose=0,
                                      callbacks=[ParquetResults(storage, "parquet", "stability", ["k"])]))
        t0 = time.perf_counter()
        grid = tuner.fit()
        elapsed = time.perf_counter() - t0
        assert all(r.error is None for r in grid), [r.error for r in grid]
        return elapsed

    with tempfile.TemporaryDirectory() as tmp:
        serial = run(1, os.path.join(tmp, "serial"))
        print(f"tune, 1 trial at a time: {serial:.1f} s", flush=True)
        parallel = run(cpus, os.path.join(tmp, "parallel"))
        print(f"tune, {cpus} concurrent: {parallel:.1f} s", flush=True)
        reused = run(1, os.path.join(tmp, "reused"), reuse=True)
        print(f"tune, 1 trial at a time, reuse_actors: {reused:.1f} s", flush=True)
        sweep_like = run(cpus, os.path.join(tmp, "sweep"), reuse=True)
        print(f"tune, {cpus} concurrent, reuse_actors (the sweep's setting): {sweep_like:.1f} s", flush=True)
    ray.shutdown()

    print()
    print(f"| way | wall time (s) | vs sequential |")
    print(f"|---|---:|---:|")
    print(f"| sequential, one process | {sequential:.1f} | 1.00x |")
    print(f"| ray.init (local, {cpus} CPUs), once per sweep | {startup:.1f} | |")
    print(f"| Tune, 1 trial at a time | {serial:.1f} | {serial / sequential:.2f}x |")
    print(f"| Tune, {cpus} trials at a time | {parallel:.1f} | {parallel / sequential:.2f}x |")
    print(f"| Tune, 1 trial at a time, `reuse_actors=True` | {reused:.1f} | {reused / sequential:.2f}x |")
    print(f"| Tune, {cpus} at a time, `reuse_actors=True` (what `sweep` does) | {sweep_like:.1f} | "
          f"{sweep_like / sequential:.2f}x |")
    print(f"\nTune's overhead per trial, one at a time: {(serial - sequential) / args.n:.1f} s, with reuse_actors "
          f"{(reused - sequential) / args.n:.1f} s (a search here takes {sequential / args.n:.1f} s on its own)")


if __name__ == "__main__":
    main()
