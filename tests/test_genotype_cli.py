"""``python -m orchestrator.genotype`` as a user runs it: subprocesses, JSON on the last stdout line, exit 2 and a
single ``error:`` line on bad input. All commands run once per module, two at a time, to keep the suite fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from orchestrator import genotype as genotype_cli
from orchestrator.cli import run_cli
from pcdarts_core.genotypes import PUBLISHED, Genotype

ROOT = Path(__file__).resolve().parents[1]


def _alphas() -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-made alphas (14 edges x 8 ops in PRIMITIVES order) whose derivation is worked out below."""
    an, ar = torch.zeros(14, 8), torch.zeros(14, 8)
    an[0, 4], an[1, 5] = 5.0, 4.0                  # node 0: sep_conv_3x3 <- 0, sep_conv_5x5 <- 1
    an[2, 3], an[4, 6] = 3.0, 6.0                  # node 1: dil_conv_3x3 <- node 0 (6), skip_connect <- 0 (3)
    an[5, 0], an[7, 1], an[8, 2] = 50.0, 5.0, 4.0  # node 2: `none` on edge 5 never wins; max_pool <- 2, avg <- 3
    an[12, 7], an[13, 4] = 5.0, 5.0                # node 3: equal weights, lower input first: dil_conv_5x5 <- 3
    ar[:, 1] = 2.0                                 # reduce: max_pool everywhere, ties -> inputs 0 and 1
    return an, ar


EXPECTED_JSON = Genotype(
    normal=(("sep_conv_3x3", 0), ("sep_conv_5x5", 1), ("dil_conv_3x3", 2), ("skip_connect", 0),
            ("max_pool_3x3", 2), ("avg_pool_3x3", 3), ("dil_conv_5x5", 3), ("sep_conv_3x3", 4)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1)) * 4,
    reduce_concat=(2, 3, 4, 5))

