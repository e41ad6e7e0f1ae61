"""The experiment's Parquet records (``<storage>/<name>/<kind>.parquet/`` folders of fragments, see the README's
"Results") and the row builders, the one place a reported result becomes a row. No Ray import here."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import time
import uuid
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pcdarts_core.spaces import TRIAL_METRIC_PREFIXES

_F, _I, _S = pa.float64(), pa.int64(), pa.string()
_VECTOR = pa.list_(_F)
_MATRIX = pa.list_(_VECTOR)
#: The statistics of the stability table's summaries of accuracies (``val_acc_mean``, ``eval_acc_best``, ...)
SUMMARY_STATS = ("mean", "std", "ci_low", "ci_high", "best")

#: The known columns of each kind of record (the kinds: trials, one row per search; epochs, one per search and
#: epoch; stability, one per configuration group, see :mod:`orchestrator.stability`; evaluations, one per retraining).
SCHEMAS: dict[str, pa.Schema] = {
    "trials": pa.schema([
        ("trial_id", _S), ("group", _S), ("seed", _I), ("status", _S), ("method", _S),
        ("val_acc", _F), ("train_acc", _F), ("val_loss", _F), ("train_loss", _F),
        ("genotype", _S), ("error", _S), ("wall_time_s", _F), ("epochs_done", _I)]),
    "epochs": pa.schema([
        ("trial_id", _S), ("group", _S), ("seed", _I), ("epoch", _I),
        ("train_acc", _F), ("train_loss", _F), ("val_acc", _F), ("val_loss", _F), ("lr", _F),
        ("alphas_normal", _MATRIX), ("alphas_reduce", _MATRIX), ("betas_normal", _VECTOR), ("betas_reduce", _VECTOR),
        ("genotype", _S), ("arch_entropy", _F), ("n_skip_normal", _I), ("wall_time_s", _F)]),
    "stability": pa.schema([
        ("group", _S), ("n_seeds", _I), ("n_failed", _I), ("n_running", _I),
        *[(f"val_acc_{stat}", _F) for stat in SUMMARY_STATS], ("best_minus_mean", _F),
        ("n_evaluated", _I), *[(f"eval_acc_{stat}", _F) for stat in SUMMARY_STATS], ("eval_best_minus_mean", _F),
        ("consensus_eval_acc_mean", _F), ("n_consensus_evals", _I),
        ("n_genotypes", _I), ("genotype_distance_mean", _F), ("n_distinct_genotypes", _I),
        ("consensus_genotype", _S), ("consensus_distance_mean", _F),
        ("skip_normal_mean", _F), ("collapse_threshold", _I), ("collapse_rate", _F), ("stop_changing_epoch_mean", _F),
        *[(f"{name}_frequencies", _S) for name in ("edge", "edge_op", "op")]]),
    "evaluations": pa.schema([
        ("eval_id", _S), ("source", _S), ("genotype", _S), ("seed", _I), ("status", _S),
        ("test_acc", _F), ("params", _I), ("epochs_done", _I), ("error", _S), ("wall_time_s", _F)]),
}
#: The key :meth:`ResultStore.upsert` uses when none is given: the identity of a row of each kind.
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {"trials": ("trial_id",), "epochs": ("trial_id", "epoch"),
                                            "stability": ("group",), "evaluations": ("eval_id",)}
#: Values of the ``status`` column of trials and evaluations.
STATUSES = ("done", "running", "failed")


# -- rows ------------------------------------------------------------------------------------------------------
def _scalar_text(value: Any) -> str:
    if isinstance(value, str):
        # Quote only what would make the text ambiguous; plain names stay readable.
        return value if value and not any(c in value for c in ',="{}[] \t\n') else json.dumps(value)
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, (Mapping, list, tuple)):
        value = {str(k): value[k] for k in value} if isinstance(value, Mapping) else list(value)
        return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    if hasattr(value, "item"):  # numpy scalars
        return _scalar_text(value.item())
    return json.dumps(str(value))


def group_key(config: Mapping[str, Any], exclude: Collection[str] = ("seed",)) -> str:
    """A group's identity: ``config`` without ``exclude`` as deterministic text, ``method`` first (``method=x,k=4``)."""
    lookup = {str(k): v for k, v in config.items() if str(k) not in exclude}
    return ",".join(f"{k}={_scalar_text(lookup[k])}" for k in sorted(lookup, key=lambda k: (k != "method", k)))


