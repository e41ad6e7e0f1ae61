"""Time the results + statistics layers on a synthetic sweep: Parquet upserts, reads and ``stability_table``.

    .venv/bin/python bench/aggregate.py                       # 100 groups x 100 seeds = 10,000 trials
    .venv/bin/python bench/aggregate.py --groups 10 --seeds 10 --epochs 5

Each group has a prototype cell; each seed perturbs each of its 32 (op, input) choices with a group-specific
probability, so groups range from stable to scattered, as real sweeps do. Every trial gets ``--epochs`` epoch
rows whose genotype settles at a random epoch, and one evaluation; every group one consensus evaluation.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.results import ResultStore, group_key, source_consensus, source_trial, to_table  # noqa: E402
from orchestrator.stability import render_table, stability_table  # noqa: E402
from pcdarts_core.stability import StabilityOptions  # noqa: E402
from pcdarts_core.genotypes import Genotype  # noqa: E402

OPS = ("max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
       "dil_conv_5x5")
CONCAT = (2, 3, 4, 5)


def random_cell(rng: random.Random) -> list[tuple[str, int]]:
    edges = []
    for node in range(4):
        edges += [(rng.choice(OPS), i) for i in rng.sample(range(node + 2), 2)]
    return edges


def perturb(cell: list[tuple[str, int]], p: float, rng: random.Random) -> tuple[tuple[str, int], ...]:
    """Re-draw each node's choices with probability ``p`` (keeping the two inputs distinct)."""
    out = []
    for node in range(4):
        pair = cell[2 * node: 2 * node + 2]
        if rng.random() < p:
            pair = [(rng.choice(OPS), i) for i in rng.sample(range(node + 2), 2)]
        elif rng.random() < p:
            pair = [(rng.choice(OPS), pair[0][1]), pair[1]]
        out += pair
    return tuple(out)


def synthetic(groups: int, seeds: int, epochs: int, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    rng = random.Random(seed)
    trials, epoch_rows, evaluations = [], [], []
    for g in range(groups):
        config = {"method": "pcdarts", "k": 4, "edge_norm": g % 2 == 0, "arch_lr": 6e-4, "variant": g}
        group = group_key(config)
        proto_n, proto_r, p = random_cell(rng), random_cell(rng), rng.uniform(0.0, 0.6)
        for s in range(seeds):
            tid = f"g{g:03d}_s{s:03d}"
            failed = rng.random() < 0.02
            geno = Genotype(perturb(proto_n, p, rng), CONCAT, perturb(proto_r, p, rng), CONCAT)
            trials.append({
                "trial_id": tid, "group": group, "seed": s, "status": "failed" if failed else "done",
                "method": "pcdarts", "val_acc": None if failed else rng.gauss(88.0, 1.0),
                "train_acc": None if failed else rng.gauss(92.0, 1.0), "val_loss": rng.uniform(0.3, 0.5),
                "genotype": None if failed else geno.to_json(), "error": "CUDA error" if failed else None,
                "wall_time_s": rng.uniform(3000, 4000), "epochs_done": epochs, "cfg_k": 4, "cfg_variant": g,
            })
            if failed:
                continue
            settle = rng.randrange(epochs) if epochs else 0
            early = Genotype(perturb(proto_n, 0.5, rng), CONCAT, perturb(proto_r, 0.5, rng), CONCAT).to_json()
            final = geno.to_json()
            for e in range(epochs):
                epoch_rows.append({"trial_id": tid, "group": group, "seed": s, "epoch": e,
                                   "val_acc": rng.gauss(80.0, 5.0), "genotype": final if e >= settle else early,
                                   "n_skip_normal": 1})
            evaluations.append({"eval_id": f"eval_{tid}", "source": source_trial(tid), "seed": 0,
                                "status": "done", "test_acc": rng.gauss(97.0, 0.2), "params": 3_600_000})
        evaluations.append({"eval_id": f"eval_consensus_{g}", "source": source_consensus(group), "seed": 0,
                            "status": "done", "test_acc": rng.gauss(97.2, 0.1), "params": 3_500_000})
    return trials, epoch_rows, evaluations


CPU: dict[str, float] = {}


def timed(label: str, fn, timings: dict[str, float]):
    """Wall time into ``timings``, this process's CPU time into ``CPU`` (steadier on a shared machine)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    timings[label] = time.perf_counter() - start
    CPU[label] = time.process_time() - cpu
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10, help="epoch rows per trial (0: no epochs table)")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="stability_table runs; the median is reported")
    parser.add_argument("--storage", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--show", type=int, default=5, help="print the first N rows of the stability table")
    args = parser.parse_args(argv)

    timings: dict[str, float] = {}
    to_table("trials", [{"trial_id": "warm-up", "status": "done"}])  # pyarrow's lazy imports, not our cost
    trials, epochs, evaluations = timed("generate", lambda: synthetic(args.groups, args.seeds, args.epochs),
                                        timings)
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultStore(args.storage or tmp, "bench_aggregate")
        timed("upsert trials", lambda: store.upsert("trials", trials), timings)
        timed("upsert trials again (restart)", lambda: store.upsert("trials", trials[: len(trials) // 2]),
              timings)
        if epochs:
            timed("upsert epochs", lambda: store.upsert("epochs", epochs), timings)
        timed("upsert evaluations", lambda: store.upsert("evaluations", evaluations), timings)
        t_tab = timed("read trials", lambda: store.read("trials"), timings)
        e_tab = timed("read epochs", lambda: store.read("epochs"), timings) if epochs else None
        v_tab = timed("read evaluations", lambda: store.read("evaluations"), timings)
        options = StabilityOptions(n_boot=args.n_boot)
        runs, cpu_runs = [], []
        for _ in range(max(1, args.repeat)):
            table = timed("stability_table", lambda: stability_table(t_tab, e_tab, v_tab, options=options), timings)
            runs.append(timings["stability_table"])
            cpu_runs.append(CPU["stability_table"])
        timings["stability_table"] = sorted(runs)[len(runs) // 2]
        CPU["stability_table"] = sorted(cpu_runs)[len(cpu_runs) // 2]
        timed("stability_table, no epochs", lambda: stability_table(t_tab, None, v_tab, options=options), timings)
        timed("write stability", lambda: store.write_table("stability", table), timings)
        assert t_tab.num_rows == len(trials), "upsert lost or duplicated trials"

    print(f"trials={len(trials)} epochs={len(epochs)} evaluations={len(evaluations)} groups={table.num_rows} "
          f"n_boot={args.n_boot} stability_table runs={[round(r * 1000) for r in runs]} ms")
    print(f"{'step':32s} {'wall ms':>10s} {'cpu ms':>10s}")
    for label, seconds in timings.items():
        print(f"{label:32s} {seconds * 1000:10.1f} {CPU[label] * 1000:10.1f}")
    io = [k for k in timings if k.startswith(("upsert", "read", "write"))]
    print(f"{'total parquet I/O':32s} {sum(timings[k] for k in io) * 1000:10.1f} "
          f"{sum(CPU[k] for k in io) * 1000:10.1f}")
    if args.show:
        from rich.console import Console

        render_table(table.slice(0, args.show), Console(width=120), title=f"first {args.show} groups")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
