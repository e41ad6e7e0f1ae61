"""Stability statistics on hand-made genotype sets whose answers are known."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest

from orchestrator.results import ResultStore, SCHEMAS
from orchestrator.stability import _stop_epochs, render_table, stability_table
from pcdarts_core.stability import (StabilityOptions, best_minus_mean, bootstrap_ci, consensus, genotype_stats,
                                    is_collapsed, n_distinct, pairwise_distance_mean, pairwise_distances,
                                    selection_frequencies, skip_counts, stopped_changing_epoch, summarize)
from pcdarts_core.genotypes import PUBLISHED, Genotype, genotype_distance, parse_genotype

BASE = PUBLISHED["PC_DARTS_CIFAR"]
OPS = ["max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
       "dil_conv_5x5"]


def with_normal_node(g: Genotype, node: int, pairs: list[tuple[str, int]]) -> Genotype:
    edges = list(g.normal)
    edges[2 * node: 2 * node + 2] = pairs
    return Genotype(tuple(edges), g.normal_concat, g.reduce, g.reduce_concat)


# Three searches that differ only at normal node 2 (state 4): its input 0 is always sep_conv_5x5; the second
# input is 1 via sep_conv_3x3, 1 via dil_conv_3x3, or 3 via skip_connect.
G1 = with_normal_node(BASE, 2, [("sep_conv_5x5", 0), ("sep_conv_3x3", 1)])
G2 = with_normal_node(BASE, 2, [("sep_conv_5x5", 0), ("dil_conv_3x3", 1)])
G3 = with_normal_node(BASE, 2, [("sep_conv_5x5", 0), ("skip_connect", 3)])


def random_genotype(rng: random.Random, repeat: bool = False) -> Genotype:
    cells = []
    for _ in range(2):
        edges = []
        for node in range(4):
            inputs = rng.sample(range(node + 2), 2)
            if repeat and rng.random() < 0.3:
                inputs = [inputs[0], inputs[0]]
            edges += [(rng.choice(OPS), i) for i in inputs]
        cells.append(tuple(edges))
    return Genotype(cells[0], (2, 3, 4, 5), cells[1], (2, 3, 4, 5))


def test_base_is_unchanged_by_the_helper():
    assert G1 == BASE  # the published cell already has these pairs at node 2
    assert G2 != BASE and G3 != BASE


def test_identical_seeds_distance_zero_one_distinct_consensus_is_it():
    swapped = with_normal_node(BASE, 0, [BASE.normal[1], BASE.normal[0]])  # order inside a node does not matter
    genos = [BASE, BASE, swapped, BASE.to_json()]
    assert pairwise_distance_mean(genos) == 0.0
    assert n_distinct(genos) == 1
    cons, dists = consensus(genos)
    assert genotype_distance(cons, BASE) == 0.0
    assert cons == BASE
    assert dists.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_known_frequencies_distances_and_consensus():
    genos = [G1, G2, G3]
    freqs = selection_frequencies(genos)
    assert freqs.n == 3
    normal = freqs.edge["normal"]
    assert normal["0->4"] == 1.0
    assert normal["1->4"] == pytest.approx(2 / 3)
    assert normal["3->4"] == pytest.approx(1 / 3)
    assert "2->4" not in normal
    assert freqs.edge_op["normal"]["1->4"] == pytest.approx({"sep_conv_3x3": 1 / 3, "dil_conv_3x3": 1 / 3})
    assert freqs.edge_op["normal"]["3->4"] == pytest.approx({"skip_connect": 1 / 3})
    assert freqs.edge_op["normal"]["0->4"] == {"sep_conv_5x5": 1.0}
    # The reduce cell is the same in all three: every selected edge has frequency 1.
    assert set(freqs.edge["reduce"].values()) == {1.0}
    # Ops over the 24 normal edges: sep3 3+2+2, dil3 2+3+2, skip 1+1+2, sep5 1+1+1, avg 1+1+1.
    assert freqs.op["normal"] == pytest.approx({"sep_conv_3x3": 7 / 24, "dil_conv_3x3": 7 / 24,
                                                "skip_connect": 4 / 24, "sep_conv_5x5": 3 / 24,
                                                "avg_pool_3x3": 3 / 24})
    assert sum(freqs.op["reduce"].values()) == pytest.approx(1.0)
    assert json.loads(freqs.to_json("edge"))["normal"]["3->4"] == pytest.approx(1 / 3)

    d = pairwise_distances(genos)
    assert d.tolist() == [[0.0, 1 / 16, 1 / 16], [1 / 16, 0.0, 1 / 16], [1 / 16, 1 / 16, 0.0]]
    assert pairwise_distance_mean(genos) == pytest.approx(1 / 16)
    assert n_distinct(genos) == 3
    cons, dists = consensus(genos)
    assert cons == G1  # (sep_conv_5x5, 0) thrice, then the first-seen of three single votes
    assert dists.tolist() == [0.0, 1 / 16, 1 / 16]
    assert skip_counts(genos).tolist() == [1, 1, 2]
    stats = genotype_stats(genos, collapse_threshold=2)
    assert stats.collapse_rate == pytest.approx(1 / 3)
    assert stats.consensus_distance_mean == pytest.approx(1 / 24)
    assert stats.skip_normal_mean == pytest.approx(4 / 3)


def test_vectorized_distances_match_the_core_definition():
    rng = random.Random(1)
    genos = [random_genotype(rng, repeat=True) for _ in range(25)] + list(PUBLISHED.values())
    uneven = Genotype(BASE.normal[:5] + BASE.normal[6:], BASE.normal_concat, BASE.reduce, BASE.reduce_concat,
                      normal_counts=(2, 2, 1, 2))
    genos.append(uneven)
    expected = np.array([[genotype_distance(a, b) for b in genos] for a in genos])
    np.testing.assert_allclose(pairwise_distances(genos), expected, atol=1e-12)
    keys = {tuple(tuple(sorted(p)) for c in ("normal", "reduce") for p in g.nodes(c)) for g in genos}
    assert n_distinct(genos + genos[:3]) == len(keys)


def test_bootstrap_ci_contains_the_mean_and_is_deterministic():
    values = [96.1, 96.9, 97.3, 96.5, 97.0, 96.7]
    low, high = bootstrap_ci(values, n_boot=2000, seed=0)
    assert low < np.mean(values) < high
    assert min(values) <= low and high <= max(values)
    assert bootstrap_ci(values, n_boot=2000, seed=0) == (low, high)
    assert bootstrap_ci(values, n_boot=2000, seed=1) != (low, high)
    wide = bootstrap_ci(values, n_boot=2000, alpha=0.01, seed=0)
    assert wide[0] <= low and wide[1] >= high
    assert bootstrap_ci([97.2]) == (97.2, 97.2)
    assert bootstrap_ci([97.2, 97.2, 97.2]) == (97.2, 97.2)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_summary_and_best_minus_mean():
    s = summarize([90.0, 92.0, 94.0, float("nan")])
    assert (s.n, s.mean, s.std, s.best, s.best_minus_mean) == (3, 92.0, 2.0, 94.0, 2.0)
    assert summarize([]).mean is None and summarize([5.0]).std is None
    assert best_minus_mean([1.0, 2.0, 6.0]) == 3.0


def test_collapse_flag():
    assert PUBLISHED["DARTS_V1"].count_op("skip_connect") == 3
    assert is_collapsed(PUBLISHED["DARTS_V1"])
    assert not is_collapsed(PUBLISHED["DARTS_V1"], threshold=4)
    assert not is_collapsed(BASE)  # one skip-connect
    assert is_collapsed(BASE, threshold=1)
    assert skip_counts([PUBLISHED["DARTS_V1"], BASE, PUBLISHED["DARTS_V2"]]).tolist() == [3, 1, 2]


def test_stopped_changing_epoch():
    a, b = G1, G2
    a_swapped = with_normal_node(G1, 0, [G1.normal[1], G1.normal[0]])
    assert stopped_changing_epoch([a, a, b, a, b, b]) == 4
    assert stopped_changing_epoch([a, a, b, b]) == 2
    assert stopped_changing_epoch([a, a_swapped, a]) == 0  # same cell, different order
    assert stopped_changing_epoch([b]) == 0
    assert stopped_changing_epoch([a, b, b], epochs=[15, 16, 17]) == 16
    assert stopped_changing_epoch([a.to_json(), b.to_json()]) == 1
    with pytest.raises(ValueError):
        stopped_changing_epoch([])


def test_vectorized_stop_epochs_match_the_definition():
    rng = random.Random(2)
    pool = [G1, G2, G3]
    rows, expected = [], {}
    for t in range(20):
        n = rng.randint(1, 8)
        seq = [rng.choice(pool) for _ in range(n)]
        epochs = list(range(10, 10 + n))
        expected[f"t{t}"] = stopped_changing_epoch(seq, epochs)
        rows += [{"trial_id": f"t{t}", "epoch": e, "genotype": g.to_json()} for e, g in zip(epochs, seq)]
    rng.shuffle(rows)
    table = pa.Table.from_pylist(rows)
    assert _stop_epochs(table, set(expected)) == expected


def _hand_made_tables():
    trials = pa.Table.from_pylist([
        {"trial_id": "t1", "group": "A", "seed": 0, "status": "done", "val_acc": 90.0, "genotype": G1.to_json()},
        {"trial_id": "t2", "group": "A", "seed": 1, "status": "done", "val_acc": 92.0, "genotype": G2.to_json()},
        {"trial_id": "t3", "group": "A", "seed": 2, "status": "done", "val_acc": 94.0, "genotype": G3.to_json()},
        {"trial_id": "t4", "group": "A", "seed": 3, "status": "failed", "val_acc": None, "genotype": None},
        {"trial_id": "u1", "group": "B", "seed": 0, "status": "done", "val_acc": 95.0,
         "genotype": PUBLISHED["DARTS_V1"].to_json()},
        {"trial_id": "u2", "group": "B", "seed": 1, "status": "done", "val_acc": 97.0,
         "genotype": str(PUBLISHED["DARTS_V1"])},  # the official text form parses too
        {"trial_id": "u3", "group": "B", "seed": 2, "status": "running", "val_acc": 99.0, "genotype": None},
    ])
    evaluations = pa.Table.from_pylist([
        {"eval_id": "e1", "source": "trial:t1", "status": "done", "test_acc": 96.0},
        {"eval_id": "e2", "source": "trial:t1", "status": "done", "test_acc": 97.0},
        {"eval_id": "e3", "source": "trial:t2", "status": "done", "test_acc": 97.5},
        {"eval_id": "e4", "source": "trial:t3", "status": "failed", "test_acc": 10.0},
        {"eval_id": "e5", "source": "consensus:A", "status": "done", "test_acc": 98.0},
        {"eval_id": "e6", "source": "random:0", "status": "done", "test_acc": 50.0},
        {"eval_id": "e7", "source": "published:PDARTS", "status": "done", "test_acc": 97.5},
    ])
    epochs = pa.Table.from_pylist(
        [{"trial_id": "t1", "epoch": e, "genotype": g.to_json()} for e, g in enumerate([G2, G2, G1, G1])]
        + [{"trial_id": "t2", "epoch": e, "genotype": G2.to_json()} for e in range(4)]
        + [{"trial_id": "u3", "epoch": 0, "genotype": G3.to_json()}, {"trial_id": "u3", "epoch": 1,
                                                                        "genotype": G1.to_json()}])
    return trials, epochs, evaluations


def test_stability_table_on_hand_made_tables():
    trials, epochs, evaluations = _hand_made_tables()
    table = stability_table(trials, epochs, evaluations, options=StabilityOptions(n_boot=500))
    assert table.schema == SCHEMAS["stability"]
    rows = {r["group"]: r for r in table.to_pylist()}
    assert list(rows) == ["A", "B"]
    a, b = rows["A"], rows["B"]

    assert (a["n_seeds"], a["n_failed"], a["n_running"]) == (3, 1, 0)
    assert a["val_acc_mean"] == pytest.approx(92.0) and a["val_acc_std"] == pytest.approx(2.0)
    assert a["val_acc_best"] == 94.0 and a["best_minus_mean"] == pytest.approx(2.0)
    assert 90.0 <= a["val_acc_ci_low"] < 92.0 < a["val_acc_ci_high"] <= 94.0
    assert a["n_evaluated"] == 2  # t1 (mean of 96 and 97) and t2; t3's evaluation failed
    assert a["eval_acc_mean"] == pytest.approx(97.0)
    assert a["eval_acc_std"] == pytest.approx(np.sqrt(0.5))
    assert a["eval_best_minus_mean"] == pytest.approx(0.5)
    assert a["consensus_eval_acc_mean"] == 98.0 and a["n_consensus_evals"] == 1
    assert a["n_genotypes"] == 3
    assert a["genotype_distance_mean"] == pytest.approx(1 / 16)
    assert a["n_distinct_genotypes"] == 3
    assert a["consensus_genotype"] == G1.to_json()
    assert a["consensus_distance_mean"] == pytest.approx(1 / 24)
    assert a["skip_normal_mean"] == pytest.approx(4 / 3)
    assert a["collapse_rate"] == 0.0 and a["collapse_threshold"] == 3
    assert a["stop_changing_epoch_mean"] == pytest.approx(1.0)  # t1 settles at epoch 2, t2 at 0
    assert json.loads(a["edge_frequencies"])["normal"]["3->4"] == pytest.approx(1 / 3)
    assert json.loads(a["op_frequencies"])["normal"]["skip_connect"] == pytest.approx(4 / 24)
    assert json.loads(a["edge_op_frequencies"])["normal"]["1->4"]["dil_conv_3x3"] == pytest.approx(1 / 3)

    assert (b["n_seeds"], b["n_failed"], b["n_running"]) == (2, 0, 1)
    assert b["val_acc_mean"] == pytest.approx(96.0)  # the running trial's 99.0 does not count
    assert b["val_acc_std"] == pytest.approx(np.sqrt(2.0))
    assert b["genotype_distance_mean"] == 0.0 and b["n_distinct_genotypes"] == 1
    assert b["consensus_genotype"] == PUBLISHED["DARTS_V1"].to_json()
    assert b["consensus_distance_mean"] == 0.0
    assert b["skip_normal_mean"] == 3.0 and b["collapse_rate"] == 1.0
    assert b["n_evaluated"] == 0 and b["eval_acc_mean"] is None and b["consensus_eval_acc_mean"] is None
    assert b["stop_changing_epoch_mean"] is None  # u3 is still running

    stricter = stability_table(trials, options=StabilityOptions(n_boot=200, collapse_threshold=2))
    assert {r["group"]: r["collapse_rate"] for r in stricter.to_pylist()} == {"A": pytest.approx(1 / 3), "B": 1.0}
    assert stricter.column("eval_acc_mean").null_count == 2


def test_stability_table_is_deterministic_and_round_trips_through_the_store(tmp_path):
    trials, epochs, evaluations = _hand_made_tables()
    opts = StabilityOptions(n_boot=300, seed=5)
    first = stability_table(trials, epochs, evaluations, options=opts)
    assert stability_table(trials, epochs, evaluations, options=opts).equals(first)
    store = ResultStore(str(tmp_path), "exp")
    store.upsert("trials", trials.to_pylist())
    store.upsert("stability", first)
    back = store.read("stability")
    assert back.equals(first)
    recomputed = stability_table(store.read("trials"), None, None, options=opts)
    assert recomputed.column("val_acc_ci_low").to_pylist() == first.column("val_acc_ci_low").to_pylist()


def test_stability_table_reports_a_bad_genotype():
    trials = pa.Table.from_pylist([{"trial_id": "x", "group": "A", "status": "done", "val_acc": 1.0,
                                    "genotype": "{not json"}])
    with pytest.raises(ValueError, match="trial 'x'"):
        stability_table(trials)


def test_render_table_fits_120_columns():
    from rich.console import Console

    trials, epochs, evaluations = _hand_made_tables()
    long_group = "method=pcdarts,edge_norm=True,k=4,arch_lr=0.0006,epochs=50"
    trials = trials.set_column(1, "group", pa.array([long_group] * 4 + ["method=darts,k=1"] * 3))
    evaluations = evaluations.set_column(1, "source", pa.array(
        [f"consensus:{long_group}" if s == "consensus:A" else s for s in evaluations["source"].to_pylist()]))
    table = stability_table(trials, epochs, evaluations, options=StabilityOptions(n_boot=200))
    console = Console(width=120, record=True, color_system=None)
    render_table(table, console, evaluate_hint="python -m orchestrator.evaluate --from X")
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "92.00 ± 2.00" in text and "96.00 ± 1.41" in text
    assert "100%" in text and "│ method=darts " in text and "│ k=1 " in text  # a group's pairs one a line
    assert "97.00 ± 0.71" in text and "(2)" in text and "98.00" in text
    assert "edge_norm=True" in text and "arch_lr=0.0006" in text  # short labels: one pair a line, unbroken
    # whole words in the header, each explained by the legend under the table
    header = text.split("┡")[0]
    for word in ("distance", "distinct", "skips", "collapse"):
        assert word in header, word
    assert "-\n" not in header.replace("- mean", "")  # no word broken over two lines
    legend = " ".join(text.split("┘")[-1].split())
    for column in ("val acc:", "best - mean:", "distance:", "distinct:", "skips:", "collapse:", "eval acc:",
                   "cons. eval:"):
        assert column in legend, column
    assert "eval columns empty" not in text  # cells were retrained


def test_render_table_reference_levels_and_the_evaluate_hint():
    from rich.console import Console

    from orchestrator.stability import references

    trials, epochs, _ = _hand_made_tables()
    trials = trials.append_column("cfg_dataset", pa.array(["cifar100"] * trials.num_rows))
    table = stability_table(trials, epochs, None, options=StabilityOptions(n_boot=50))
    console = Console(width=120, record=True, color_system=None)
    render_table(table, console, refs=list(references(trials, epochs).values()),
                 evaluate_hint="python -m orchestrator.evaluate --from results/exp")
    text = " ".join(console.export_text().split())
    assert "reference levels: chance accuracy 0.010 (cifar100) · random cells' distance 0.909 (darts)" in text
    assert "eval columns empty: nothing retrained yet; run python -m orchestrator.evaluate --from results/exp" in text


def test_reference_levels_of_every_space():
    """Chance is 1/classes, the random cells' distance comes from each space's random baseline, the uniform entropy
    is the log of the alphas' width (the search's arch_entropy_max where the epochs carry it)."""
    import math

    from orchestrator.stability import references
    from pcdarts_core.spaces import SPACE_NAMES, get_space
    from pcdarts_core.stability import RANDOM_REFERENCE_CELLS

    rows, epochs = [], []
    for i, space in enumerate(SPACE_NAMES):
        rows.append({"trial_id": f"t{i}", "group": f"method=darts,search_space={space}", "status": "done",
                     "cfg_dataset": "imagenet16-120" if space == "nb201" else "cifar10", "cfg_search_space": space})
        width = 5 if space == "nb201" else 8
        epochs.append({"trial_id": f"t{i}", "epoch": 1, "alphas_normal": [[0.0] * width] * 6})
    epochs[0]["arch_entropy_max"] = math.log(7)  # the search's own bound wins over the alphas' width
    refs = references(pa.Table.from_pylist(rows), pa.Table.from_pylist(epochs))
    assert len(refs) == len(SPACE_NAMES)
    for space in SPACE_NAMES:
        r = refs[f"method=darts,search_space={space}"]
        cells = [get_space(space).random_cell(i) for i in range(RANDOM_REFERENCE_CELLS)]
        assert r.random_distance == pytest.approx(pairwise_distance_mean(cells))
        assert r.chance == pytest.approx(1 / 120 if space == "nb201" else 0.1)
    assert refs["method=darts,search_space=darts"].random_distance == pytest.approx(0.909, abs=0.001)
    assert refs["method=darts,search_space=nb201"].random_distance == pytest.approx(0.801, abs=0.001)
    assert refs["method=darts,search_space=darts"].uniform_entropy == pytest.approx(math.log(7))
    assert refs["method=darts,search_space=nb201"].uniform_entropy == pytest.approx(math.log(5))
    assert refs["method=darts,search_space=s2"].uniform_entropy == pytest.approx(math.log(8))


def test_fast_paths_agree_with_the_strict_parser():
    from pcdarts_core.stability import canonical_key, genotype_json_key, parse_genotype_json

    rng = random.Random(3)
    genos = [random_genotype(rng, repeat=True) for _ in range(20)] + list(PUBLISHED.values())
    for g in genos:
        assert parse_genotype_json(g.to_json()) == g
        assert genotype_json_key(g.to_json()) == canonical_key(g)
    assert genotype_json_key(str(BASE)) is None  # official text form: left to the full parser
    bad = [BASE.to_json().replace("sep_conv_3x3", "sep_conv_9x9"),  # unknown op
           BASE.to_json().replace('"reduce_counts": [2, 2, 2, 2]', '"reduce_counts": [2, 2, 2, 1]'),
           BASE.to_json().replace('["skip_connect", 0]', '["skip_connect", true]'),
           BASE.to_json().replace('["skip_connect", 0]', '["skip_connect", 7]'),
           "{not json"]
    for text in bad:
        assert genotype_json_key(text) is None
        with pytest.raises(ValueError):
            parse_genotype_json(text) or parse_genotype(text)


def test_bad_epoch_genotype_is_reported():
    trials, epochs, _ = _hand_made_tables()
    epochs = pa.concat_tables([epochs, pa.Table.from_pylist(
        [{"trial_id": "t2", "epoch": 9, "genotype": BASE.to_json().replace("sep_conv_5x5", "conv_11x11")}])])
    with pytest.raises(ValueError, match="epochs genotype"):
        stability_table(trials, epochs, options=StabilityOptions(n_boot=50))
