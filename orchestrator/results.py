"""The experiment's Parquet store: one folder of Parquet fragment files per kind of record under ``<storage>/<name>/``.

``storage`` is a local directory or any URI :mod:`pyarrow.fs` understands (``s3://bucket/prefix``, ``gs://...``,
``file:///...``). The files carry no custom metadata, so pandas, DuckDB and Ray Data read them as they are
(a folder is one dataset; after :meth:`ResultStore.compact` it holds one file).

Kinds and their folders: ``trials.parquet/`` (one row per search trial), ``epochs.parquet/`` (one row per trial
and epoch), ``evaluations.parquet/`` (one row per retraining of a genotype), ``stability.parquet/`` (one row per
configuration group, as written by :func:`orchestrator.stability.stability_table`).

Known columns have fixed types (:data:`SCHEMAS`) and are always present, in schema order; any other column is
accepted with an inferred type and placed after them (schema evolution: rows written before a column existed
read back as null there). Configuration values go into ``cfg_<key>`` columns (nested mappings flattened with
``__``, lists and dicts that are leaves stored as JSON text), so they can never collide with metric columns.

Writes are append-only and atomic (see :class:`ResultStore`); the row builders (:func:`epoch_row`,
:func:`search_row`, :func:`eval_row`) are the one place a reported result becomes a row.

This module does not import Ray, so Ray Data workers and notebooks can use it cheaply.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pcdarts_core.spaces import TRIAL_METRIC_PREFIXES

KINDS: dict[str, str] = {
    "trials": "trials.parquet",
    "epochs": "epochs.parquet",
    "stability": "stability.parquet",
    "evaluations": "evaluations.parquet",
}

#: The key :meth:`ResultStore.upsert` uses when none is given: the identity of a row of each kind.
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "trials": ("trial_id",),
    "epochs": ("trial_id", "epoch"),
    "stability": ("group",),
    "evaluations": ("eval_id",),
}

#: Values of the ``status`` column of trials and evaluations.
STATUSES = ("done", "running", "failed")

_F = pa.float64()
_I = pa.int64()
_S = pa.string()
_MATRIX = pa.list_(pa.list_(_F))
_VECTOR = pa.list_(_F)

TRIALS_SCHEMA = pa.schema([
    ("trial_id", _S), ("group", _S), ("seed", _I), ("status", _S), ("method", _S),
    ("val_acc", _F), ("train_acc", _F), ("val_loss", _F), ("train_loss", _F),
    ("genotype", _S), ("error", _S), ("wall_time_s", _F), ("epochs_done", _I),
])

EPOCHS_SCHEMA = pa.schema([
    ("trial_id", _S), ("group", _S), ("seed", _I), ("epoch", _I),
    ("train_acc", _F), ("train_loss", _F), ("val_acc", _F), ("val_loss", _F), ("lr", _F),
    ("alphas_normal", _MATRIX), ("alphas_reduce", _MATRIX), ("betas_normal", _VECTOR), ("betas_reduce", _VECTOR),
    ("genotype", _S), ("arch_entropy", _F), ("n_skip_normal", _I), ("wall_time_s", _F),
])

EVALUATIONS_SCHEMA = pa.schema([
    ("eval_id", _S), ("source", _S), ("genotype", _S), ("seed", _I), ("status", _S),
    ("test_acc", _F), ("params", _I), ("epochs_done", _I), ("error", _S), ("wall_time_s", _F),
])

STABILITY_SCHEMA = pa.schema([
    ("group", _S), ("n_seeds", _I), ("n_failed", _I), ("n_running", _I),
    ("val_acc_mean", _F), ("val_acc_std", _F), ("val_acc_ci_low", _F), ("val_acc_ci_high", _F),
    ("val_acc_best", _F), ("best_minus_mean", _F),
    ("n_evaluated", _I), ("eval_acc_mean", _F), ("eval_acc_std", _F), ("eval_acc_ci_low", _F),
    ("eval_acc_ci_high", _F), ("eval_acc_best", _F), ("eval_best_minus_mean", _F),
    ("consensus_eval_acc_mean", _F), ("n_consensus_evals", _I),
    ("n_genotypes", _I), ("genotype_distance_mean", _F), ("n_distinct_genotypes", _I),
    ("consensus_genotype", _S), ("consensus_distance_mean", _F),
    ("skip_normal_mean", _F), ("collapse_threshold", _I), ("collapse_rate", _F), ("stop_changing_epoch_mean", _F),
    ("edge_frequencies", _S), ("edge_op_frequencies", _S), ("op_frequencies", _S),
])

SCHEMAS: dict[str, pa.Schema] = {
    "trials": TRIALS_SCHEMA,
    "epochs": EPOCHS_SCHEMA,
    "stability": STABILITY_SCHEMA,
    "evaluations": EVALUATIONS_SCHEMA,
}

_OBJECT_STORES = {"s3", "gcs"}
_STATUS_KINDS = {"trials", "evaluations"}


# -- configuration text ----------------------------------------------------------------------------------------
def _scalar_text(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        # Quote only what would make the text ambiguous; plain names stay readable.
        if value and not any(c in value for c in ',="{}[] \t\n'):
            return value
        return json.dumps(value)
    if isinstance(value, Mapping):
        return json.dumps({str(k): value[k] for k in sorted(value, key=str)}, sort_keys=True, default=str,
                          separators=(",", ":"))
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), sort_keys=True, default=str, separators=(",", ":"))
    if hasattr(value, "item"):  # numpy scalars
        return _scalar_text(value.item())
    return json.dumps(str(value))


def group_key(config: Mapping[str, Any], exclude: Iterable[str] = ("seed",)) -> str:
    """A deterministic text of ``config`` without ``exclude``: the identity of a group of seeded searches.

    ``method`` comes first when present, the other keys sorted, as ``key=value`` joined by commas, e.g.
    ``method=pcdarts,edge_norm=True,k=4``. Equal configs give equal text whatever their key order.
    """
    skip = set(exclude)
    keys = sorted((str(k) for k in config if str(k) not in skip), key=lambda k: (k != "method", k))
    lookup = {str(k): v for k, v in config.items()}
    return ",".join(f"{k}={_scalar_text(lookup[k])}" for k in keys)


def config_columns(config: Mapping[str, Any], prefix: str = "cfg_") -> dict[str, Any]:
    """Flat ``cfg_<key>`` columns of a config: nested mappings joined with ``__``, list leaves as JSON text."""
    out: dict[str, Any] = {}

    def walk(mapping: Mapping[str, Any], stem: str) -> None:
        for key, value in mapping.items():
            name = f"{stem}{key}"
            if isinstance(value, Mapping):
                walk(value, f"{name}__")
            elif isinstance(value, (list, tuple)):
                out[name] = json.dumps(list(value), default=str)
            elif hasattr(value, "item") and not isinstance(value, (str, bytes)):
                out[name] = value.item()
            else:
                out[name] = value

    walk(config, prefix)
    return out


def trial_row(trial_id: str, config: Mapping[str, Any], status: str, **fields: Any) -> dict[str, Any]:
    """A ``trials`` row: id, group, seed and ``cfg_*`` columns from ``config``, then ``fields`` (metrics etc.)."""
    row: dict[str, Any] = {"trial_id": str(trial_id), "group": group_key(config), "seed": config.get("seed"),
                           "status": status}
    if "method" in config:
        row["method"] = str(config["method"])
    row.update(fields)
    row.update(config_columns(config))
    return row


#: result keys Tune adds itself; never copied into the Parquet files
TUNE_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
             "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
             "iterations_since_restore", "experiment_tag", "should_checkpoint"}
EPOCH_COLUMNS = ("epoch", "train_acc", "train_loss", "val_acc", "val_loss", "lr", "alphas_normal", "alphas_reduce",
                 "betas_normal", "betas_reduce", "genotype", "arch_entropy", "n_skip_normal")
#: result keys of the loops that are not per-epoch columns of their own
NOT_EPOCH_EXTRAS = {"search_done", "final_genotype", "epochs_total", "seed", "seed_done", "seed_index",
                    "seeds_done", "eval_id", "source", "hpo_epochs_done", "wall_time_s", "seed_wall_time_s"}


def epoch_row(trial_id: str, group: str, seed: Any, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """An ``epochs`` row from one reported search epoch: the known columns, then any other numeric metric."""
    row: dict[str, Any] = {"trial_id": trial_id, "group": group, "seed": seed}
    for key in EPOCH_COLUMNS:
        row[key] = _num(metrics.get(key))
    row["wall_time_s"] = finite_or_none(metrics.get("wall_time_s", metrics.get("time_total_s")))
    for key, value in metrics.items():
        if key not in row and key not in TUNE_KEYS and key not in NOT_EPOCH_EXTRAS and \
                isinstance(value, (bool, int, float)):
            row[key] = _num(value)
    return row


def _num(value: Any) -> Any:
    """``value``, with a non-finite float as None."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def search_row(trial_id: str, values: Mapping[str, Any], status: str, metrics: Mapping[str, Any] | None = None,
               *, group: str | None = None, error: str | None = None, **fields: Any) -> dict[str, Any]:
    """A ``trials`` row of one search (a single run, a sweep trial, one seed of an HPO configuration): its
    settings (``values`` with the seed), its last reported metrics, and ``fields`` (num_failures, hpo_trial...)."""
    m = metrics or {}
    row = trial_row(trial_id, values, status, val_acc=finite_or_none(m.get("val_acc")),
                    train_acc=finite_or_none(m.get("train_acc")), val_loss=finite_or_none(m.get("val_loss")),
                    train_loss=finite_or_none(m.get("train_loss")),
                    genotype=m.get("final_genotype") or m.get("genotype"), error=error,
                    wall_time_s=finite_or_none(m.get("wall_time_s", m.get("time_total_s"))),
                    epochs_done=m.get("epoch"), arch_entropy=finite_or_none(m.get("arch_entropy")),
                    n_skip_normal=m.get("n_skip_normal"),
                    # what the search space adds (NAS-Bench-201 accuracies, parameter-free shares)
                    **{k: finite_or_none(v) for k, v in m.items() if k.startswith(TRIAL_METRIC_PREFIXES)}, **fields)
    if group is not None:
        row["group"] = group
    return row