# With betas (PC-DARTS edge normalization) favouring input 1 of node 1, whose alphas are flat (its best non-none
# op is then the first one, max_pool_3x3), node 1 keeps input 1 and, second, node 0's dil_conv_3x3.
EXPECTED_PT = Genotype(
    normal=EXPECTED_JSON.normal[:2] + (("max_pool_3x3", 1), ("dil_conv_3x3", 2)) + EXPECTED_JSON.normal[4:],
    normal_concat=(2, 3, 4, 5), reduce=EXPECTED_JSON.reduce, reduce_concat=(2, 3, 4, 5))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    d = tmp_path_factory.mktemp("genotype_cli")
    an, ar = _alphas()
    (d / "arch.json").write_text(json.dumps({"alphas_normal": an.tolist(), "alphas_reduce": ar.tolist()}))
    bn = torch.zeros(14)
    bn[2:5] = torch.tensor([0.0, 5.0, 1.0])
    torch.save({"model": {"stem.0.weight": torch.zeros(2, 3, 3, 3), "alphas_normal": an, "alphas_reduce": ar,
                          "betas_normal": bn, "betas_reduce": torch.zeros(14)}, "epoch": 3}, d / "search.pt")
    (d / "pc_darts_cifar.txt").write_text(f"PC_DARTS_CIFAR = {PUBLISHED['PC_DARTS_CIFAR']}\n")
    (d / "bad_genotype.txt").write_text("Genotype(normal=[('sep_conv_3x3', 0)], reduce=[('conv_9x9', 7)])")
    good = (d / "search.pt").read_bytes()
    (d / "corrupted.pt").write_bytes(good[: len(good) // 2])
    commands = {
        "info_cifar_file": ["info", str(d / "pc_darts_cifar.txt"), "--dataset", "cifar10", "--json"],
        "show": ["show", "PDARTS", "--json"],
        "derive_json": ["derive", str(d / "arch.json"), "--json"],
        "derive_pt": ["derive", str(d / "search.pt"), "--json"],
        "bad_genotype": ["show", str(d / "bad_genotype.txt")],
        "unknown_name": ["info", "NO_SUCH_GENOTYPE", "--dataset", "cifar10"],
        "corrupted_pt": ["derive", str(d / "corrupted.pt")],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestrator.genotype", *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(commands, pool.map(run, commands.values())))
    return results


def _last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_info_cifar_from_a_file_in_the_official_text_form(runs: dict) -> None:
    out = _last_json(runs["info_cifar_file"])
    assert out["params"] == 3_634_678 and round(out["params"] / 1e6, 1) == 3.6  # PC-DARTS Table 1
    assert (out["dataset"], out["channels"], out["layers"]) == ("cifar10", 36, 20)
    assert out["genotype"] == PUBLISHED["PC_DARTS_CIFAR"].to_dict()
    assert "parameters" in runs["info_cifar_file"].stdout  # the readable table comes first


def test_info_imagenet_published_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """In-process (one subprocess fewer: each pays ~2 s of torch import on a shared machine)."""
    torch.set_num_threads(1)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(genotype_cli.main, ["info", "PC_DARTS_IMAGENET", "--dataset", "imagenet", "--json"])
    assert exit_info.value.code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert round(out["params"] / 1e6, 1) == 5.3 and out["madds"] == 581_627_328  # paper: 5.3M, 597M
    assert (out["dataset"], out["channels"], out["layers"]) == ("imagenet", 48, 14)


def test_show_prints_both_cells_and_json(runs: dict) -> None:
    proc = runs["show"]
    assert "normal cell" in proc.stdout and "reduce cell" in proc.stdout
    assert "c_{k-2}" in proc.stdout and "node 1" in proc.stdout and "dil_conv_5x5" in proc.stdout
    assert _last_json(proc) == PUBLISHED["PDARTS"].to_dict()


def test_derive_from_json(runs: dict) -> None:
    assert _last_json(runs["derive_json"]) == EXPECTED_JSON.to_dict()


def test_derive_from_checkpoint_state_dict_with_betas(runs: dict) -> None:
    assert _last_json(runs["derive_pt"]) == EXPECTED_PT.to_dict()


@pytest.mark.parametrize("case", ["bad_genotype", "unknown_name", "corrupted_pt"])
def test_bad_input_is_one_error_line(runs: dict, case: str) -> None:
    proc = runs[case]
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr


# -- derive from the checkpoints this project writes ------------------------------------------------------------------
def _derive(target: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m orchestrator.genotype derive TARGET --json`` run in ``cwd``, as the README shows it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "orchestrator.genotype", "derive", target, "--json"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def project_checkpoints(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Genotype]]:
    """Checkpoints written by the project itself, each with the genotype its run reported: a ``search single``
    run (``checkpoint.pt``), a ``search distributed`` run on Ray Train (``checkpoint_*/search.pt``) and a sweep
    trial (``search_trainable`` under Tune: ``checkpoint_*/state.pt``)."""
    from ray import tune

    from orchestrator.presets import load_preset
    from orchestrator.trainable import search_trainable
    from pcdarts_core.genotypes import parse_genotype

    d = tmp_path_factory.mktemp("project_checkpoints")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ray_cluster}
    common = ["--preset", "smoke", "--set", "epochs=2", "--set", "k=2", "--storage", str(d)]
    for argv in (["single", *common, "--name", "one"],
                 ["distributed", *common, "--name", "dist", "--num-workers", "1"]):
        proc = subprocess.run([sys.executable, "-m", "orchestrator.search", *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    values = {**load_preset("smoke").search, "epochs": 2, "k": 2}
    tuner = tune.Tuner(search_trainable, param_space={"search": values, "seed": 0, "run": "derive-test"},
                       run_config=tune.RunConfig(name="search", storage_path=str(d / "sweep"), verbose=0))
    (result,) = list(tuner.fit())
    assert result.error is None, result.error
    train_ckpt = sorted((d / "dist").glob("checkpoint_*/search.pt"))[-1]  # Ray Train's newest checkpoint_* folder
    return {
        "single": (d / "one" / "checkpoint.pt", parse_genotype((d / "one" / "genotype.json").read_text())),
        "train": (train_ckpt, parse_genotype((d / "dist" / "genotype.json").read_text())),
        "trial": (Path(result.checkpoint.path) / "state.pt", parse_genotype(result.metrics["final_genotype"])),
    }


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["single", "train", "trial"])
def test_derive_reads_the_projects_checkpoints_and_their_folders(project_checkpoints: dict, kind: str) -> None:
    """The README's ``derive search.pt --json`` verbatim in the checkpoint's folder, then the folder itself and
    the run's (or trial's) folder above it: each derives the genotype the run reported (PC-DARTS's rule)."""
    from pcdarts_core.genotypes import parse_genotype

    path, expected = project_checkpoints[kind]
    targets = [(path.name, path.parent), (str(path.parent), ROOT)]
    if kind != "single":  # the folder holding the checkpoint_* folders: the newest checkpoint
        targets.append((str(path.parent.parent), ROOT))
    for target, cwd in targets:
        proc = _derive(target, cwd)
        assert proc.returncode == 0, (target, proc.stderr)
        assert parse_genotype(proc.stdout.strip().splitlines()[-1]) == expected, target


@pytest.mark.ray
@pytest.mark.slow
def test_derive_from_a_damaged_or_empty_checkpoint_names_the_file(project_checkpoints: dict, tmp_path: Path) -> None:
    from pcdarts_core.runtime import load_checkpoint

    path, _ = project_checkpoints["single"]
    truncated = tmp_path / "run" / "checkpoint.pt"
    truncated.parent.mkdir()
    truncated.write_bytes(path.read_bytes()[:1000])
    # An HPO trial saved between two seeds holds no running search (orchestrator.trainable.hpo_trainable's format).
    state = load_checkpoint(path)["searcher"]
    torch.save({"format": "pcdarts-hpo/1", "index": 1, "completed": [], "searcher": None, "seed_time": 0.0},
               tmp_path / "hpo.pt")
    torch.save({"format": "pcdarts-hpo/1", "index": 0, "completed": [], "searcher": state, "seed_time": 1.0},
               tmp_path / "hpo_running.pt")
    cases = {str(truncated.parent): f"checkpoint {truncated} is truncated, corrupted",
             str(tmp_path / "hpo.pt"): "holds no running search",
             str(tmp_path): "a directory without a checkpoint"}
    for target, message in cases.items():
        proc = _derive(target, ROOT)
        assert proc.returncode == 2, proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    running = _derive(str(tmp_path / "hpo_running.pt"), ROOT)
    assert running.returncode == 0, running.stderr


def test_derive_takes_pdarts_pruned_ops_from_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A P-DARTS search in its second stage has 5 ops per edge, different per edge: derive reads them from the
    method state saved with the search (in-process: one subprocess fewer)."""
    from pcdarts_core.config import search_config
    from pcdarts_core.genotypes import derive_genotype, parse_genotype
    from pcdarts_core.search import Searcher

    torch.set_num_threads(1)
    cfg = search_config("pdarts", "synthetic", epochs=3, options={"stage_epochs": [1, 1, 1]}, warmup_epochs=0,
                        batch_size=8, init_channels=4, layers=5, image_size=16, steps_per_epoch=1, eval_steps=1,
                        device="cpu", synthetic_samples=40)
    searcher = Searcher(cfg)
    searcher.run_epoch()
    searcher.run_epoch()
    net = searcher.net
    assert net.alphas_normal.shape[1] == 5  # pruned in stage 2
    torch.save(searcher.state_dict(), tmp_path / "pdarts.pt")
    with pytest.raises(SystemExit) as exc:
        run_cli(genotype_cli.main, ["derive", str(tmp_path / "pdarts.pt"), "--json"])
    assert exc.value.code == 0
    derived = parse_genotype(capsys.readouterr().out.strip().splitlines()[-1])
    with torch.no_grad():
        expected = derive_genotype(net.alphas_normal, net.alphas_reduce, net.betas_normal, net.betas_reduce,
                                   net.edge_primitives["normal"], net.edge_primitives["reduce"])
    assert derived == expected


@pytest.mark.parametrize("method, overrides", [
    ("rome", {"epochs": 2}),  # 7 ops: no `none`
    ("entrannas", {"epochs": 2, "options": {"dst": True}}),
    ("pdarts", {"epochs": 3, "warmup_epochs": 0, "options": {"stage_epochs": [1, 1, 1]}}),  # pruned per edge
])
def test_derive_of_a_methods_search_checkpoint_uses_its_own_op_lists(tmp_path: Path, method: str, overrides: dict,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny real ``search single`` of each method with its own op lists; ``derive`` of its ``checkpoint.pt``
    (the command a user runs) gives the cell of those ops' alphas, with the ops the method searched over."""
    from orchestrator.presets import load_preset
    from orchestrator.run import run_single
    from pcdarts_core.config import search_config
    from pcdarts_core.genotypes import derive_genotype, parse_genotype
    from pcdarts_core.methods import get_method
    from pcdarts_core.runtime import load_checkpoint

    torch.set_num_threads(1)
    values = {**load_preset("smoke").search, "seed": 0, "method": method, **overrides}
    run_single(values, str(tmp_path), "m", echo=None)
    with pytest.raises(SystemExit) as exc:
        run_cli(genotype_cli.main, ["derive", str(tmp_path / "m" / "checkpoint.pt"), "--json"])
    assert exc.value.code == 0, capsys.readouterr().err
    derived = parse_genotype(capsys.readouterr().out.strip().splitlines()[-1])

    state = load_checkpoint(tmp_path / "m" / "checkpoint.pt")["searcher"]
    model = state["model"]
    if method == "pdarts":  # the pruned ops the method itself recorded for its stage
        ops = {t: state["method"]["primitives"][t] for t in ("normal", "reduce")}
        assert model["alphas_normal"].shape[1] == len(ops["normal"][0]) < 8
    else:
        cfg = search_config(method, values["dataset"], **{k: v for k, v in values.items()
                                                          if k not in ("method", "dataset")})
        op_list = list(get_method(method).primitives(cfg))
        ops = {t: op_list for t in ("normal", "reduce")}
        assert model["alphas_normal"].shape[1] == len(op_list) == (7 if method == "rome" else 8)
    expected = derive_genotype(model["alphas_normal"], model["alphas_reduce"], model.get("betas_normal"),
                               model.get("betas_reduce"), ops["normal"], ops["reduce"])
    assert derived == expected
    searched = {op for t in ("normal", "reduce") for edge in ops[t]
                for op in ([edge] if isinstance(edge, str) else edge)}
    assert {op for op, _ in derived.normal + derived.reduce} <= searched
