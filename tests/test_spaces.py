"""Search spaces (pcdarts_core.spaces): NAS-Bench-201 cells and networks, RobustDARTS S1-S4, every method in every
space it supports, and the space-aware pieces of evaluation and the stability statistics."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from orchestrator.stability import stability_table
from pcdarts_core.stability import genotype_stats
from pcdarts_core.config import eval_config, search_config
from pcdarts_core.genotypes import PUBLISHED, Genotype, genotype_distance, parse_genotype
from pcdarts_core.methods import METHOD_NAMES
from pcdarts_core.nb201 import NB201Network, NB201SearchNetwork
from pcdarts_core.nb201_arch import EDGES, NB201_OPS, NB201Arch, consensus_arch, parse_arch, random_arch
from pcdarts_core.ops import OPS, Noise
from pcdarts_core.profile import count_parameters
from pcdarts_core.runtime import load_checkpoint, save_checkpoint
from pcdarts_core.search import Searcher
from pcdarts_core.spaces import S1_EDGE_OPS, SPACE_NAMES, SPACES, get_space, param_free_shares
from pcdarts_core.train import build_eval_network, train_eval

torch.set_num_threads(1)

EXAMPLE = "|nor_conv_3x3~0|+|nor_conv_3x3~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"
ALL_CONV = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
PARAM_FREE = "|skip_connect~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|none~1|avg_pool_3x3~2|"


# -- architecture strings -----------------------------------------------------------------------------------------
def test_arch_string_round_trips_and_edges():
    arch = parse_arch(EXAMPLE)
    assert str(arch) == EXAMPLE
    assert arch.ops == ("nor_conv_3x3", "nor_conv_3x3", "skip_connect", "skip_connect", "skip_connect", "skip_connect")
    assert arch.edges() == [(0, 1, "nor_conv_3x3"), (0, 2, "nor_conv_3x3"), (1, 2, "skip_connect"),
                            (0, 3, "skip_connect"), (1, 3, "skip_connect"), (2, 3, "skip_connect")]
    assert parse_genotype(EXAMPLE) == arch and parse_genotype(arch.to_json()) == arch
    assert json.loads(arch.to_json()) == {"nb201": EXAMPLE}
    for i in range(300):
        a = random_arch(i)
        assert parse_arch(str(a)) == a and parse_genotype(a.to_json()) == a
    assert len({random_arch(i) for i in range(300)}) > 250  # random, and reproducible:
    assert random_arch(7) == random_arch(7) and random_arch(7, seed=1) != random_arch(7)


@pytest.mark.parametrize("text, message", [
    ("", "3 '+'-separated node groups"),
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|skip_connect~1|", "3 '+'-separated node groups"),
    ("|conv_9x9~0|+|none~0|none~1|+|none~0|none~1|none~2|", "unknown op 'conv_9x9'"),
    ("|none~0|+|none~0|none~2|+|none~0|none~1|none~2|", "node 2 cannot take input 2"),
    ("|none~0|+|none~0|none~0|+|none~0|none~1|none~2|", "node 2 takes input 0 twice"),
    ("|none~0|+|none~0|+|none~0|none~1|none~2|", "node 2 needs 2 inputs"),
    ("|none~x|+|none~0|none~1|+|none~0|none~1|none~2|", "expected 'op~input'"),
    ("none~0+|none~0|none~1|+|none~0|none~1|none~2|", "expected '|op~input|...|'"),
    ("|__import__('os')~0|+|none~0|none~1|+|none~0|none~1|none~2|", "unknown op"),
    ('{"nb201": 3}', "stored as"),
])
def test_malformed_arch_strings_are_one_line_errors(text, message):
    with pytest.raises(ValueError) as err:
        parse_genotype(text) if text.startswith("{") else parse_arch(text)
    assert message in str(err.value) and "\n" not in str(err.value)


# -- parameter counts ----------------------------------------------------------------------------------------------
#: The benchmark's own ``params`` column (NAS-Bench-201-v1_1-096897, in MB = 1e6 parameters): the smallest cells
#: (no convolution) and the largest (nor_conv_3x3 on all six edges), per dataset, as listed by HPOBench's
#: NAS-Bench-201 export (min/max params per dataset).
BENCH_PARAMS = {"cifar10": (10, 73_306, 1_531_546), "cifar100": (100, 79_156, 1_537_396),
                "imagenet16-120": (120, 80_456, 1_538_696)}


def analytic_params(arch: NB201Arch, classes: int, C: int = 16, N: int = 5) -> int:
    """Stem conv3x3+BN; N cells per stage (nor_conv kxk: k^2 c^2 weights + BN 2c, the rest none); two residual
    blocks (two ReLU-Conv3x3-BN and an avg-pool + 1x1 conv shortcut); BN before pooling; the classifier."""
    per_cell = lambda c: sum({"nor_conv_3x3": 9 * c * c + 2 * c, "nor_conv_1x1": c * c + 2 * c}.get(op, 0)  # noqa: E731
                             for op in arch.ops)
    block = lambda ci, co: 9 * ci * co + 2 * co + 9 * co * co + 2 * co + ci * co  # noqa: E731
    return (27 * C + 2 * C + N * (per_cell(C) + per_cell(2 * C) + per_cell(4 * C)) + block(C, 2 * C)
            + block(2 * C, 4 * C) + 2 * 4 * C + 4 * C * classes + classes)


@pytest.mark.parametrize("dataset", sorted(BENCH_PARAMS))
def test_eval_network_matches_the_benchmarks_parameter_counts(dataset):
    classes, smallest, largest = BENCH_PARAMS[dataset]
    for text, expected in ((PARAM_FREE, smallest), (ALL_CONV, largest)):
        arch = parse_arch(text)
        assert count_parameters(NB201Network(16, classes, 5, arch)) == expected == analytic_params(arch, classes)
    for i in range(5):  # mixed cells: the analytic count, which the two published extremes pin down
        arch = random_arch(i)
        assert count_parameters(NB201Network(16, classes, 5, arch)) == analytic_params(arch, classes)


def test_eval_network_runs_every_edge_and_returns_no_auxiliary_logits():
    net = NB201Network(8, 10, 1, parse_arch(EXAMPLE)).eval()
    logits, aux = net(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10) and aux is None
    assert len(net.cells) == 5 and [type(m).__name__ for m in net.cells].count("ResNetBasicBlock") == 2


# -- the supernet ---------------------------------------------------------------------------------------------------
def test_supernet_derives_argmax_per_edge_including_none():
    net = NB201SearchNetwork(8, 10, 1, seed=0)
    assert net.alphas_normal.shape == (len(EDGES), len(NB201_OPS)) and net.arch_parameters() == [net.alphas_normal]
    with torch.no_grad():
        net.alphas_normal.zero_()
        for e, op in enumerate(("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3", "none")):
            net.alphas_normal[e, NB201_OPS.index(op)] = 1.0
    assert str(net.genotype()) == ("|none~0|+|skip_connect~0|nor_conv_1x1~1|+|nor_conv_3x3~0|avg_pool_3x3~1|"
                                   "none~2|")
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    # PC-DARTS partial channels and edge normalization: betas scale edges, the argmax per edge is unchanged
    pc = NB201SearchNetwork(8, 10, 1, k=4, edge_norm=True, seed=0)
    assert len(pc.arch_parameters()) == 2 and pc(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert sum(p.numel() for p in pc.weight_parameters()) < sum(p.numel() for p in net.weight_parameters())
    with pytest.raises(ValueError, match="does not divide"):
        NB201SearchNetwork(6, 10, 1, k=4)


# -- every method in every space it supports --------------------------------------------------------------------
TINY = dict(init_channels=4, image_size=8, batch_size=8, synthetic_samples=32, eval_steps=1, steps_per_epoch=2,
            device="cpu")
PAIRS = [(m, s) for s in SPACE_NAMES for m in METHOD_NAMES]


def tiny_search_config(method: str, space: str, **extra):
    overrides = dict(TINY, search_space=space, **extra)
    if space == "nb201":
        overrides.update(layers=1, epochs=2, warmup_epochs=1)
    elif method == "pdarts":
        overrides.update(epochs=3, warmup_epochs=0, options={"stage_layers": (3, 3, 3), "stage_epochs": (1, 1, 1)})
    else:
        overrides.update(layers=3, epochs=2, warmup_epochs=1 if method in ("pcdarts", "entrannas") else 0)
    if method == "entrannas" and space == "s1":
        overrides["options"] = {"feature_sharing": False}  # S1's edges differ: nothing to share
    return search_config(method, "synthetic", **overrides)


@pytest.mark.parametrize("method, space", PAIRS)
def test_every_method_searches_in_every_space_it_supports(method, space):
    reason = get_space(space).unsupported.get(method)
    if reason is not None:
        with pytest.raises(ValueError) as err:
            tiny_search_config(method, space)
        assert f"does not run in search space {space}" in str(err.value) and reason in str(err.value)
        return
    cfg = tiny_search_config(method, space)
    searcher = Searcher(cfg)
    while not searcher.done:
        metrics = searcher.run_epoch()
    geno = parse_genotype(metrics["genotype"])
    assert metrics["val_acc"] is not None and metrics["arch_entropy"] > 0
    assert 0 <= metrics["param_free_share_normal"] <= 1
    if space == "nb201":
        assert isinstance(geno, NB201Arch) and "alphas_reduce" not in metrics
        assert len(metrics["alphas_normal"]) == 6 and len(metrics["alphas_normal"][0]) == 5
        assert metrics["n_skip_normal"] == geno.count_op("skip_connect")
        return
    assert isinstance(geno, Genotype)
    edge_ops = get_space(space).edge_ops
    if edge_ops is not None:  # every chosen op is one the space offers on that edge
        for cell in ("normal", "reduce"):
            start = 0
            for node, pairs in enumerate(geno.nodes(cell)):
                for op, inp in pairs:
                    assert op in edge_ops[cell][start + inp], (cell, node, op, inp)
                start += node + 2
        assert len(metrics["alphas_normal"][0]) == len(edge_ops["normal"][0]) - (method == "rome" and space == "s3")


def test_nb201_search_is_reproducible():
    runs = []
    for _ in range(2):
        searcher = Searcher(tiny_search_config("darts", "nb201"))
        losses = []
        while not searcher.done:
            m = searcher.run_epoch()
            losses.append((m["train_loss"], m["val_loss"]))
        runs.append((losses, m["genotype"], m["alphas_normal"]))
    assert runs[0] == runs[1]


def test_nb201_search_resumes_exactly_with_second_order_and_the_hessian(tmp_path):
    cfg = tiny_search_config("darts", "nb201", order="second", hessian_every=1, epochs=3, warmup_epochs=0)
    first = Searcher(cfg)
    first.run_epoch()
    save_checkpoint(first.state_dict(), tmp_path / "ckpt.pt")
    straight = [first.run_epoch() for _ in range(2)]
    resumed = Searcher(cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt"))
    again = [resumed.run_epoch() for _ in range(2)]
    keys = ("train_loss", "val_loss", "genotype", "alphas_normal", "hessian_eigenvalue")
    assert [[m[k] for k in keys] for m in straight] == [[m[k] for k in keys] for m in again]


# -- RobustDARTS S1-S4 ------------------------------------------------------------------------------------------
def test_reduced_spaces_are_robustdarts():
    assert SPACES["s2"].edge_ops == {t: [("skip_connect", "sep_conv_3x3")] * 14 for t in ("normal", "reduce")}
    assert SPACES["s3"].edge_ops["normal"][0] == ("none", "skip_connect", "sep_conv_3x3")
    assert SPACES["s4"].edge_ops["reduce"][13] == ("noise", "sep_conv_3x3")
    # spot checks against automl/RobustDARTS src/spaces.py primitives_1
    assert S1_EDGE_OPS["normal"][5] == ("max_pool_3x3", "skip_connect")
    assert S1_EDGE_OPS["normal"][12] == ("dil_conv_3x3", "dil_conv_5x5")
    assert S1_EDGE_OPS["reduce"][1] == ("max_pool_3x3", "dil_conv_3x3")
    assert all(len(S1_EDGE_OPS[t]) == 14 and all(len(e) == 2 for e in S1_EDGE_OPS[t]) for t in S1_EDGE_OPS)
    # ROME drops `none` in S3; sharpDARTS's official op table does not apply in a space with its own ops
    assert get_space("s3").edge_primitives(("skip_connect", "sep_conv_3x3", "max_pool_3x3"))["normal"][0] == \
        ("skip_connect", "sep_conv_3x3")
    with pytest.raises(ValueError, match="s1 needs dil_conv_3x3"):
        search_config("sharpdarts", "synthetic", search_space="s1", options={"op_table": "sharpdarts"})
    assert search_config("sharpdarts", "synthetic", search_space="s2", options={"op_table": "sharpdarts"})  # its ops
    assert search_config("sharpdarts", "synthetic", search_space="s2").options.op_table == "auto"
    with pytest.raises(ValueError, match="own ops"):
        search_config("sharpdarts", "synthetic", search_space="nb201", options={"op_table": "sharpdarts"})
    with pytest.raises(ValueError, match="feature sharing needs the same ops on every edge"):
        search_config("entrannas", "synthetic", search_space="s1")  # refused when the config is built
    with pytest.raises(ValueError, match="unknown search_space 'foo'"):
        search_config("pcdarts", "synthetic", search_space="foo")


def test_noise_op_ignores_its_input_and_keeps_the_shape():
    op = OPS["noise"](8, 2, False)
    assert isinstance(op, Noise) and not list(op.parameters())
    x = torch.randn(2, 8, 8, 8)
    torch.manual_seed(0)
    a = op(x)
    torch.manual_seed(0)
    b = op(torch.zeros_like(x))
    assert a.shape == (2, 8, 4, 4) and torch.equal(a, b) and 0.5 < float(a.std()) < 1.5


def test_parameter_free_share():
    g = PUBLISHED["DARTS_V1"]  # normal: 5 sep_conv_3x3 + 3 skip_connect; reduce: max_pool/skip/avg_pool only
    assert param_free_shares(g, ("normal", "reduce")) == {"param_free_share_normal": 3 / 8,
                                                          "param_free_share_reduce": 1.0}
    assert param_free_shares(parse_arch(PARAM_FREE), ("normal",)) == {"param_free_share_normal": 1.0}


# -- evaluation -------------------------------------------------------------------------------------------------
def test_nb201_cells_train_in_the_benchmark_network_and_spaces_refuse_foreign_cells():
    cfg = eval_config("synthetic", search_space="nb201", epochs=1, steps_per_epoch=2, eval_steps=1, batch_size=8,
                      synthetic_samples=(16, 16), image_size=8, init_channels=4, device="cpu")
    assert cfg.layers == 1 and not cfg.auxiliary and cfg.drop_path == 0.0
    assert eval_config("cifar10", search_space="nb201").init_channels == 16  # C=16, N=5, the benchmark's recipe
    assert eval_config("cifar10", search_space="nb201").layers == 5
    metrics = list(train_eval(cfg, parse_arch(EXAMPLE)))
    assert len(metrics) == 1 and metrics[0]["params"] > 0 and 0 <= metrics[0]["test_acc"] <= 1
    with pytest.raises(ValueError, match="evaluates DARTS genotypes"):
        build_eval_network(eval_config("synthetic", search_space="s2"), parse_arch(EXAMPLE), 10)
    with pytest.raises(ValueError, match="evaluates NAS-Bench-201 cells"):
        build_eval_network(cfg, PUBLISHED["PDARTS"], 10)


# -- stability statistics of NAS-Bench-201 cells ------------------------------------------------------------------
def test_stability_of_nb201_cells():
    a, b = parse_arch(EXAMPLE), parse_arch(ALL_CONV)
    c = NB201Arch(a.ops[:5] + ("none",))
    assert genotype_distance(a, b) == pytest.approx(4 / 6) and genotype_distance(a, c) == pytest.approx(1 / 6)
    assert consensus_arch([a, a, b]) == a and consensus_arch([b, a]) == b
    stats = genotype_stats([a.to_json(), a.to_json(), b.to_json()])
    assert stats.consensus == a and stats.n_distinct == 2
    assert stats.distance_mean == pytest.approx((0 + 4 / 6 + 4 / 6) / 3)
    assert stats.skip_normal_mean == pytest.approx((4 + 4 + 0) / 3)

    trials = pa.table({"trial_id": ["t0", "t1", "t2"], "group": ["g"] * 3, "status": ["done", "done", "failed"],
                       "val_acc": [0.5, 0.6, None], "genotype": [a.to_json(), b.to_json(), None],
                       "bench_acc_cifar10": [0.90, 0.94, 0.10], "param_free_share_normal": [4 / 6, 0.0, None]})
    row = stability_table(trials).to_pylist()[0]
    assert row["bench_acc_cifar10_mean"] == pytest.approx(0.92)  # the failed seed does not count
    assert row["bench_acc_cifar10_ci_low"] <= 0.92 <= row["bench_acc_cifar10_ci_high"]
    assert row["param_free_share_normal_mean"] == pytest.approx(1 / 3)
    assert json.loads(row["consensus_genotype"]) in ({"nb201": EXAMPLE}, {"nb201": ALL_CONV})