def eval_row(spec: Mapping[str, Any], eval_cfg: Mapping[str, Any], result: Mapping[str, Any] | None, status: str,
             error: str | None = None, tune_id: str | None = None) -> dict[str, Any]:
    """An ``evaluations`` row: one genotype trained from scratch with one seed under one protocol."""
    result = result or {}
    row = {"eval_id": spec["eval_id"], "source": spec["source"], "genotype": spec["genotype"],
           "seed": int(spec["seed"]), "status": status, "test_acc": finite_or_none(result.get("test_acc")),
           "params": result.get("params"), "epochs_done": result.get("epoch"), "error": error,
           "wall_time_s": finite_or_none(result.get("time_total_s")), "group": spec.get("group"),
           "train_acc": finite_or_none(result.get("train_acc")), "test_loss": finite_or_none(result.get("test_loss")),
           "protocol": spec.get("protocol"), "tune_trial_id": tune_id}
    row.update(config_columns({k: v for k, v in eval_cfg.items() if k != "seed"}))
    return row


# -- evaluation sources ----------------------------------------------------------------------------------------
def source_trial(trial_id: str) -> str:
    """``source`` of an evaluation of the genotype a search trial found."""
    return f"trial:{trial_id}"


def source_consensus(group: str) -> str:
    """``source`` of an evaluation of a group's consensus genotype."""
    return f"consensus:{group}"