def config_columns(config: Mapping[str, Any], prefix: str = "cfg_") -> dict[str, Any]:
    """Flat ``cfg_<key>`` columns of a config: nested mappings joined with ``__``, list leaves as JSON text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(config_columns(value, f"{name}__"))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value), default=str)
        else:
            out[name] = value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value
    return out


def trial_row(trial_id: str, config: Mapping[str, Any], status: str, group: str | None = None,
              **fields: Any) -> dict[str, Any]:
    """A ``trials`` row: id, group (``group_key(config)`` unless given), seed, ``fields``, ``cfg_*`` columns."""
    method = {"method": str(config["method"])} if "method" in config else {}
    return {"trial_id": str(trial_id), "group": group_key(config) if group is None else group,
            "seed": config.get("seed"), "status": status, **method, **fields, **config_columns(config)}


#: result keys that are no per-epoch columns of their own: Tune's own (never copied into the Parquet files), then
#: the loops' bookkeeping
NOT_EPOCH_EXTRAS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
                    "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
                    "iterations_since_restore", "experiment_tag", "should_checkpoint",
                    "search_done", "final_genotype", "epochs_total", "seed", "seed_done", "seed_index",
                    "seeds_done", "eval_id", "source", "hpo_epochs_done", "wall_time_s", "seed_wall_time_s"}


def epoch_row(trial_id: str, group: str, seed: Any, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """An ``epochs`` row from one reported search epoch: the known columns, then any other numeric metric."""
    row = {**{key: _num(metrics.get(key)) for key in SCHEMAS["epochs"].names}, "trial_id": trial_id, "group": group,
           "seed": seed, "wall_time_s": finite_or_none(metrics.get("wall_time_s", metrics.get("time_total_s")))}
    row.update({key: _num(value) for key, value in metrics.items()
                if key not in row and key not in NOT_EPOCH_EXTRAS and isinstance(value, (bool, int, float))})
    return row


def _num(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def search_row(trial_id: str, values: Mapping[str, Any], status: str, metrics: Mapping[str, Any] | None = None,
               *, group: str | None = None, error: str | None = None, **fields: Any) -> dict[str, Any]:
    """A ``trials`` row of one search (run, sweep trial, HPO seed): ``values`` with the seed, metrics, ``fields``."""
    m = metrics or {}
    floats = {k: finite_or_none(m.get(k)) for k in ("val_acc", "train_acc", "val_loss", "train_loss", "arch_entropy")}
    return trial_row(trial_id, values, status, group, **floats, genotype=m.get("final_genotype") or m.get("genotype"),
                     error=error, wall_time_s=finite_or_none(m.get("wall_time_s", m.get("time_total_s"))),
                     epochs_done=m.get("epoch"), n_skip_normal=m.get("n_skip_normal"),
                     # what the search space adds (NAS-Bench-201 accuracies, parameter-free shares)
                     **{k: finite_or_none(v) for k, v in m.items() if k.startswith(TRIAL_METRIC_PREFIXES)}, **fields)


def eval_row(spec: Mapping[str, Any], eval_cfg: Mapping[str, Any], result: Mapping[str, Any] | None, status: str,
             error: str | None = None, tune_id: str | None = None) -> dict[str, Any]:
    """An ``evaluations`` row: one genotype trained from scratch with one seed under one protocol."""
    result = result or {}
    return {"eval_id": spec["eval_id"], "source": spec["source"], "genotype": spec["genotype"],
            "seed": int(spec["seed"]), "status": status, "test_acc": finite_or_none(result.get("test_acc")),
            "params": result.get("params"), "epochs_done": result.get("epoch"), "error": error,
            "wall_time_s": finite_or_none(result.get("time_total_s")), "group": spec.get("group"),
            "train_acc": finite_or_none(result.get("train_acc")),
            "test_loss": finite_or_none(result.get("test_loss")), "protocol": spec.get("protocol"),
            "tune_trial_id": tune_id, **config_columns({k: v for k, v in eval_cfg.items() if k != "seed"})}



#: An evaluation's ``source``: the genotype a search trial found (``trial:<id>``), a group's consensus genotype
#: (``consensus:<group>``), the i-th random DARTS-space cell, the baseline (``random:<i>``), or a published genotype
#: (``published:<NAME>``, a name of ``pcdarts_core.genotypes.PUBLISHED``).
SOURCES = ("trial", "consensus", "random", "published")
source_trial, source_consensus, source_random, source_published = (f"{kind}:{{}}".format for kind in SOURCES)


def parse_source(source: str) -> tuple[str, str]:
    """Split an evaluation ``source`` into (kind, value) at the first colon; groups may contain colons."""
    kind, sep, value = str(source).partition(":")
    if not sep or kind not in SOURCES:
        raise ValueError(f"evaluation source {source!r} is not trial:<id>, consensus:<group>, random:<i> or "
                         "published:<NAME>")
    return kind, value


def retrained(evaluations: pa.Table) -> dict[tuple[str, str], list[float]]:
    """Finished (or status-less) evaluations' test accuracies by ``("trial", id)``, ``("consensus", group)`` or
    ``("baseline", label)`` (random and published cells; with the protocol where the experiment has several)."""
    rows = evaluations.to_pylist()
    several = len({r.get("protocol") for r in rows} - {None}) > 1
    out: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if row.get("source") is not None and row.get("status") in (None, "done") and \
                finite_or_none(row.get("test_acc")) is not None:
            kind, value = parse_source(row["source"])
            if kind in ("random", "published"):
                kind, value = "baseline", ("random cells" if kind == "random" else f"published {value}") + \
                    (f" [{row['protocol']}]" if several and row.get("protocol") else "")
            out.setdefault((kind, value), []).append(float(row["test_acc"]))
    return out


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float, or ``None`` when it is missing, not a number or not finite (Parquet nulls, not NaN)."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if numeric and math.isfinite(value) else None


# -- tables ----------------------------------------------------------------------------------------------------
def _schema(kind: str) -> pa.Schema:
    if kind not in SCHEMAS:
        raise ValueError(f"unknown result kind {kind!r}; known kinds: {', '.join(SCHEMAS)}")
    return SCHEMAS[kind]


def _normalize(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    convert = getattr(value, "to_json", None) or getattr(value, "tolist", None)
    return convert() if callable(convert) else value


def to_table(kind: str, rows_or_table: pa.Table | Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows (mappings) or a table as a table of ``kind``: known columns typed and first, extra ones inferred; a
    ``ValueError`` (one line) for a value that cannot be stored or a ``status`` outside :data:`STATUSES`."""
    schema = _schema(kind)
    rows = rows_or_table if isinstance(rows_or_table, pa.Table) else list(rows_or_table)
    if isinstance(rows, pa.Table):
        columns: dict[str, Any] = dict(zip(rows.column_names, rows.columns))
    else:
        for row in rows:
            if not isinstance(row, Mapping):
                raise ValueError(f"{kind} rows must be mappings, got {type(row).__name__}")
        columns = {name: [_normalize(row.get(name)) for row in rows]
                   for name in dict.fromkeys(str(k) for row in rows for k in row)}
    arrays: dict[str, pa.Array | pa.ChunkedArray] = {}
    for name in list(schema.names) + [n for n in columns if n not in schema.names]:
        known = schema.field(name).type if name in schema.names else None
        values = columns.get(name, [None] * len(rows))
        is_arrow = isinstance(values, pa.ChunkedArray)
        try:
            array = values.cast(known or values.type) if is_arrow else pa.array(values, type=known)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{kind} column {name!r} cannot be stored: {detail}") from None
        if not is_arrow and pa.types.is_floating(array.type) and array.null_count < len(array):
            # NaN metrics (a diverged search) are stored as nulls, which every reader treats as missing.
            array = pc.if_else(pc.is_nan(array), pa.scalar(None, array.type), array)
        arrays[name] = array
    table = pa.table(arrays)
    if kind in ("trials", "evaluations"):
        bad = [s for s in table["status"].unique().to_pylist() if s not in (*STATUSES, None)]
        if bad:
            raise ValueError(f"{kind} status {bad[0]!r} is not one of {', '.join(STATUSES)}")
    return table


