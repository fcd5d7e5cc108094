"""Sharded, atomic output: ``part-NNNNNN.parquet|jsonl`` plus ``_errors/part-NNNNNN.jsonl``.

A shard is written under a hidden temporary name (``.part-NNNNNN.<ext>.tmp``) and renamed
into place with :func:`os.replace` only when complete, so a killed process never leaves
a half shard visible. The errors file of a shard is renamed first and the data file last:
**the data file's existence is the shard's commit marker** — a data file is only ever
there together with its errors file (when the shard had errors). Hidden and ``_`` names
are skipped by pyarrow/pandas/polars/duckdb dataset readers, so ``pq.read_table(out_dir)``
sees exactly the committed results.

Output schema (Parquet; JSONL has the same keys):

* ``id`` — the input's id column (int or string), or the global row number (int64).
* ``position`` — global 0-based row number in the input (int64); sort by it for input order.
* one column per key of the processor's result dicts, in first-seen order:
  float vectors (lists/arrays of floats, e.g. ``embedding``) become
  ``fixed_size_list<float32>[dim]``; dicts of label -> probability (``probs``) become a
  ``struct`` with one field per label (``table.flatten()`` turns it into ``probs.<label>``
  columns); everything else is stored as pyarrow infers it (lists of structs for top-k
  tokens, etc.).

Errors file rows: ``{"id", "position", "file", "row_index", "reason"}``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .readers import Position

ERRORS_DIR = "_errors"
JOB_FILE = "_job.json"
_SHARD_RE = re.compile(r"^part-(\d+)\.(parquet|jsonl)$")
_TMP_RE = re.compile(r"^\.part-(\d+)\..*\.tmp$")


def shard_name(shard: int, fmt: str) -> str:
    return f"part-{shard:06d}.{fmt}"


def completed_shards(out_dir: str | os.PathLike[str], fmt: str) -> set[int]:
    """Indices of committed shards (their data file exists)."""
    done: set[int] = set()
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return done
    for name in names:
        m = _SHARD_RE.match(name)
        if m and m.group(2) == fmt:
            done.add(int(m.group(1)))
    return done


def has_shards(out_dir: str | os.PathLike[str]) -> bool:
    try:
        return any(_SHARD_RE.match(n) for n in os.listdir(out_dir))
    except FileNotFoundError:
        return False


def remove_temp_files(out_dir: str | os.PathLike[str], mine: Callable[[int], bool]) -> int:
    """Delete leftovers of killed runs for shards this run owns (never another worker's)."""
    removed = 0
    for d in (Path(out_dir), Path(out_dir) / ERRORS_DIR):
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        for name in names:
            m = _TMP_RE.match(name)
            if m and mine(int(m.group(1))):
                try:
                    os.remove(d / name)
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a small file so that readers see the old content or the new, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def json_default(obj: Any) -> Any:
    """JSON for what processors and Parquet inputs commonly produce."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, (bytes, bytearray)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, (_dt.datetime, _dt.date, _dt.time)):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def dumps_line(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, default=json_default) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------- arrow


def _is_float_vector(value: Any) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None  # type: ignore[assignment]
    if np is not None and isinstance(value, np.ndarray):
        return value.ndim == 1 and value.dtype.kind == "f"
    if isinstance(value, (list, tuple)) and value:
        first = value[0]
        return isinstance(first, float) or (np is not None and isinstance(first, np.floating))
    return False


def column_to_arrow(values: list[Any]) -> Any:
    """One output column as a pyarrow array (see the module docstring for the rules)."""
    import numpy as np
    import pyarrow as pa

    sample = next((v for v in values if v is not None), None)
    if sample is not None and _is_float_vector(sample):
        dim = len(sample)
        if all(v is None or len(v) == dim for v in values):
            try:
                mask = np.array([v is None for v in values])
                filled = [v if v is not None else np.zeros(dim, np.float32) for v in values]
                flat = np.asarray(filled, dtype=np.float32).reshape(-1)
                return pa.FixedSizeListArray.from_arrays(
                    pa.array(flat), dim, mask=pa.array(mask) if mask.any() else None
                )
            except (TypeError, ValueError):
                pass
        return pa.array([None if v is None else np.asarray(v, np.float32) for v in values], pa.list_(pa.float32()))
    if isinstance(sample, np.ndarray):
        values = [None if v is None else v.tolist() for v in values]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        # Mixed types: keep strings as they are and serialize the rest as JSON text.
        return pa.array(
            [None if v is None else v if isinstance(v, str) else json.dumps(v, default=json_default) for v in values],
            pa.string(),
        )


_warming: threading.Thread | None = None  # the warm-up thread, once started


def warm_up(fmt: str) -> None:
    """Start the one-time imports of the first Parquet write in a background thread.

    pyarrow imports pandas (when installed) on the first ``pa.array`` of Python
    objects: about a second, which would otherwise fall on the first shard's
    commit, with the engine idle. Called before the model loads, it is hidden
    behind the load; imports are thread-safe, so a writer that needs the module
    sooner just waits for it.
    """
    global _warming
    if fmt != "parquet" or _warming is not None:
        return
    import pyarrow as pa  # the light part, in the caller's thread

    def work() -> None:
        try:
            pa.array([0], pa.int64())
        except Exception:  # noqa: BLE001, S110 - the writer meets the same error where it can report it
            pass

    _warming = threading.Thread(target=work, name="prefillonly-arrow-warm-up", daemon=True)
    _warming.start()


def _ids_to_arrow(ids: list[Any]) -> Any:
    import pyarrow as pa

    if all(isinstance(i, int) for i in ids):
        return pa.array(ids, pa.int64())
    return pa.array([str(i) for i in ids], pa.string())


# ----------------------------------------------------------------------------- shard writer


class ShardWriter:
    """Writes one shard: results (streamed into a temp file) and errors, committed atomically.

    At most ``max_buffered_rows`` result rows are held in memory (Parquet writes them as a
    row group when the buffer fills); JSONL rows go straight to the temp file.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        shard: int,
        fmt: str,
        *,
        max_buffered_rows: int = 10_000,
        schema_hint: Any = None,
        fsync: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.shard = shard
        self.fmt = fmt
        self.max_buffered_rows = max_buffered_rows
        self.schema_hint = schema_hint
        self.fsync = fsync
        name = shard_name(shard, fmt)
        self.final_path = self.out_dir / name
        self.tmp_path = self.out_dir / f".{name}.tmp"
        err_name = shard_name(shard, "jsonl")
        self.errors_final = self.out_dir / ERRORS_DIR / err_name
        self.errors_tmp = self.out_dir / ERRORS_DIR / f".{err_name}.tmp"
        self.results = 0
        self.errors = 0
        self.schema: Any = None  # the Parquet schema once known
        self._buffer: list[tuple[Any, int, dict[str, Any]]] = []
        self._pq_writer: Any = None
        self._jsonl: Any = None
        self._errors_file: Any = None
        self._closed = False

    # -- adding rows

    def add_result(self, row_id: Any, position: int, result: dict[str, Any]) -> None:
        self.results += 1
        if self.fmt == "jsonl":
            if self._jsonl is None:
                self._jsonl = open(self.tmp_path, "wb", buffering=1 << 20)  # noqa: SIM115 - held open across add_* calls until commit/abort
            self._jsonl.write(dumps_line({"id": row_id, "position": position, **result}))
            return
        self._buffer.append((row_id, position, result))
        if len(self._buffer) >= self.max_buffered_rows:
            self._flush_parquet()

    def add_error(self, row_id: Any, position: Position, file: str, reason: str) -> None:
        self.errors += 1
        if self._errors_file is None:
            self._errors_file = open(self.errors_tmp, "wb", buffering=1 << 16)  # noqa: SIM115 - held open across add_* calls until commit/abort
        self._errors_file.write(
            dumps_line(
                {
                    "id": row_id,
                    "position": position.row,
                    "file": file,
                    "row_index": position.row_index,
                    "reason": reason,
                }
            )
        )

    # -- parquet

    def _table(self, rows: list[tuple[Any, int, dict[str, Any]]]) -> Any:
        import pyarrow as pa

        keys: dict[str, None] = {}
        for _, _, result in rows:
            for k in result:
                keys.setdefault(k)
        arrays = {"id": _ids_to_arrow([r[0] for r in rows]), "position": pa.array([r[1] for r in rows], pa.int64())}
        for k in keys:
            arrays[k] = column_to_arrow([r[2].get(k) for r in rows])
        return pa.table(arrays)

    def _conform(self, table: Any) -> Any:
        """Cast a later buffer to the schema fixed by the shard's first row group."""
        import pyarrow as pa

        extra = [n for n in table.column_names if n not in self.schema.names]
        if extra:
            raise ValueError(
                f"shard {self.shard}: processor returned new result column(s) {extra} after the first "
                f"{self.results - table.num_rows} rows; every row's result should have the same keys ({self.schema.names[2:]})"
            )
        cols = []
        for f in self.schema:
            if f.name in table.column_names:
                cols.append(table.column(f.name))
            else:
                cols.append(pa.nulls(table.num_rows, f.type))
        table = pa.table(cols, names=self.schema.names)
        try:
            return table.cast(self.schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise ValueError(
                f"shard {self.shard}: result types changed within the shard ({e}); "
                f"expected {self.schema}, got {table.schema}"
            ) from None

    def _flush_parquet(self) -> None:
        import pyarrow.parquet as pq

        if not self._buffer:
            return
        table = self._table(self._buffer)
        self._buffer = []
        if self._pq_writer is None:
            self.schema = table.schema
            if self.schema_hint is not None and self.schema_hint != table.schema:
                try:  # e.g. a column all null in these rows, or numeric ids read from CSV as text
                    self.schema = self.schema_hint
                    table = self._conform(table)
                except ValueError:
                    self.schema = table.schema
            self._pq_writer = pq.ParquetWriter(self.tmp_path, self.schema)
        else:
            table = self._conform(table)
        self._pq_writer.write_table(table)

    # -- commit / abort

    def commit(self) -> None:
        """Make the shard visible: errors file first, data file last (the commit point)."""
        if self._closed:
            raise RuntimeError(f"shard {self.shard} already closed")
        if self.fmt == "parquet":
            self._flush_parquet()
            if self._pq_writer is None:  # no results: an empty file with the job's schema
                import pyarrow as pa
                import pyarrow.parquet as pq

                self.schema = self.schema_hint or pa.schema([("id", pa.int64()), ("position", pa.int64())])
                self._pq_writer = pq.ParquetWriter(self.tmp_path, self.schema)
            self._pq_writer.close()
            self._pq_writer = None
        else:
            if self._jsonl is None:
                self._jsonl = open(self.tmp_path, "wb")  # noqa: SIM115 - held open across add_* calls until commit/abort
            self._jsonl.close()
            self._jsonl = None
        if self.fsync:
            _fsync_file(self.tmp_path)
        if self._errors_file is not None:
            self._errors_file.flush()
            if self.fsync:
                os.fsync(self._errors_file.fileno())
            self._errors_file.close()
            self._errors_file = None
            os.replace(self.errors_tmp, self.errors_final)
        else:
            try:
                os.remove(self.errors_final)  # stale, from an attempt that was killed before its commit
            except FileNotFoundError:
                pass
        if self.fsync:
            _fsync_dir(self.errors_final.parent)
        os.replace(self.tmp_path, self.final_path)
        if self.fsync:
            _fsync_dir(self.out_dir)
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far (the shard will be recomputed on the next run)."""
        self._closed = True
        self._buffer = []
        for handle in (self._pq_writer, self._jsonl, self._errors_file):
            if handle is not None:
                try:
                    handle.close()
                except Exception:  # noqa: BLE001, S110 - best effort: the temp file is deleted next
                    pass
        self._pq_writer = self._jsonl = self._errors_file = None
        for path in (self.tmp_path, self.errors_tmp):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def read_schema(path: str | os.PathLike[str]) -> Any:
    """The Arrow schema of a committed Parquet shard (footer only)."""
    import pyarrow.parquet as pq

    return pq.read_schema(path)


def iter_error_records(out_dir: str | os.PathLike[str]) -> Iterable[dict[str, Any]]:
    """All committed error rows, shard by shard (for reports and tests)."""
    d = Path(out_dir) / ERRORS_DIR
    done = completed_shards(out_dir, "parquet") | completed_shards(out_dir, "jsonl")
    for name in sorted(os.listdir(d)) if d.is_dir() else []:
        m = _SHARD_RE.match(name)
        if m and int(m.group(1)) in done:
            with open(d / name, "rb") as f:
                for line in f:
                    yield json.loads(line)
