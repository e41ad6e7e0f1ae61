"""Data-parallel search on Ray Train V2 with 2 CPU workers (gloo): fault tolerance, resume, Tune, bad input.

One local Ray instance (2 CPUs) for the module; 1 CPU and 1 torch thread per worker; the smoke preset's tiny net.
"""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.cli import run_cli
from orchestrator.distributed import DistributedOptions, check_resources, distributed_search_trial, run_distributed
from orchestrator.metrics import record_epoch
from orchestrator.presets import load_preset
from orchestrator.results import ResultStore
from orchestrator.search import main
from pcdarts_core.genotypes import parse_genotype

from faults import KillRank

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def smoke_values(**overrides) -> dict:
    preset = load_preset("smoke")
    return {**preset.search, "seed": 0, **overrides}


def _rows(root, kind: str) -> list[dict]:
    root = str(root)
    rows = ResultStore(root.rsplit("/", 1)[0], root.rsplit("/", 1)[1]).read(kind).to_pylist()
    return sorted(rows, key=lambda r: r.get("epoch") or 0)


def _tune_trial(values: dict, storage, distributed: dict):
    from ray import tune

    search = {k: v for k, v in values.items() if k != "seed"}  # the sweep's trial config format
    tuner = tune.Tuner(distributed_search_trial,
                       param_space={"search": search, "seed": values["seed"], "distributed": distributed},
                       run_config=tune.RunConfig(storage_path=str(storage), name="sweep"))
    (result,) = list(tuner.fit())
    assert result.error is None, result.error
    return result


def test_killed_worker_group_resumes_to_the_uninterrupted_result(ray_cluster, tmp_path, monkeypatch):
    """Uninterrupted: a Tune trial that is itself a 2-worker search (the sweep's way in). Interrupted: the CLI's
    path, with rank 1 killed in epoch 2. Same per-epoch arch parameters, same final genotype."""
    values = smoke_values(epochs=2)
    # The trial keeps Tune's default 1 CPU; its two workers take half a CPU each (2 CPUs in all).
    tuned = _tune_trial(values, tmp_path / "tune", {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 0})
    history = tuned.metrics_dataframe.to_dict("records")
    assert [r["epoch"] for r in history] == [1, 2]
    assert tuned.metrics["world_size"] == 2 and tuned.metrics["trial_id"] and tuned.metrics["search_done"]
    assert tuned.metrics["seed"] == 0 and tuned.metrics["epochs_total"] == 2
    assert not list((tmp_path / "tune").glob("**/epochs.parquet"))  # the sweep driver writes its store, not we

    marker = tmp_path / "killed.marker"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # Ray Train propagates it to its actors
    opts = DistributedOptions.from_mapping({"num_workers": 2, "max_failures": 2})
    killed = run_distributed(values, opts, str(tmp_path), "killed", echo=None,
                             callbacks=[KillRank(rank=1, epoch=2, marker=str(marker))])
    assert marker.exists(), "the fault injector did not fire"

    final = parse_genotype(tuned.metrics["final_genotype"]).to_json()
    assert killed.genotype.to_json() == final
    assert parse_genotype((tmp_path / "killed" / "genotype.json").read_text()).to_json() == final
    rows = _rows(killed.root, "epochs")
    assert [r["epoch"] for r in rows] == [1, 2]
    for row, reported in zip(rows, history):
        for key in ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce", "train_loss", "val_loss"):
            assert np.asarray(row[key]).tolist() == np.asarray(reported[key]).tolist(), (row["epoch"], key)
        assert row["world_size"] == 2 and row["ranks_identical"]
    # Epoch 2 ran in the restarted worker group, which started from the checkpoint of epoch 1.
    assert [r["resumed_from_epoch"] for r in rows] == [0, 1]
    (trial,) = _rows(killed.root, "trials")
    assert trial["status"] == "done" and trial["epochs_done"] == 2 and trial["trial_id"] == "killed"

    # The same command again: the run is finished, so it reports the stored result without training.
    again = run_distributed(values, opts, str(tmp_path), "killed", echo=None)
    assert again.resumed and again.genotype.to_json() == final and again.epochs_done == 2
    assert _rows(killed.root, "epochs") == rows


def test_cli_refuses_what_the_cluster_cannot_host(ray_cluster, tmp_path, capsys):
    base = ["distributed", "--preset", "smoke", "--storage", str(tmp_path), "--name", "x"]
    for extra, message in ((["--num-workers", "3"], "3 workers x 1 CPU need 3 CPUs but the cluster has 2"),
                           (["--num-workers", "2", "--gpu"], "no GPU at all")):
        with pytest.raises(SystemExit) as exc:
            run_cli(main, base + extra)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x").exists()  # nothing written for a run that cannot start


def test_cli_prints_one_line_per_epoch_from_rank_0(ray_cluster, tmp_path, capsys):
    """``search distributed`` on 2 workers: rank 0's epoch lines reach the terminal, each once, between the start
    and the end (the workers' own stdout reaches it only with --verbose)."""
    code = main(["distributed", "--preset", "smoke", "--storage", str(tmp_path), "--name", "echo",
                 "--num-workers", "2", "--cpus-per-worker", "1"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"], lines
    assert lines[0].startswith("starting echo: 2 worker(s)")
    assert lines.index(epochs[0]) > 0 and any(line.startswith("final genotype: ") for line in lines)
    assert lines[-2].startswith("finished echo: 2 epochs")


def test_record_epoch_under_ray(ray_cluster):
    metrics = {"epoch": 1, "epoch_time_s": 1.5, "step_time_s": 0.2, "throughput": 100.0, "arch_entropy": 2.0,
               "n_skip_normal": 3, "val_acc": float("nan")}
    assert record_epoch(metrics, run="test", trial="t0") is True


def test_check_resources_uses_the_clusters_capacity():
    opts = DistributedOptions.from_mapping({"num_workers": 8, "use_gpu": True})
    check_resources(opts, {"CPU": 8, "GPU": 8})
    with pytest.raises(ValueError, match="8 GPU workers but the cluster has 4"):
        check_resources(opts, {"CPU": 64, "GPU": 4})
    elastic = DistributedOptions.from_mapping({"num_workers": "2-8", "cpus_per_worker": 4})
    assert elastic.num_workers == (2, 8) and elastic.elastic
    check_resources(elastic, {"CPU": 8})  # the smallest group fits
    with pytest.raises(ValueError, match="need 8 CPUs"):
        check_resources(elastic, {"CPU": 6})
    with pytest.raises(ValueError, match="unknown distributed key 'num_worker'"):
        DistributedOptions.from_mapping({"num_worker": 2})
    scaling = elastic.scaling_config()
    assert scaling.num_workers == (2, 8) and scaling.elasticity_enabled