def source_random(index: int) -> str:
    """``source`` of an evaluation of the ``index``-th random DARTS-space cell (the baseline)."""
    return f"random:{int(index)}"


def source_published(name: str) -> str:
    """``source`` of an evaluation of a published genotype (a name of ``pcdarts_core.genotypes.PUBLISHED``)."""
    return f"published:{name}"


def parse_source(source: str) -> tuple[str, str]:
    """Split an evaluation ``source`` into (kind, value) at the first colon; groups may contain colons."""
    kind, sep, value = str(source).partition(":")
    if not sep or kind not in {"trial", "consensus", "random", "published"}:
        raise ValueError(f"evaluation source {source!r} is not trial:<id>, consensus:<group>, random:<i> or "
                         "published:<NAME>")
    return kind, value


# -- tables ----------------------------------------------------------------------------------------------------
def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown result kind {kind!r}; known kinds: {', '.join(KINDS)}")


def _normalize(value: Any) -> Any:
    """Genotypes become their JSON, numpy/torch arrays and scalars plain Python values; the rest as is."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return to_json()
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    return value


def empty_table(kind: str) -> pa.Table:
    """A table with the known columns of ``kind`` and no rows."""
    _check_kind(kind)
    return SCHEMAS[kind].empty_table()


def to_table(kind: str, rows_or_table: pa.Table | Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows (mappings) or a table as a table of ``kind``: known columns typed and first, extra ones inferred.

    Raises ``ValueError`` (one line) when a value cannot be stored, e.g. an arbitrary object or a string in a
    float column, or a ``status`` outside ``done|running|failed``.
    """
    _check_kind(kind)
    schema = SCHEMAS[kind]
    if isinstance(rows_or_table, pa.Table):
        columns = {name: rows_or_table.column(name) for name in rows_or_table.column_names}
        n_rows = rows_or_table.num_rows
    else:
        rows = list(rows_or_table)
        n_rows = len(rows)
        names: dict[str, None] = {}
        for row in rows:
            if not isinstance(row, Mapping):
                raise ValueError(f"{kind} rows must be mappings, got {type(row).__name__}")
            names.update(dict.fromkeys(str(k) for k in row))
        columns = {name: [_normalize(row.get(name)) for row in rows] for name in names}
    arrays: list[pa.Array | pa.ChunkedArray] = []
    fields: list[pa.Field] = []
    for name in list(schema.names) + [n for n in columns if n not in schema.names]:
        known = schema.field(name).type if name in schema.names else None
        values = columns.get(name)
        try:
            if values is None:
                array = pa.nulls(n_rows, type=known)
            elif isinstance(values, (pa.Array, pa.ChunkedArray)):
                array = values if known is None or values.type == known else values.cast(known)
            else:
                array = pa.array(values, type=known)
                if pa.types.is_floating(array.type) and array.null_count < len(array):
                    # NaN metrics (a diverged search) are stored as nulls, which every reader treats as missing.
                    array = pc.if_else(pc.is_nan(array), pa.scalar(None, array.type), array)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{kind} column {name!r} cannot be stored: {detail}") from None
        arrays.append(array)
        fields.append(pa.field(name, array.type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    if kind in _STATUS_KINDS and n_rows:
        bad = pc.unique(pc.filter(table["status"], pc.invert(pc.is_in(table["status"],
                                                                      value_set=pa.array(STATUSES)))))
        bad_values = [v for v in bad.to_pylist() if v is not None]
        if bad_values:
            raise ValueError(f"{kind} status {bad_values[0]!r} is not one of {', '.join(STATUSES)}")
    return table


def _unify_schemas(schemas: Sequence[pa.Schema]) -> pa.Schema:
    try:
        return pa.unify_schemas(list(schemas), promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"stored fragments do not fit together: {str(err).splitlines()[0]}") from None


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with every column of ``schema``, in its order and types (missing columns null)."""
    arrays = []
    for field in schema:
        if field.name in table.column_names:
            column = table.column(field.name)
            arrays.append(column if column.type == field.type else column.cast(field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _sorted(rows: pa.ChunkedArray) -> pa.Array:
    """Row numbers in ascending order, so merged tables keep their original row order."""
    array = rows.combine_chunks()
    return array.take(pc.array_sort_indices(array))


# -- the store -------------------------------------------------------------------------------------------------
def dedupe_latest(table: pa.Table, key: Sequence[str]) -> pa.Table:
    """``table`` with one row per ``key``: the last one, in the order the rows came (latest fragment last)."""
    key = list(key)
    for name in key:
        if name not in table.column_names:
            raise ValueError(f"key column {name!r} is missing from the rows")
    if not table.num_rows:
        return table
    index = pa.array(range(table.num_rows), type=_I)
    last = table.select(key).append_column("__row", index).group_by(key, use_threads=False).aggregate(
        [("__row", "max")])
    return table.take(_sorted(last["__row_max"]))


class ResultStore:
    """The Parquet records of one experiment: ``<storage>/<name>/<kind>.parquet/`` folders of fragment files.

    Writing is append-only: every :meth:`upsert` writes one new fragment file and never touches an existing one,
    so a flush costs what it writes (not the size of the experiment), two processes writing into one experiment
    lose nothing, and on object stores each flush is one PUT of new rows. Fragment names start with the write
    time, so reading the folder as one ``pyarrow.dataset`` in name order and keeping the last row per key
    (:data:`DEFAULT_KEYS`) gives the latest state. :meth:`compact` replaces the fragments by one (explicitly, at
    the end of a sweep): the new file first (atomic: temp + rename, or one PUT), then the old ones are deleted; a
    reader in between sees the same rows twice and keeps one.
    """

    def __init__(self, storage: str, name: str) -> None:
        storage = os.fspath(storage)
        if not name or "/" in name or name in {".", ".."}:
            raise ValueError(f"experiment name {name!r} must be a non-empty single path component")
        if "://" in storage:
            try:
                self.fs, base = pafs.FileSystem.from_uri(storage)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
                raise ValueError(f"storage {storage!r} is not a URI pyarrow understands: {err}") from None
            self._uri_prefix = storage.split("://", 1)[0] + "://"
        else:
            self.fs, base = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(storage))
            self._uri_prefix = ""
        self.storage = storage
        self.name = name
        self.root = f"{base.rstrip('/')}/{name}"
        self._atomic_put = self.fs.type_name in _OBJECT_STORES

    def __repr__(self) -> str:
        return f"ResultStore({self.storage!r}, {self.name!r})"

    def path(self, kind: str) -> str:
        """The folder of ``kind`` on :attr:`fs` (a local path, or ``bucket/prefix/...`` on object stores)."""
        _check_kind(kind)
        return f"{self.root}/{KINDS[kind]}"

    def uri(self, kind: str) -> str:
        """The folder of ``kind`` as pandas, DuckDB or Ray Data want it (``s3://...`` on S3, a path locally)."""
        path = self.path(kind)
        if self._uri_prefix == "file://":
            return path
        return f"{self._uri_prefix}{path}"

    def fragments(self, kind: str) -> list[str]:
        """The fragment files of ``kind``, oldest first (hidden temporary files excluded)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(kind), allow_not_found=True))
        names = [i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                 and not i.base_name.startswith(".")]
        return sorted(names, key=lambda p: p.rsplit("/", 1)[-1])

    def exists(self, kind: str) -> bool:
        return bool(self.fragments(kind))

    def read(self, kind: str, files: Sequence[str] | None = None) -> pa.Table:
        """The latest row per key of ``kind``, with all known columns; an empty table when nothing was written."""
        files = self.fragments(kind) if files is None else list(files)
        if not files:
            return empty_table(kind)
        dataset = ds.dataset(files, filesystem=self.fs, format="parquet")
        schemas = [f.physical_schema for f in dataset.get_fragments()] + [SCHEMAS[kind]]
        schema = _unify_schemas(schemas)
        table = ds.dataset(files, filesystem=self.fs, format="parquet", schema=schema).to_table()
        return _conform(dedupe_latest(table, DEFAULT_KEYS[kind]), schema)

    def upsert(self, kind: str, rows: pa.Table | Sequence[Mapping[str, Any]],
               key: Sequence[str] | None = None) -> pa.Table:
        """Record ``rows`` as one new fragment; on reading they replace earlier rows with the same key
        (:data:`DEFAULT_KEYS`), so a restarted trial re-reporting an epoch never duplicates it."""
        new = to_table(kind, rows)
        for name in DEFAULT_KEYS[kind] if key is None else key:
            if name not in new.column_names:
                raise ValueError(f"upsert key column {name!r} is missing from the new rows")
            if new.num_rows and new.column(name).null_count:
                raise ValueError(f"upsert key column {name!r} has null values in the new rows")
        if new.num_rows:
            self._write_fragment(kind, new)
        return new

    def write_table(self, kind: str, rows_or_table: pa.Table | Sequence[Mapping[str, Any]]) -> pa.Table:
        """Replace everything of ``kind`` by these rows (a derived table such as ``stability``)."""
        table = to_table(kind, rows_or_table)
        old = self.fragments(kind)
        self._write_fragment(kind, table)
        self._delete(old)
        return table

    def compact(self, kind: str) -> int:
        """Replace the fragments of ``kind`` by one holding the latest row per key; returns the rows kept.

        The compacted file sorts right after the newest fragment it replaces (and before any written since), so
        rows written concurrently keep their place; the replaced fragments are deleted after it is in place."""
        files = self.fragments(kind)
        if len(files) < 2:
            return self.read(kind, files).num_rows if files else 0
        table = self.read(kind, files)
        last = files[-1].rsplit("/", 1)[-1][:-len(".parquet")]
        self._put(f"{self.path(kind)}/{last}~c.parquet", table)
        self._delete(files)
        return table.num_rows

    # -- files ---------------------------------------------------------------------------------------------------
    def _write_fragment(self, kind: str, table: pa.Table) -> None:
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        self._put(f"{self.path(kind)}/{name}", table)

    def _put(self, path: str, table: pa.Table) -> None:
        self._atomic_write(path, lambda sink: pq.write_table(table, sink))

    def _atomic_write(self, path: str, write: Callable[[Any], None]) -> None:
        """Write ``path`` whole or not at all: one PUT on object stores, else a hidden temp file renamed."""
        if self._atomic_put:  # object stores have no directories to create, and one PUT is atomic
            with self.fs.open_output_stream(path) as sink:
                write(sink)
            return
        folder, _, base = path.rpartition("/")
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{base}.{uuid.uuid4().hex}.tmp"  # hidden: readers skip it
        try:
            with self.fs.open_output_stream(tmp) as sink:
                write(sink)
            self.fs.move(tmp, path)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (FileNotFoundError, OSError):
                pass
            raise

    # -- other files of the experiment (genotype.json, checkpoints, settings records) ---------------------------
    def read_file(self, name: str) -> bytes | None:
        """The bytes of ``<root>/<name>``, or None when there is no such file."""
        path = f"{self.root}/{name}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as fh:
            return fh.read()

    def write_file(self, name: str, data: bytes) -> None:
        """Replace ``<root>/<name>`` with ``data``, atomically."""
        self._atomic_write(f"{self.root}/{name}", lambda sink: sink.write(data))

    def delete_file(self, name: str) -> None:
        self._delete([f"{self.root}/{name}"])

    def read_json(self, name: str) -> Any:
        data = self.read_file(name)
        if data is None:
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{self.root}/{name} is not valid JSON") from None

    def write_json(self, name: str, value: Any) -> None:
        self.write_file(name, (json.dumps(value, indent=1, sort_keys=True, default=str) + "\n").encode("utf-8"))

    def _delete(self, files: Iterable[str]) -> None:
        for path in files:
            try:
                self.fs.delete_file(path)
            except (FileNotFoundError, OSError):  # another compaction got there first
                pass


# -- one writer per experiment ----------------------------------------------------------------------------------
LOCK_FILE = "lock.json"
LOCK_STALE_S = 600.0  # a lock from another host without a heartbeat for this long is abandoned


def _lock_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}


def _owner_alive(lock: Mapping[str, Any]) -> bool:
    if lock.get("host") == socket.gethostname():
        try:
            os.kill(int(lock.get("pid", 0)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            return True
        return int(lock.get("pid", 0)) > 0
    return time.time() - float(lock.get("heartbeat") or 0) < LOCK_STALE_S


class ExperimentLock:
    """``with ExperimentLock(store):`` this process is the one writer of the experiment (see the module doc)."""

    def __init__(self, store: ResultStore):
        self.store = store

    def __enter__(self) -> "ExperimentLock":
        try:
            lock = self.store.read_json(LOCK_FILE)
        except ValueError:
            lock = None
        if isinstance(lock, dict) and lock.get("pid") != os.getpid() and _owner_alive(lock):
            raise ValueError(f"experiment {self.store.name!r} in {self.store.storage} is being run by process "
                             f"{lock.get('pid')} on {lock.get('host')}; wait for it to end or pick another --name")
        self.existed = self.store.fs.get_file_info(self.store.root).type != pafs.FileType.NotFound
        self.store.write_json(LOCK_FILE, _lock_record())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.store.delete_file(LOCK_FILE)
        if not self.existed and not self.store.fs.get_file_info(pafs.FileSelector(self.store.root)):
            self.store.fs.delete_dir(self.store.root)  # nothing was written: leave no empty folder behind


def heartbeat(store: ResultStore) -> None:
    """Refresh this process's lock (a long run on another host must not look abandoned)."""
    store.write_json(LOCK_FILE, _lock_record())




def finite_or_none(value: Any) -> float | None:
    """``value`` as a float, or ``None`` when it is missing, not a number or not finite (Parquet nulls, not NaN)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
