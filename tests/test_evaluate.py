"""What evaluation trials are made of, without Ray: the random-cell baseline, sources, and skipping done work.

(The evaluation trials themselves run on Ray in tests/test_sweep.py.)
"""

from __future__ import annotations

from collections import Counter

import pytest

from orchestrator.evaluate import EvaluateRequest, evaluation_specs, pending, protocol_id
from orchestrator.results import ResultStore, trial_row
from pcdarts_core.genotypes import CELL_TYPES, PUBLISHED, RANDOM_OPS, genotype_distance, random_genotype


def test_random_genotypes_are_uniform_over_the_darts_space():
    genos = [random_genotype(i) for i in range(600)]
    assert random_genotype(7) == random_genotype(7)  # seeded by the index
    assert len({g.to_json() for g in genos}) == 600
    ops: Counter = Counter()
    inputs: Counter = Counter()
    for g in genos:
        for cell in CELL_TYPES:
            for node, pairs in enumerate(g.nodes(cell)):
                assert len(pairs) == 2 and pairs[0][1] != pairs[1][1]  # two distinct inputs
                assert all(0 <= inp < node + 2 for _, inp in pairs)
                ops.update(op for op, _ in pairs)
                if node == 3:
                    inputs.update(inp for _, inp in pairs)
    assert set(ops) == set(RANDOM_OPS) and "none" not in ops
    expected = sum(ops.values()) / 7
    assert all(abs(n - expected) < 0.1 * expected for n in ops.values())  # uniform over the 7 ops
    expected = sum(inputs.values()) / 5  # node 3 picks 2 of its 5 inputs
    assert all(abs(n - expected) < 0.15 * expected for n in inputs.values())
    # Random cells are far apart: the baseline is not one cell evaluated many times.
    assert sum(genotype_distance(genos[i], genos[i + 1]) for i in range(50)) / 50 > 0.7


def _store(tmp_path) -> ResultStore:
    store = ResultStore(str(tmp_path), "exp")
    a, b = PUBLISHED["PC_DARTS_CIFAR"], PUBLISHED["DARTS_V2"]
    rows = []
    for i, (group, geno, acc, status) in enumerate([("g1", a, 0.5, "done"), ("g1", b, 0.7, "done"),
                                                    ("g1", b, 0.9, "failed"), ("g2", a, 0.4, "done")]):
        rows.append(trial_row(f"t{i}", {"method": "pcdarts", "seed": i}, status, group=group, val_acc=acc,
                              genotype=geno.to_json()))
    store.write_table("trials", rows)
    return store


def test_sources_top_k_per_group_consensus_named_and_random(tmp_path):
    store = _store(tmp_path)
    specs = evaluation_specs(store, EvaluateRequest(top_k=1, consensus=True, genotypes=("PDARTS",), random=2,
                                                    seeds=(0, 1)), "p1")
    sources = [s["source"] for s in specs[::2]]
    assert sources == ["trial:t1", "consensus:g1", "trial:t3", "consensus:g2", "published:PDARTS", "random:0",
                       "random:1"]  # the failed t2 (best val_acc) is never evaluated
    assert [s["seed"] for s in specs[:2]] == [0, 1] and len(specs) == 14
    assert specs[0]["eval_id"] == "trial:t1|seed=0" and specs[0]["group"] == "g1" and specs[0]["protocol"] == "p1"
    assert specs[0]["genotype"] == PUBLISHED["DARTS_V2"].to_json()
    every = evaluation_specs(store, EvaluateRequest(top_k=0, seeds=(0,)), "p1")
    assert [s["source"] for s in every] == ["trial:t1", "trial:t0", "trial:t3"]  # 0: every search, best first


def test_done_evaluations_are_skipped_under_the_same_protocol_only(tmp_path):
    store = _store(tmp_path)
    specs = evaluation_specs(store, EvaluateRequest(random=2, seeds=(0,)), "p1")
    store.write_table("evaluations", [{"eval_id": "random:0|seed=0", "source": "random:0", "seed": 0,
                                       "status": "done", "test_acc": 0.3, "protocol": "p1"},
                                      {"eval_id": "random:1|seed=0", "source": "random:1", "seed": 0,
                                       "status": "failed", "protocol": "p1"}])
    assert [s["eval_id"] for s in pending(store, specs)] == ["random:1|seed=0"]
    other = evaluation_specs(store, EvaluateRequest(random=2, seeds=(0,)), "p2")
    assert len(pending(store, other)) == 2


def test_protocol_id_ignores_where_it_runs():
    base = {"dataset": "cifar10", "epochs": 600, "layers": 20, "device": "cuda", "num_workers": 4,
            "data_dir": "/a", "seed": 0}
    assert protocol_id(base) == protocol_id({**base, "device": "cpu", "num_workers": 0, "data_dir": "/b",
                                             "seed": 3})
    assert protocol_id(base) != protocol_id({**base, "epochs": 300})


def test_nothing_to_evaluate_is_an_error(tmp_path):
    store = ResultStore(str(tmp_path), "empty")
    with pytest.raises(ValueError, match="no finished searches"):
        evaluation_specs(store, EvaluateRequest(top_k=1), "p")
