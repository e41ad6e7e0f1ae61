"""The sweep driver's CPU time per reported epoch, by experiment size: append-only fragments (what
``orchestrator.experiment.ParquetResults`` does now) versus the read-merge-rewrite of one file per kind (before).

    .venv/bin/python bench/results_writes.py                         # 10, 200, 2000 trials; the 2000 x 50 total
    .venv/bin/python bench/results_writes.py --sizes 10 200 --no-total

For each size N the experiment already holds N trials with ``--stored`` epochs each (real epoch rows: alphas,
betas, genotype); the driver then records ``--reported`` more epochs through the real callback
(``on_trial_result``, a flush every ``--flush`` epochs as its 5-second timer would under load). Measured: CPU
seconds of this process (``time.process_time``) per reported epoch and bytes written per flush, both ways, side
by side; "rewrite" re-reads and rewrites the whole epochs file at every flush, so its cost grows with N. Then the
total of a 2,000 trials x 50 epochs sweep recorded append-only (trial start/end rows, every epoch, the final
compaction).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from orchestrator.experiment import ParquetResults  # noqa: E402
from orchestrator.results import ResultStore, dedupe_latest, epoch_row, to_table  # noqa: E402

SEARCH = {"method": "pcdarts", "dataset": "synthetic", "k": 4, "epochs": 50}
ALPHAS = [[0.125] * 8 for _ in range(14)]
GENOTYPE = ('{"normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ["skip_connect", 0], ["sep_conv_3x3", 1], '
            '["skip_connect", 0], ["dil_conv_3x3", 2], ["sep_conv_3x3", 0], ["skip_connect", 2]], '
            '"normal_concat": [2, 3, 4, 5], "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1], '
            '["skip_connect", 2], ["max_pool_3x3", 0], ["max_pool_3x3", 0], ["skip_connect", 2], '
            '["skip_connect", 2], ["avg_pool_3x3", 0]], "reduce_concat": [2, 3, 4, 5]}')


def result(epoch: int, seed: int) -> dict:
    return {"epoch": epoch, "train_acc": 0.5, "train_loss": 1.2, "val_acc": 0.4, "val_loss": 1.4, "lr": 0.05,
            "alphas_normal": ALPHAS, "alphas_reduce": ALPHAS, "betas_normal": [0.5] * 14, "betas_reduce": [0.5] * 14,
            "genotype": GENOTYPE, "arch_entropy": 2.07, "n_skip_normal": 2, "seed": seed, "epochs_total": 50,
            "search_done": False, "wall_time_s": 1.0 * epoch, "step_time_s": 0.1, "world_size": 1,
            "time_total_s": 1.0 * epoch}


def trial(i: int) -> SimpleNamespace:
    return SimpleNamespace(trial_id=f"t{i:05d}", config={"search": SEARCH, "seed": i}, last_result=result(1, i),
                           num_failures=0)


class Rewrite:
    """The old way: the whole ``epochs.parquet`` read, merged with the new rows and written again."""

    def __init__(self, path: str):
        self.path = path

    def upsert(self, rows: list[dict]) -> int:
        new = to_table("epochs", rows)
        if os.path.exists(self.path):
            old = pq.read_table(self.path)
            schema = pa.unify_schemas([old.schema, new.schema], promote_options="permissive")
            new = pa.concat_tables([old.cast(schema), new.select(schema.names).cast(schema)])
        table = dedupe_latest(new, ("trial_id", "epoch"))
        pq.write_table(table, self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)
        return os.path.getsize(self.path)


def measure(n: int, stored: int, reported: int, flush: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        trials = [trial(i) for i in range(n)]
        history = [epoch_row(t.trial_id, "g", i, result(e, i)) for i, t in enumerate(trials)
                   for e in range(1, stored + 1)]
        # append-only: the real driver callback
        store = ResultStore(tmp, "append")
        store.upsert("epochs", history)
        cb = ParquetResults(tmp, "append", "stability", ["k"])
        cb.FLUSH_EVERY_S = float("inf")
        written = 0
        start = time.process_time()
        for r in range(reported):
            t = trials[r % n]
            cb.on_trial_result(0, trials, t, result(stored + 1 + r // n, r % n))
            if (r + 1) % flush == 0:
                before = sum(os.path.getsize(p) for p in store.fragments("epochs"))
                cb.flush()
                written += sum(os.path.getsize(p) for p in store.fragments("epochs")) - before
        out["append_cpu_ms"] = 1000 * (time.process_time() - start) / reported
        out["append_bytes_per_flush"] = written / (reported // flush)
        # rewrite: the same rows through read-merge-write of one file
        old = Rewrite(os.path.join(tmp, "epochs.parquet"))
        old.upsert(history)
        written = 0
        buffer: list[dict] = []
        start = time.process_time()
        for r in range(reported):
            t = trials[r % n]
            buffer.append(epoch_row(t.trial_id, "g", r % n, result(stored + 1 + r // n, r % n)))
            if (r + 1) % flush == 0:
                written += old.upsert(buffer)
                buffer = []
        out["rewrite_cpu_ms"] = 1000 * (time.process_time() - start) / reported
        out["rewrite_bytes_per_flush"] = written / (reported // flush)
    return out


def total(n: int, epochs: int, flush: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trials = [trial(i) for i in range(n)]
        cb = ParquetResults(tmp, "total", "stability", ["k"])
        cb.FLUSH_EVERY_S = float("inf")
        start = time.process_time()
        for t in trials:
            cb.on_trial_start(0, trials, t)
        reported = 0
        for e in range(1, epochs + 1):
            for i, t in enumerate(trials):
                cb.on_trial_result(0, trials, t, result(e, i))
                reported += 1
                if reported % flush == 0:
                    cb.flush()
        for t in trials:
            t.last_result = {**result(epochs, 0), "search_done": True}
            cb.on_trial_complete(0, trials, t)
        recording = time.process_time() - start
        store = ResultStore(tmp, "total")
        fragments = len(store.fragments("epochs"))
        start = time.process_time()
        rows = store.compact("epochs") + store.compact("trials")
        compaction = time.process_time() - start
    return {"reported": reported, "recording_s": recording, "fragments": fragments, "compaction_s": compaction,
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 200, 2000])
    parser.add_argument("--stored", type=int, default=25, help="epochs already stored per trial")
    parser.add_argument("--reported", type=int, default=400, help="epochs recorded in the measurement")
    parser.add_argument("--flush", type=int, default=50, help="reported epochs per flush")
    parser.add_argument("--no-total", action="store_true", help="skip the 2000 x 50 total")
    args = parser.parse_args()
    print(f"{'trials':>7} {'stored rows':>11} | {'append ms/epoch':>15} {'KB/flush':>9} | "
          f"{'rewrite ms/epoch':>16} {'KB/flush':>9} | {'rewrite/append':>14}")
    for n in args.sizes:
        m = measure(n, args.stored, args.reported, args.flush)
        print(f"{n:>7} {n * args.stored:>11} | {m['append_cpu_ms']:>15.2f} {m['append_bytes_per_flush'] / 1e3:>9.0f} | "
              f"{m['rewrite_cpu_ms']:>16.2f} {m['rewrite_bytes_per_flush'] / 1e3:>9.0f} | "
              f"{m['rewrite_cpu_ms'] / m['append_cpu_ms']:>13.1f}x")
    if not args.no_total:
        t = total(2000, 50, args.flush)
        print(f"2000 trials x 50 epochs, append-only: {t['reported']} epochs recorded in {t['recording_s']:.1f} CPU s "
              f"({1000 * t['recording_s'] / t['reported']:.2f} ms/epoch, {t['fragments']} fragments); "
              f"final compaction {t['compaction_s']:.1f} CPU s ({t['rows']} rows)")


if __name__ == "__main__":
    main()