def dedupe_latest(table: pa.Table, key: Sequence[str]) -> pa.Table:
    """``table`` with one row per ``key``: the last one, in the order the rows came (latest fragment last)."""
    for name in key:
        if name not in table.column_names:
            raise ValueError(f"key column {name!r} is missing from the rows")
    rows = table.select(list(key)).append_column("__row", pa.array(range(table.num_rows), type=_I))
    last = rows.group_by(list(key), use_threads=False).aggregate([("__row", "max")])
    return table.take(last.sort_by("__row_max")["__row_max"])  # in their original order


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True, default=str) + "\n").encode("utf-8")


# -- the store -------------------------------------------------------------------------------------------------
class ResultStore:
    """The Parquet records of one experiment (``storage``: a directory or a URI :mod:`pyarrow.fs` understands)."""

    def __init__(self, storage: str, name: str) -> None:
        storage = os.fspath(storage)
        if not name or "/" in name or name in {".", ".."}:
            raise ValueError(f"experiment name {name!r} must be a non-empty single path component")
        if "://" in storage:
            try:
                self.fs, base = pafs.FileSystem.from_uri(storage)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
                raise ValueError(f"storage {storage!r} is not a URI pyarrow understands: {err}") from None
        else:
            self.fs, base = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(storage))
        self.storage, self.name, self.root = storage, name, f"{base.rstrip('/')}/{name}"
        self._atomic_put = self.fs.type_name in {"s3", "gcs"}  # object stores: one PUT is atomic

    def __repr__(self) -> str:
        return f"ResultStore({self.storage!r}, {self.name!r})"

    def path(self, kind: str) -> str:
        """The folder of ``kind`` on :attr:`fs` (a local path, or ``bucket/prefix/...`` on object stores)."""
        _schema(kind)  # unknown kinds: a ValueError
        return f"{self.root}/{kind}.parquet"

    def uri(self, kind: str | None = None) -> str:
        """The folder of ``kind`` (default: of the experiment) as Tune, pandas, DuckDB or Ray Data want it
        (``s3://...`` on S3, a path locally)."""
        scheme, sep, _ = self.storage.partition("://")
        path = self.root if kind is None else self.path(kind)
        return f"{scheme}://{path}" if sep and scheme != "file" else path

    def fragments(self, kind: str) -> list[str]:
        """The fragment files of ``kind``, oldest first (hidden temporary files excluded)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(kind), allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                      and not i.base_name.startswith("."))  # one folder: sorted by name

    def exists(self, kind: str) -> bool:
        return bool(self.fragments(kind))

    def read(self, kind: str, files: Sequence[str] | None = None) -> pa.Table:
        """The latest row per key of ``kind``, with all known columns; an empty table when nothing was written."""
        files = self.fragments(kind) if files is None else list(files)
        schemas = [f.physical_schema for f in ds.dataset(files, filesystem=self.fs).get_fragments()]
        try:
            schema = pa.unify_schemas(schemas + [SCHEMAS[kind]], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise ValueError(f"stored fragments do not fit together: {str(err).splitlines()[0]}") from None
        return dedupe_latest(ds.dataset(files, filesystem=self.fs, schema=schema).to_table(), DEFAULT_KEYS[kind])

    def upsert(self, kind: str, rows: pa.Table | Sequence[Mapping[str, Any]]) -> pa.Table:
        """Record ``rows`` as one new fragment; on reading they replace earlier rows with the same key."""
        new = to_table(kind, rows)
        for name in DEFAULT_KEYS[kind]:  # known columns: always there
            if new.column(name).null_count:
                raise ValueError(f"upsert key column {name!r} has null values in the new rows")
        if new.num_rows:
            self._write_fragment(kind, new)
        return new

    def write_table(self, kind: str, rows_or_table: pa.Table | Sequence[Mapping[str, Any]]) -> pa.Table:
        """Replace everything of ``kind`` by these rows (a derived table such as ``stability``)."""
        table = to_table(kind, rows_or_table)
        self._write_fragment(kind, table, old=self.fragments(kind))
        return table

    def compact(self, kind: str) -> int:
        """Replace the fragments of ``kind`` by one, named to sort right after the newest of them; the rows kept."""
        files = self.fragments(kind)
        table = self.read(kind, files)
        if len(files) >= 2:
            self._write_fragment(kind, table, files[-1].rsplit("/", 1)[-1][:-len(".parquet")] + "~c", old=files)
        return table.num_rows

    # -- files ---------------------------------------------------------------------------------------------------
    def _write_fragment(self, kind: str, table: pa.Table, stem: str | None = None, old: Iterable[str] = ()) -> None:
        # Names start with the write time, so reading a folder in name order and keeping the last row per key
        # (DEFAULT_KEYS) gives the latest state; a reader during compact() sees a row twice and keeps one.
        stem = stem or f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._atomic_write(f"{self.path(kind)}/{stem}.parquet", lambda sink: pq.write_table(table, sink))
        self._delete(old)  # the fragments this one replaces, once it is in place

    def _atomic_write(self, path: str, write: Callable[[Any], None]) -> None:
        if self._atomic_put:  # whole or not at all: one PUT on object stores (no directories to create either)
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
            self._delete([tmp])
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

    def read_json(self, name: str) -> Any:
        data = self.read_file(name)
        try:
            return None if data is None else json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{self.root}/{name} is not valid JSON") from None

    def write_json(self, name: str, value: Any) -> None:
        self.write_file(name, _json_bytes(value))

    def create_file(self, name: str, data: bytes) -> bool:
        """Create ``<root>/<name>`` with ``data`` unless it exists, atomically: False when it exists. Locally a
        hard link of a written temporary file (fails if the name exists; safe on NFS too), on S3 a conditional
        PUT (``If-None-Match: *``); elsewhere a check, then the write (not atomic)."""
        path = f"{self.root}/{name}"
        if self.fs.type_name == "local":
            tmp = f"{self.root}/.{name}.{uuid.uuid4().hex}.tmp"
            try:
                os.makedirs(self.root, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as err:
                raise ValueError(f"storage {self.storage} cannot be written: {err.strerror or err} "
                                 f"({err.filename or self.root})") from None
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self.fs.type_name == "s3":
            from .s3 import put_if_absent

            return put_if_absent(self.fs, path, data, self.storage)
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            return False
        self.write_file(name, data)
        return True

    def _delete(self, files: Iterable[str]) -> None:
        for path in files:
            with contextlib.suppress(OSError):  # FileNotFoundError too: another compaction got there first
                self.fs.delete_file(path)


# -- one writer per experiment ----------------------------------------------------------------------------------
#: The lock files of an experiment: ``lock.<n>.json``, one per attempt to own it (see :func:`experiment_lock`).
LOCK_FILE = "lock.{}.json"
_LOCK_NAME = re.compile(r"^lock\.(\d{1,18})\.json$")
LOCK_STALE_S = 600.0  # a lock from another host without a heartbeat for this long is abandoned
_HELD: dict[str, str] = {}  # this process's locks: experiment root -> its lock file's name


def _owner_alive(lock: Any) -> bool:
    if not isinstance(lock, Mapping):  # an unreadable lock is no lock
        return False
    if lock.get("host") != socket.gethostname():
        return time.time() - float(lock.get("heartbeat") or 0) < LOCK_STALE_S
    try:
        os.kill(int(lock.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return int(lock.get("pid", 0)) > 0


def _lock_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(), "token": uuid.uuid4().hex}


def _locks(store: ResultStore) -> dict[int, Any]:
    """The experiment's lock files, by number, with their records (None: gone or unreadable meanwhile)."""
    infos = store.fs.get_file_info(pafs.FileSelector(store.root, allow_not_found=True))
    locks: dict[int, Any] = {}
    for info in infos:
        match = _LOCK_NAME.match(info.base_name)
        if match and info.type == pafs.FileType.File:
            try:
                locks[int(match.group(1))] = store.read_json(info.base_name)
            except ValueError:
                locks[int(match.group(1))] = None  # unreadable: no owner
            except OSError:  # deleted between the listing and the read (a taken-over lock)?
                if store.fs.get_file_info(info.path).type != pafs.FileType.NotFound:
                    raise
    return locks


