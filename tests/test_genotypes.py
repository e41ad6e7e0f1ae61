"""Genotype derivation, (de)serialization and hostile inputs."""

import json

import pytest
import torch

from pcdarts_core.genotypes import (PUBLISHED, Genotype, consensus_genotype, derive_genotype, genotype_distance,
                                    load_genotype, normalized_betas, parse_genotype, saved_arch)
from pcdarts_core.ops import PRIMITIVES

OP = {name: i for i, name in enumerate(PRIMITIVES)}


def alphas_for(choices: dict[int, str], strength: dict[int, float] | None = None) -> torch.Tensor:
    """(14, 8) alphas where edge e prefers op choices[e] with logit strength[e] (default 1), others 0."""
    a = torch.zeros(14, 8)
    for e, op in choices.items():
        a[e, OP[op]] = (strength or {}).get(e, 1.0)
    return a


def test_derivation_picks_strongest_edges_and_ops():
    # node 0: edges 0,1; node 1: edges 2,3,4; node 2: 5..8; node 3: 9..13
    a = alphas_for({0: "sep_conv_3x3", 1: "max_pool_3x3", 2: "skip_connect", 4: "dil_conv_5x5",
                    5: "sep_conv_5x5", 8: "avg_pool_3x3", 10: "dil_conv_3x3", 13: "sep_conv_3x3"},
                   {4: 2.0, 8: 3.0, 13: 2.0})
    g = derive_genotype(a, a)
    assert g.nodes("normal")[0] == [("sep_conv_3x3", 0), ("max_pool_3x3", 1)]
    assert g.nodes("normal")[1] == [("dil_conv_5x5", 2), ("skip_connect", 0)]
    assert g.nodes("normal")[2] == [("avg_pool_3x3", 3), ("sep_conv_5x5", 0)]
    assert g.nodes("normal")[3] == [("sep_conv_3x3", 4), ("dil_conv_3x3", 1)]
    assert g.normal_concat == (2, 3, 4, 5)


def test_none_never_chosen_even_when_it_dominates():
    a = torch.zeros(14, 8)
    a[:, OP["none"]] = 10.0  # `none` wins every softmax ...
    a[0, OP["sep_conv_5x5"]] = 0.5
    g = derive_genotype(a, a)
    assert all(op != "none" for op, _ in g.normal + g.reduce)
    assert g.nodes("normal")[0][0] == ("sep_conv_5x5", 0)


def test_ties_go_to_lower_input_and_earlier_op():
    g = derive_genotype(torch.zeros(14, 8), torch.zeros(14, 8))
    # all equal: inputs 0 and 1 of every node, first non-none op (max_pool_3x3)
    for node in g.nodes("normal"):
        assert node == [("max_pool_3x3", 0), ("max_pool_3x3", 1)]


def test_betas_scale_edges_node_wise():
    a = alphas_for({5: "sep_conv_3x3", 6: "sep_conv_3x3", 7: "sep_conv_3x3", 8: "sep_conv_3x3"})
    betas = torch.zeros(14)
    betas[7] = 5.0  # node 2's input 2 (edge 7) and input 0 (edge 5) ...
    betas[5] = 4.0
    g = derive_genotype(a, a, betas, betas)
    assert {i for _, i in g.nodes("normal")[2]} == {2, 0}
    nb = normalized_betas(betas)
    assert torch.allclose(nb[0:2].sum(), torch.tensor(1.0)) and torch.allclose(nb[9:14].sum(), torch.tensor(1.0))


def test_json_and_official_text_round_trip():
    for name, g in PUBLISHED.items():
        assert parse_genotype(g.to_json()) == g, name
        assert parse_genotype(str(g)) == g, name
        assert parse_genotype(f"{name} = {g}") == g
    data = json.loads(PUBLISHED["DARTS_V2"].to_json())
    assert data["normal"][0] == ["sep_conv_3x3", 0] and data["normal_concat"] == [2, 3, 4, 5]


def test_published_genotypes_exactly_as_printed():
    g = PUBLISHED["PC_DARTS_CIFAR"]
    assert g.normal[0] == ("sep_conv_3x3", 1) and g.normal[-1] == ("dil_conv_3x3", 1)
    assert g.reduce[3] == ("sep_conv_5x5", 2)
    assert PUBLISHED["PDARTS"].count_op("skip_connect") == 2
    assert PUBLISHED["DARTS_V1"].reduce[-1] == ("avg_pool_3x3", 0)
    assert PUBLISHED["PC_DARTS_IMAGENET"].normal[-1] == ("dil_conv_5x5", 4)
    assert set(PUBLISHED) == {"DARTS_V1", "DARTS_V2", "PC_DARTS_CIFAR", "PC_DARTS_IMAGENET", "PDARTS"}


