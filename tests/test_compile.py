"""``compile``: the compiled network gives the eager network's losses and gradients, compiles once (not every
step), and dynamic methods compile regions only. Inductor's C++ build of even a tiny supernet took over 15
minutes on the shared 2-core machine, so the CPU check captures the same whole graphs (dynamo + AOTAutograd's
forward and backward) with the ``aot_eager`` backend; inductor's numbers are checked on CUDA (tests/test_gpu.py).
It uses the smallest supernet that still has every part of the forward (stem, partial channels with
shuffle, edge normalization, both cell types, classifier): 3 cells of 4 channels, three cheap candidate ops."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pcdarts_core.architect import frozen
from pcdarts_core.compilation import COMPILE_MODES, compile_model, compile_regions
from pcdarts_core.config import eval_config, search_config
from pcdarts_core.methods import get_method
from pcdarts_core.supernet import SearchNetwork

torch.set_num_threads(1)


def _tiny_net() -> SearchNetwork:
    return SearchNetwork(4, 10, 3, k=2, primitives=("none", "avg_pool_3x3", "skip_connect"), seed=0)


def test_whole_compile_gives_the_eager_losses_and_compiles_once():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = _tiny_net()
    net = copy.deepcopy(eager)
    compiled = compile_model(net, "default", whole=True, backend="aot_eager")
    assert compiled is not net and compiled.state_dict().keys() == {f"_orig_mod.{k}" for k in net.state_dict()}
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    runs = {}
    for name, model, module in (("eager", eager, eager), ("compiled", compiled, net)):
        opt = torch.optim.SGD(module.weight_parameters(), 0.1)
        losses, graphs = [], []
        for _ in range(3):  # weight steps (arch frozen), as the search takes them
            opt.zero_grad()
            with frozen(module.arch_parameters()):
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            graphs.append(counters["stats"]["unique_graphs"])
        runs[name] = losses, graphs
    assert runs["compiled"][0] == pytest.approx(runs["eager"][0], rel=1e-4)
    assert runs["compiled"][0][0] != runs["compiled"][0][2]  # the steps changed the weights
    graphs = runs["compiled"][1]
    assert graphs[0] >= 1 and graphs[2] == graphs[1] == graphs[0], graphs  # only the first step compiled
    for a, b in zip(eager.parameters(), net.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_static_methods_compile_whole_the_others_regions():
    static = {name: get_method(name).static_graph(search_config(name, "synthetic"))
              for name in ("pcdarts", "darts", "sharpdarts", "pdarts", "rome", "entrannas")}
    assert static == {"pcdarts": True, "darts": True, "sharpdarts": True, "pdarts": False, "rome": False,
                      "entrannas": False}
    assert not get_method("pcdarts").static_graph(search_config("pcdarts", "synthetic", channel_sampling="random"))


def test_regions_are_the_outermost_sequentials_compiled_in_place():
    net = _tiny_net()
    regions = compile_regions(net)
    ids = {id(r) for r in regions}
    assert net.stem in regions and all(isinstance(r, nn.Sequential) for r in regions)
    assert all(id(m) not in ids for r in regions for m in list(r.modules())[1:])  # none inside another
    preprocess = [c.preprocess1.op for c in net.cells]
    assert all(p in regions for p in preprocess)
    keys = list(net.state_dict())
    assert compile_model(net, "default", whole=False) is net  # in place: checkpoints keep their keys
    assert list(net.state_dict()) == keys
    assert all(getattr(r, "_compiled_call_impl", None) is not None for r in regions)
    assert torch._dynamo.config.recompile_limit >= len({repr(r) for r in regions})


def test_compile_is_an_option_of_both_configs():
    assert COMPILE_MODES == ("none", "default", "reduce-overhead", "max-autotune")
    assert search_config("pcdarts", "synthetic", compile="reduce-overhead").compile == "reduce-overhead"
    assert eval_config("synthetic", compile="max-autotune").compile == "max-autotune"
    with pytest.raises(ValueError, match="^compile must be one of none, default, reduce-overhead, max-autotune"):
        search_config("pcdarts", "synthetic", compile="fast")


def test_channels_last_search_gives_the_same_losses():
    """channels_last (NHWC) changes the memory layout only: same losses as the default layout on CPU."""
    from methods_testlib import tiny_config

    from pcdarts_core.search import Searcher

    runs = {}
    for cl in (False, True):
        searcher = Searcher(tiny_config("pcdarts", channels_last=cl, epochs=1, warmup_epochs=0))
        m = searcher.run_epoch()
        runs[cl] = [m["train_loss"], m["arch_loss"], m["val_loss"]]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