def _refusal(store: ResultStore, lock: Mapping[str, Any]) -> ValueError:
    return ValueError(f"experiment {store.name!r} in {store.storage} is being run by process "
                      f"{lock.get('pid')} on {lock.get('host')}; wait for it to end or pick another --name")


def _acquire(store: ResultStore, attempts: int = 20) -> str:
    """Own the experiment, or a ``ValueError`` naming its live owner. Each attempt creates ``lock.<n+1>.json``
    exclusively (``n``: the highest number there), so of two processes that saw the same files one wins; the
    winner then lists again and owns only if its file is the highest and no other lock has a live owner (someone
    with an older listing may have created a lower number that was free again), else it withdraws."""
    for _ in range(attempts):
        locks = _locks(store)
        live = [lock for lock in locks.values() if _owner_alive(lock)]
        if live:
            raise _refusal(store, live[0])
        name = LOCK_FILE.format(max(locks, default=0) + 1)
        record = _lock_record()
        if not store.create_file(name, _json_bytes(record)):
            continue  # another process took that number first: look again
        others = _locks(store)
        mine = int(_LOCK_NAME.match(name).group(1))
        rivals = {n: lock for n, lock in others.items() if n != mine and (n > mine or _owner_alive(lock))}
        if not rivals:
            for n, lock in others.items():  # the abandoned locks below this one
                if n != mine:
                    store._delete([f"{store.root}/{LOCK_FILE.format(n)}"])
            return name
        store._delete([f"{store.root}/{name}"])
        live = [lock for lock in rivals.values() if _owner_alive(lock)]
        if live:
            raise _refusal(store, live[0])
        time.sleep(0.05)
    raise ValueError(f"experiment {store.name!r} in {store.storage}: could not take its lock after {attempts} "
                     f"attempts (other processes kept starting it); try again")


@contextlib.contextmanager
def experiment_lock(store: ResultStore) -> Iterator[None]:
    """``with experiment_lock(store):`` the one writer of the experiment; a second is refused while the first lives
    (same host: its pid; another host: a heartbeat under :data:`LOCK_STALE_S` old), a dead one's lock is taken
    over. Held already by this process (a command inside another): nothing more to do."""
    if store.root in _HELD:
        yield
        return
    # the experiment's folder, and the storage folder above it, as they were before the lock made them
    made = [d for d in (store.root, store.root.rsplit("/", 1)[0])
            if store.fs.get_file_info(d).type == pafs.FileType.NotFound]
    _HELD[store.root] = _acquire(store)
    try:
        yield
    finally:
        store._delete([f"{store.root}/{_HELD.pop(store.root)}"])
        with contextlib.suppress(OSError):  # (another process may have written or removed it meanwhile)
            for folder in made:  # nothing was written (a cluster it could not join): leave no empty folder behind
                if store.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
                    break
                store.fs.delete_dir(folder)


def heartbeat(store: ResultStore) -> None:
    """Refresh this process's lock: a long run on another host must not look abandoned."""
    if store.root in _HELD:
        store.write_file(_HELD[store.root], _json_bytes(_lock_record()))