def test_variable_input_counts_round_trip():
    g = Genotype((("sep_conv_3x3", 0), ("skip_connect", 1), ("max_pool_3x3", 2), ("dil_conv_3x3", 3),
                  ("sep_conv_5x5", 0), ("avg_pool_3x3", 4)), (2, 3, 4, 5),
                 PUBLISHED["DARTS_V2"].reduce, (2, 3, 4, 5), normal_counts=(1, 1, 1, 3))
    assert parse_genotype(g.to_json()) == g
    assert parse_genotype(str(g)) == g
    assert g.nodes("normal")[3] == [("dil_conv_3x3", 3), ("sep_conv_5x5", 0), ("avg_pool_3x3", 4)]


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("Genotype(normal=[('sep_conv_9x9', 0)] * 8)", "unsupported"),
    ("__import__('os').system('echo pwned')", "must be JSON or Genotype"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 7)], normal_concat=[2], "
     "reduce=[('skip_connect', 0), ('skip_connect', 1)], reduce_concat=[2])", "cannot take input 7"),
    ("Genotype(normal=[('conv_banana', 0), ('sep_conv_3x3', 1)], reduce=[('skip_connect', 0), ('skip_connect', 1)])",
     "unknown op 'conv_banana'"),
    ("Genotype(normal=[('none', 0), ('sep_conv_3x3', 1)], reduce=[('skip_connect', 0), ('skip_connect', 1)])",
     "unknown op 'none'"),
    ('{"normal": [["sep_conv_3x3", 0]], "reduce": []}', "cannot be two per node"),
    ('{"normal": "x", "reduce": []}', "must be a list"),
    ('{"normal": [], "reduce": [], "evil": 1}', "unknown fields"),
    ('{"normal": [["sep_conv_3x3", true], ["skip_connect", 1]], "reduce": [["skip_connect", 0], ["skip_connect", 1]]}',
     "expected an integer"),
    ("{not json", "malformed"),
    ("Genotype(normal=[('sep_conv_3x3', 0)", "malformed"),
    ("Genotype(**{'normal': []})", r"\*\* arguments"),
    ("Genotype(normal=[], normal=[], reduce=[])", "given twice"),
])
def test_hostile_or_malformed_text_is_a_clear_value_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_genotype(text)


def test_load_genotype_by_name_file_and_errors(tmp_path):
    assert load_genotype("PDARTS") == PUBLISHED["PDARTS"]
    f = tmp_path / "g.txt"
    f.write_text(str(PUBLISHED["DARTS_V1"]))
    assert load_genotype(str(f)) == PUBLISHED["DARTS_V1"]
    with pytest.raises(ValueError, match="neither a published genotype"):
        load_genotype("NO_SUCH_CELL")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not text|malformed|must be JSON"):
        load_genotype(str(bad))


def test_distance_and_consensus():
    a, b = PUBLISHED["DARTS_V2"], PUBLISHED["PC_DARTS_CIFAR"]
    assert genotype_distance(a, a) == 0.0
    swapped = Genotype(tuple(a.normal[1::-1]) + a.normal[2:], a.normal_concat, a.reduce, a.reduce_concat)
    assert genotype_distance(a, swapped) == 0.0  # order inside a node does not matter
    d = genotype_distance(a, b)
    assert 0 < d <= 1 and d == genotype_distance(b, a)
    assert consensus_genotype([a, a, a]) == a
    assert genotype_distance(consensus_genotype([a, a, b]), a) == 0.0
    # one changed choice out of 16
    changed = Genotype((("dil_conv_5x5", 0),) + a.normal[1:], a.normal_concat, a.reduce, a.reduce_concat)
    assert genotype_distance(a, changed) == pytest.approx(1 / 16)


def test_saved_arch_finds_the_arch_parameters_of_a_saved_search():
    a, b = torch.zeros(14, 8), torch.ones(14, 8)
    arch = {"alphas_normal": a, "alphas_reduce": b, "model": {}}
    assert saved_arch(arch) is arch  # arch parameters themselves
    state = {"model": {"module.alphas_normal": a, "alphas_reduce": b, "module.stem.weight": a},
             "method": {"primitives": [["none"]]}}  # a search's own state (P-DARTS: its pruned ops)
    assert {k: id(v) for k, v in saved_arch(state).items()} == {"primitives": id(state["method"]["primitives"]),
                                                               "alphas_normal": id(a), "alphas_reduce": id(b)}
    assert "primitives" not in saved_arch({**state, "primitives": None})  # saved as None: the default ops
    with pytest.raises(ValueError, match="several alphas_normal entries: a.alphas_normal, b.alphas_normal"):
        saved_arch({"state_dict": {"a.alphas_normal": a, "b.alphas_normal": a}})
    with pytest.raises(ValueError, match="^missing alphas_reduce "):
        saved_arch({"model": {"alphas_normal": a}})
