"""The Parquet result store: upserts, schema evolution, atomic writes, and files other readers can open."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import results
from orchestrator.results import (DEFAULT_KEYS, SCHEMAS, ResultStore, config_columns, group_key, parse_source,
                                  source_consensus, source_trial, to_table, trial_row)


def _trial(tid: str, seed: int, val: float, status: str = "done", **extra) -> dict:
    return {"trial_id": tid, "group": "method=pcdarts,k=4", "seed": seed, "status": status, "val_acc": val, **extra}


def _files(store: ResultStore) -> list[str]:
    return sorted(os.listdir(store.root))


def test_upsert_twice_with_overlapping_keys_keeps_latest_and_no_duplicates(tmp_path):
    store = ResultStore(str(tmp_path), "exp")
    store.upsert("trials", [_trial("a", 0, 90.0, "running"), _trial("b", 1, 91.0)])
    store.upsert("trials", [_trial("b", 1, 93.5), _trial("c", 2, 92.0), _trial("a", 0, 94.0, "done")])
    table = store.read("trials")
    rows = {r["trial_id"]: r for r in table.to_pylist()}
    assert table.num_rows == 3 and sorted(rows) == ["a", "b", "c"]
    assert rows["a"]["val_acc"] == 94.0 and rows["a"]["status"] == "done"
    assert rows["b"]["val_acc"] == 93.5
    assert rows["c"]["seed"] == 2
    assert table.schema.field("seed").type == pa.int64()


def test_upsert_duplicate_keys_in_one_batch_last_wins(tmp_path):
    store = ResultStore(str(tmp_path), "exp")
    store.upsert("trials", [_trial("a", 0, 90.0), _trial("a", 0, 91.0), _trial("b", 1, 80.0)])
    rows = store.read("trials").to_pylist()
    assert [(r["trial_id"], r["val_acc"]) for r in rows] == [("a", 91.0), ("b", 80.0)]


def test_epochs_upsert_with_composite_key_and_nested_lists(tmp_path):
    store = ResultStore(str(tmp_path), "exp")
    alphas = [[0.1] * 8 for _ in range(14)]

    def row(tid: str, epoch: int, acc: float) -> dict:
        return {"trial_id": tid, "group": "g", "seed": 0, "epoch": epoch, "val_acc": acc, "alphas_normal": alphas,
                "betas_normal": [0.5] * 14}

    store.upsert("epochs", [row("a", 0, 10.0), row("a", 1, 20.0), row("b", 0, 15.0)])
    store.upsert("epochs", [row("a", 1, 25.0), row("a", 2, 30.0)])
    table = store.read("epochs")
    got = sorted((r["trial_id"], r["epoch"], r["val_acc"]) for r in table.to_pylist())
    assert got == [("a", 0, 10.0), ("a", 1, 25.0), ("a", 2, 30.0), ("b", 0, 15.0)]
    assert table.schema.field("alphas_normal").type == pa.list_(pa.list_(pa.float64()))
    assert table.column("alphas_normal")[0].as_py() == alphas
    assert DEFAULT_KEYS["epochs"] == ("trial_id", "epoch")


def test_schema_evolution_new_columns_null_for_old_rows(tmp_path):
    store = ResultStore(str(tmp_path), "exp")
    store.upsert("trials", [_trial("a", 0, 90.0, hessian_eig=None)])
    store.upsert("trials", [_trial("b", 1, 91.0, hessian_eig=0.25, cfg_lr=0.1)])
    store.upsert("trials", [_trial("c", 2, 92.0)])  # lacks the new columns: nulls, columns kept
    table = store.read("trials")
    rows = {r["trial_id"]: r for r in table.to_pylist()}
    assert rows["a"]["hessian_eig"] is None and rows["a"]["cfg_lr"] is None
    assert rows["b"]["hessian_eig"] == 0.25 and rows["b"]["cfg_lr"] == 0.1
    assert rows["c"]["hessian_eig"] is None
    assert table.schema.field("hessian_eig").type == pa.float64()
    # Known columns come first, in schema order, extras after.
    assert table.column_names[: len(SCHEMAS["trials"])] == SCHEMAS["trials"].names


def test_int_column_widens_to_float_on_evolution(tmp_path):
    store = ResultStore(str(tmp_path), "exp")
    store.upsert("trials", [_trial("a", 0, 90.0, cfg_lr=1)])
    store.upsert("trials", [_trial("b", 0, 90.0, cfg_lr=0.5)])
    assert sorted(store.read("trials").column("cfg_lr").to_pylist()) == [0.5, 1.0]


def _fragments(store: ResultStore, kind: str) -> list[str]:
    return sorted(os.listdir(store.path(kind)))


def _bytes(store: ResultStore, kind: str) -> dict[str, bytes]:
    return {name: open(os.path.join(store.path(kind), name), "rb").read() for name in _fragments(store, kind)}


def test_writes_leave_no_temporary_files(tmp_path):
    store = ResultStore(str(tmp_path), "exp")
    store.write_table("trials", [_trial("a", 0, 90.0)])
    store.upsert("trials", [_trial("b", 1, 91.0)])
    store.upsert("evaluations", [{"eval_id": "e1", "source": "trial:a", "test_acc": 97.0, "status": "done"}])
    assert _files(store) == ["evaluations.parquet", "trials.parquet"]
    assert len(_fragments(store, "trials")) == 2 and all(f.endswith(".parquet") for f in _fragments(store, "trials"))


def test_writes_append_and_never_rewrite_a_fragment(tmp_path):
    store = ResultStore(str(tmp_path), "exp")
    store.upsert("trials", [_trial("a", 0, 90.0)])
    first = _bytes(store, "trials")
    store.upsert("trials", [_trial("a", 0, 95.0)])
    after = _bytes(store, "trials")
    assert len(after) == 2 and all(after[name] == data for name, data in first.items())
    assert store.read("trials").column("val_acc").to_pylist() == [95.0]


def test_compaction_keeps_the_latest_rows_in_one_file(tmp_path):
    store = ResultStore(str(tmp_path), "exp")
    for i in range(5):
        store.upsert("epochs", [{"trial_id": "a", "epoch": i % 3, "val_acc": float(i), "group": "g", "seed": 0}])
    before = store.read("epochs").to_pylist()
    assert store.compact("epochs") == 3
    assert len(_fragments(store, "epochs")) == 1
    assert store.read("epochs").to_pylist() == before
    assert sorted((r["epoch"], r["val_acc"]) for r in before) == [(0, 3.0), (1, 4.0), (2, 2.0)]
    store.upsert("epochs", [{"trial_id": "a", "epoch": 0, "val_acc": 9.0, "group": "g", "seed": 0}])
    assert {r["epoch"]: r["val_acc"] for r in store.read("epochs").to_pylist()}[0] == 9.0  # newer than compacted


def _write_many(root: str, tag: str, n: int) -> None:
    store = ResultStore(root, "exp")
    for i in range(n):
        store.upsert("epochs", [{"trial_id": tag, "epoch": i, "val_acc": 0.5, "group": "g", "seed": 0}])


def test_two_processes_writing_one_experiment_lose_nothing(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), tag, 25)) for tag in ("p1", "p2")]
    for p in procs:
        p.start()
    ResultStore(str(tmp_path), "exp").compact("epochs")  # a compaction racing the writers loses nothing either
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = ResultStore(str(tmp_path), "exp").read("epochs").to_pylist()
    assert sorted((r["trial_id"], r["epoch"]) for r in rows) == [(t, i) for t in ("p1", "p2") for i in range(25)]


def test_unserializable_row_leaves_old_files_intact(tmp_path):
    store = ResultStore(str(tmp_path), "exp")
    store.upsert("trials", [_trial("a", 0, 90.0)])
    before = _bytes(store, "trials")
    with pytest.raises(ValueError, match="cannot be stored"):
        store.upsert("trials", [_trial("b", 1, 91.0, extra=object())])
    with pytest.raises(ValueError, match="val_acc"):
        store.write_table("trials", [_trial("b", 1, "not a number")])  # type: ignore[arg-type]
    assert _bytes(store, "trials") == before


def test_failure_in_the_middle_of_writing_leaves_old_files_intact(tmp_path, monkeypatch):
    store = ResultStore(str(tmp_path), "exp")
    store.upsert("trials", [_trial("a", 0, 90.0)])
    before = _bytes(store, "trials")

    def broken_write(table, sink, **kwargs):
        sink.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(results.pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        store.upsert("trials", [_trial("b", 1, 91.0)])
    monkeypatch.undo()
    assert _bytes(store, "trials") == before
    assert store.read("trials").column("trial_id").to_pylist() == ["a"]


def test_read_absent_kind_is_empty_with_known_columns(tmp_path):
    store = ResultStore(str(tmp_path / "nothing-yet"), "exp")
    table = store.read("evaluations")
    assert table.num_rows == 0
    assert table.schema == SCHEMAS["evaluations"]
    assert not store.exists("evaluations")


def test_paths_and_kinds(tmp_path):
    store = ResultStore(str(tmp_path), "exp")
    for kind in ("trials", "epochs", "stability", "evaluations"):
        assert store.path(kind) == f"{tmp_path}/exp/{kind}.parquet"
    with pytest.raises(ValueError, match="unknown result kind"):
        store.path("trial")
    with pytest.raises(ValueError, match="name"):
        ResultStore(str(tmp_path), "a/b")


def test_file_uri_storage(tmp_path):
    store = ResultStore(f"file://{tmp_path}", "exp")
    store.upsert("trials", [_trial("a", 0, 90.0)])
    assert os.path.isdir(tmp_path / "exp" / "trials.parquet")
    assert store.uri("trials") == str(tmp_path / "exp" / "trials.parquet")


def test_readable_by_pandas_and_plain_pyarrow(tmp_path):
    pd = pytest.importorskip("pandas")
    store = ResultStore(str(tmp_path), "exp")
    store.upsert("trials", [_trial("a", 0, 90.0, genotype='{"x": 1}'), _trial("b", 1, 91.5, error="boom",
                                                                               status="failed")])
    store.upsert("epochs", [{"trial_id": "a", "epoch": 0, "alphas_normal": [[1.0, 2.0]], "group": "g", "seed": 0}])
    frame = pd.read_parquet(store.uri("trials"))
    assert list(frame["trial_id"]) == ["a", "b"]
    assert list(frame["val_acc"]) == [90.0, 91.5]
    assert frame.loc[1, "error"] == "boom" and frame.loc[1, "status"] == "failed"
    epochs = pd.read_parquet(store.uri("epochs"))
    assert [list(x) for x in epochs.loc[0, "alphas_normal"]] == [[1.0, 2.0]]
    assert pq.read_table(store.path("trials")).num_rows == 2


def test_status_is_validated(tmp_path):
    store = ResultStore(str(tmp_path), "exp")
    with pytest.raises(ValueError, match="status 'finished'"):
        store.upsert("trials", [_trial("a", 0, 90.0, status="finished")])
    assert not store.exists("trials")


def test_upsert_rejects_null_keys(tmp_path):
    store = ResultStore(str(tmp_path), "exp")
    with pytest.raises(ValueError, match="null"):
        store.upsert("trials", [{"trial_id": None, "status": "done"}])


def test_write_table_accepts_an_arrow_table_and_casts_known_columns(tmp_path):
    store = ResultStore(str(tmp_path), "exp")
    table = pa.table({"eval_id": ["e1"], "source": ["random:0"], "seed": pa.array([3], pa.int32()),
                      "test_acc": [97.0], "status": ["done"]})
    store.write_table("evaluations", table)
    back = store.read("evaluations")
    assert back.schema.field("seed").type == pa.int64()
    assert back.column("seed").to_pylist() == [3]


def test_group_key_is_deterministic_and_drops_the_seed():
    a = group_key({"seed": 1, "k": 4, "method": "pcdarts", "edge_norm": True, "lr": 0.1})
    b = group_key({"lr": 0.1, "edge_norm": True, "method": "pcdarts", "k": 4, "seed": 7})
    assert a == b == "method=pcdarts,edge_norm=True,k=4,lr=0.1"
    assert group_key({"method": "darts", "seed": 0, "data": "a,b"}, exclude=("seed",)) == 'method=darts,data="a,b"'
    assert group_key({"k": 4, "seed": 1}, exclude=()) == "k=4,seed=1"
    assert group_key({"opt": {"lr": 0.1, "b": [1, 2]}}) == 'opt={"b":[1,2],"lr":0.1}'


def test_trial_row_and_config_columns():
    config = {"method": "pcdarts", "k": 4, "seed": 3, "opt": {"lr": 0.1}, "stages": [5, 11]}
    row = trial_row("t1", config, "done", val_acc=90.0)
    assert row["group"] == group_key(config) and row["seed"] == 3 and row["method"] == "pcdarts"
    assert row["cfg_k"] == 4 and row["cfg_opt__lr"] == 0.1 and row["cfg_stages"] == "[5, 11]"
    assert row["val_acc"] == 90.0
    assert config_columns({"a": None}) == {"cfg_a": None}
    table = to_table("trials", [row])
    assert table.column("cfg_opt__lr").to_pylist() == [0.1]


def test_sources_round_trip():
    assert parse_source(source_trial("abc")) == ("trial", "abc")
    assert parse_source(source_consensus("method=x,a=1:2")) == ("consensus", "method=x,a=1:2")
    with pytest.raises(ValueError):
        parse_source("somewhere")
