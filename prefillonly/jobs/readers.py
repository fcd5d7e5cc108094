"""Streaming readers: JSONL, CSV and Parquet rows in batches, with bounded memory.

No reader ever holds a whole file: JSONL and CSV go line by line, Parquet one record
batch of one row group at a time. Every row carries a :class:`Position` — its file, its
index in that file and its global row number across all files in sorted order — which is
the unit of resume: the runner hands in a :class:`RowSelector` and rows it does not want
are skipped before they are parsed (Parquet skips whole row groups from the footer).

A row that cannot be read (bad JSON, invalid UTF-8, wrong CSV field count) comes back as
a :class:`RawRow` with ``error`` set, so one bad line costs one error row, not the job. A
file that cannot be read at all (not Parquet, damaged, a gzip stream cut short, binary data
where text was expected) stops the job with an ``InvalidRequestError("input", ...)`` that
names the file and what is wrong, never a library's stack trace.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import os
import sys
import zlib
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Protocol

from ..errors import InvalidRequestError
from .spec import INPUT_FORMATS, format_for_path

# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class Position:
    """Where a row sits in the input; stable as long as the input files do not change."""

    file_index: int
    """Index of the file in the sorted input file list."""
    row_index: int
    """0-based index of the row among that file's rows (blank lines are not rows)."""
    row: int
    """Global 0-based row number across all files; the default id and the shard key."""


@dataclass(slots=True)
class RawRow:
    """One input row as read: its data, or the reason it could not be read."""

    position: Position
    data: dict[str, Any] | None
    error: str | None = None


@dataclass(frozen=True)
class InputFile:
    path: str
    """Path to open."""
    name: str
    """Path relative to the input root: shown in errors, stored in the job fingerprint."""
    format: str
    size: int


class RowSelector(Protocol):
    """Which global rows a run wants; everything else is skipped unparsed."""

    def wants(self, row: int) -> bool: ...

    def ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Wanted sub-ranges of ``[start, stop)``, sorted and disjoint."""
        ...


class AllRows:
    """The selector that wants every row."""

    def wants(self, row: int) -> bool:
        return True

    def ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        return [(start, stop)] if stop > start else []


@dataclass
class ReadStats:
    """Counters the reader updates as it goes (the runner reports them)."""

    rows_seen: int = 0
    rows_skipped: int = 0
    files_done: int = 0


# ----------------------------------------------------------------------------- files

_GLOB_MAGIC = set("*?[")


def resolve_inputs(spec_input: str, input_format: str | None = None) -> list[InputFile]:
    """The input files of a job, in a deterministic (sorted) order.

    ``spec_input`` is a file, a glob or a directory. Directories are walked recursively;
    hidden files and names starting with ``_`` (``_SUCCESS``, ``_metadata``) are skipped, as
    are files whose extension is not a known input format.
    """
    if input_format is not None and input_format not in INPUT_FORMATS:
        raise InvalidRequestError(
            "input_format", f"unknown format {input_format!r}; choose one of {', '.join(INPUT_FORMATS)}"
        )
    path = os.path.expanduser(spec_input)
    found: list[tuple[str, str]] = []  # (path, name relative to root)
    if os.path.isdir(path):
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
            for fn in filenames:
                if fn.startswith((".", "_")):
                    continue
                full = os.path.join(dirpath, fn)
                fmt = format_for_path(fn)
                if fmt is None or (input_format is not None and fmt != input_format):
                    continue
                found.append((full, os.path.relpath(full, path)))
        if not found:
            want = input_format or "/".join(INPUT_FORMATS)
            raise InvalidRequestError("input", f"directory {spec_input!r} holds no {want} files")
    elif any(ch in _GLOB_MAGIC for ch in path):
        root = _glob_root(path)
        for full in glob.glob(path, recursive=True):
            if os.path.isfile(full):
                found.append((full, os.path.relpath(full, root)))
        if not found:
            raise InvalidRequestError("input", f"glob {spec_input!r} matches no files")
    elif os.path.isfile(path):
        found.append((path, os.path.basename(path)))
    else:
        raise InvalidRequestError("input", f"no such file or directory: {spec_input!r}")

    found.sort(key=lambda item: item[1])
    files = []
    for full, name in found:
        fmt = input_format or format_for_path(full)
        if fmt is None:
            raise InvalidRequestError(
                "input_format",
                f"cannot tell the format of {name!r} from its extension; set input_format to one of {', '.join(INPUT_FORMATS)}",
            )
        files.append(InputFile(path=full, name=name.replace(os.sep, "/"), format=fmt, size=os.path.getsize(full)))
    return files


def _glob_root(pattern: str) -> str:
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts:
        if any(ch in _GLOB_MAGIC for ch in part):
            break
        fixed.append(part)
    root = os.sep.join(fixed)
    return root or "."


def _file_error(file: InputFile, problem: str) -> InvalidRequestError:
    """An error about a whole input file: it stops the job, so it names the file by its full path."""
    return InvalidRequestError("input", f"{file.path!r}: {problem}")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


ErrorTypes = tuple[type[BaseException], ...]

#: What reading a damaged or vanished text file raises: a gzip stream that is not gzip
#: (``BadGzipFile`` is an ``OSError``), is cut short (``EOFError``) or is corrupt (``zlib.error``).
_TEXT_READ_ERRORS: ErrorTypes = (OSError, EOFError, zlib.error)


@contextmanager
def _readable(file: InputFile, what: str, errors: ErrorTypes = _TEXT_READ_ERRORS) -> Iterator[None]:
    """Report a library's failure to read ``file`` as one input error naming the file and the cause."""
    try:
        yield
    except errors as e:
        if isinstance(e, OSError) and e.errno is not None:  # the file system's answer: gone, no permission
            raise _file_error(file, f"cannot be read: {os.strerror(e.errno)}") from None
        fix = "write or fetch it again, or leave it out of the input"
        raise _file_error(file, f"is not a readable {what} file ({_one_line(e)}): {fix}") from None


def _parquet_errors() -> ErrorTypes:
    import pyarrow as pa

    return (OSError, pa.ArrowException)


@contextmanager
def _open_parquet(file: InputFile) -> Iterator[Any]:
    """``pq.ParquetFile`` of ``file``; a file that is not Parquet, or whose footer is cut off, is an input error."""
    import pyarrow.parquet as pq

    with _readable(file, "Parquet", _parquet_errors()):
        pf = pq.ParquetFile(file.path)
    try:
        yield pf
    finally:
        pf.close()


def _open_binary(path: str) -> IO[bytes]:
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb", buffering=1 << 20)


def probe_columns(file: InputFile, max_lines: int = 1000) -> list[str]:
    """Column names of a file, cheaply: CSV header, Parquet schema, or the first JSON object's keys."""
    if file.format == "parquet":
        with _open_parquet(file) as pf:
            return list(pf.schema_arrow.names)
    if file.format == "csv":
        with _readable(file, "CSV"), _open_binary(file.path) as f:
            return _read_csv_header(file, csv.reader(_decoded_lines(f))) or []
    with _readable(file, "JSON Lines"), _open_binary(file.path) as f:
        first = True
        for i, line in enumerate(f):
            if i >= max_lines:
                break
            if not line.strip():
                continue
            if first:  # a file the run would refuse is refused here, before a model loads
                first = False
                _check_first_jsonl_line(file, line, i + 1)
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return list(obj)
    return []


def count_rows(files: Sequence[InputFile]) -> int | None:
    """Total rows when cheap to know (all Parquet: from the footers), else None."""
    if not files or any(f.format != "parquet" for f in files):
        return None
    total = 0
    for file in files:
        with _open_parquet(file) as pf:
            total += pf.metadata.num_rows
    return total


# ----------------------------------------------------------------------------- reading


def iter_batches(
    files: Sequence[InputFile],
    batch_rows: int,
    *,
    columns: Iterable[str] | None = None,
    selector: RowSelector | None = None,
    stats: ReadStats | None = None,
) -> Iterator[list[RawRow]]:
    """Wanted rows of all files, in order, in lists of at most ``batch_rows``.

    ``columns`` limits each row dict to those keys (absent ones stay absent).
    """
    batch: list[RawRow] = []
    for row in iter_rows(files, columns=columns, selector=selector, stats=stats, batch_rows=batch_rows):
        batch.append(row)
        if len(batch) >= batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_rows(
    files: Sequence[InputFile],
    *,
    columns: Iterable[str] | None = None,
    selector: RowSelector | None = None,
    stats: ReadStats | None = None,
    batch_rows: int = 1024,
) -> Iterator[RawRow]:
    """Wanted rows of all files one by one; global row numbers continue across files."""
    selector = selector or AllRows()
    stats = stats if stats is not None else ReadStats()
    cols = list(dict.fromkeys(columns)) if columns is not None else None
    base = 0
    for file_index, file in enumerate(files):
        if file.format == "jsonl":
            reader = _read_jsonl
        elif file.format == "csv":
            reader = _read_csv
        elif file.format == "parquet":
            reader = _read_parquet
        else:  # pragma: no cover - resolve_inputs guards this
            raise InvalidRequestError("input_format", f"unknown format {file.format!r}")
        n = yield from reader(file, file_index, base, cols, selector, stats, batch_rows)
        base += n
        stats.files_done += 1


def _project(obj: dict[str, Any], cols: list[str] | None) -> dict[str, Any]:
    if cols is None:
        return obj
    return {c: obj[c] for c in cols if c in obj}


def _read_jsonl(
    file: InputFile,
    file_index: int,
    base: int,
    cols: list[str] | None,
    selector: RowSelector,
    stats: ReadStats,
    batch_rows: int,
) -> Generator[RawRow, None, int]:
    """Yields the file's wanted rows; returns how many rows the file has."""
    n = 0
    with _readable(file, "JSON Lines"), _open_binary(file.path) as f:
        first = True
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if first:
                first = False
                _check_first_jsonl_line(file, line, line_no)
            row = base + n
            n += 1
            stats.rows_seen += 1
            if not selector.wants(row):
                stats.rows_skipped += 1
                continue
            pos = Position(file_index, n - 1, row)
            try:
                obj = json.loads(line)
            except ValueError as e:  # includes UnicodeDecodeError
                yield RawRow(pos, None, f"line {line_no}: invalid JSON: {_json_problem(e)}")
                continue
            if not isinstance(obj, dict):
                yield RawRow(pos, None, f"line {line_no}: expected a JSON object, got {type(obj).__name__}")
                continue
            yield RawRow(pos, _project(obj, cols))
    return n


def _check_first_jsonl_line(file: InputFile, line: bytes, line_no: int) -> None:
    """Refuse a file that is plainly not JSON Lines, rather than turning every line into an error row."""
    if line.lstrip()[:1] == b"[":
        raise _file_error(
            file,
            "holds a JSON array; this job reads JSON Lines (one object per line): "
            "convert it, e.g. jq -c '.[]' in.json > in.jsonl",
        )
    if b"\0" in line:
        raise _file_error(file, f"line {line_no} holds binary data (a NUL byte), so this is not UTF-8 JSON Lines: "
                                "check the file's format and extension (.jsonl, .jsonl.gz, .csv, .parquet)")


def _json_problem(error: ValueError) -> str:
    """What is wrong with one JSON line, without json's ``line 1 column 5`` (it always parses one line)."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at column {error.colno}"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 ({error.reason} at byte {error.start + 1})"
    return _one_line(error)


def _decoded_lines(f: IO[bytes]) -> Iterator[str]:
    """Lines as str; undecodable bytes become surrogates, caught per wanted row."""
    first = True
    for line in f:
        text = line.decode("utf-8", "surrogateescape")
        if first:
            first = False
            text = text.removeprefix("\ufeff")
        yield text


def _bad_utf8(values: Iterable[str]) -> bool:
    try:
        for v in values:
            v.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_csv_header(file: InputFile, reader: Iterator[list[str]]) -> list[str] | None:
    """The first non-blank record of ``reader``, checked (None for a file with no records).

    A file whose header cannot be read or shows it is not UTF-8 CSV text is refused whole:
    every row of it would be wrong.
    """
    try:
        for values in reader:
            if values:
                _check_csv_header(file, values)
                return values
    except csv.Error as e:
        raise _file_error(file, f"cannot read the CSV header: {e}") from None
    return None


def _check_csv_header(file: InputFile, header: list[str]) -> None:
    if _bad_utf8(header):
        raise _file_error(file, "the CSV header is not valid UTF-8; save the file as UTF-8")
    if any("\0" in h for h in header):
        raise _file_error(file, "the CSV header holds binary data (a NUL byte), so this is not CSV text: "
                                "check the file's format and extension (.csv, .csv.gz, .jsonl, .parquet)")


def _read_csv(
    file: InputFile,
    file_index: int,
    base: int,
    cols: list[str] | None,
    selector: RowSelector,
    stats: ReadStats,
    batch_rows: int,
) -> Generator[RawRow, None, int]:
    limit = sys.maxsize
    while True:  # long documents exceed csv's default 128 KiB field limit
        try:
            csv.field_size_limit(limit)
            break
        except OverflowError:
            limit //= 2
    n = 0
    with _readable(file, "CSV"), _open_binary(file.path) as f:
        reader = csv.reader(_decoded_lines(f))
        header = _read_csv_header(file, reader)
        if header is None:
            return 0
        keep = [i for i, h in enumerate(header) if cols is None or h in cols]
        while True:
            try:
                values = next(reader)
                parse_error = None
            except StopIteration:
                break
            except csv.Error as e:
                values, parse_error = None, str(e)
            if values is not None and not values:
                continue  # blank line
            row = base + n
            n += 1
            stats.rows_seen += 1
            if not selector.wants(row):
                stats.rows_skipped += 1
                continue
            pos = Position(file_index, n - 1, row)
            line_no = reader.line_num
            if parse_error is not None or values is None:
                yield RawRow(pos, None, f"line {line_no}: invalid CSV: {parse_error}")
            elif len(values) != len(header):
                yield RawRow(pos, None, f"line {line_no}: expected {len(header)} fields, found {len(values)}")
            else:
                data = {header[i]: values[i] for i in keep}
                if _bad_utf8(data.values()):
                    yield RawRow(pos, None, f"line {line_no}: invalid UTF-8")
                else:
                    yield RawRow(pos, data)
    return n


def _read_parquet(
    file: InputFile,
    file_index: int,
    base: int,
    cols: list[str] | None,
    selector: RowSelector,
    stats: ReadStats,
    batch_rows: int,
) -> Generator[RawRow, None, int]:
    with _open_parquet(file) as pf, _readable(file, "Parquet", _parquet_errors()):
        names = pf.schema_arrow.names
        read_cols = None if cols is None else [c for c in cols if c in names]
        drop_all = read_cols == [] and bool(names)
        if drop_all:  # none of the wanted columns: read one (row counts need a column), drop it
            read_cols = names[:1]
        meta = pf.metadata
        start = base
        for rg in range(meta.num_row_groups):
            rg_rows = meta.row_group(rg).num_rows
            stop = start + rg_rows
            stats.rows_seen += rg_rows
            wanted = selector.ranges(start, stop)
            stats.rows_skipped += rg_rows - sum(b - a for a, b in wanted)
            if wanted:
                offset = start  # global row of the batch's first row
                for batch in pf.iter_batches(
                    batch_size=batch_rows, row_groups=[rg], columns=read_cols, use_threads=False
                ):
                    b_stop = offset + batch.num_rows
                    for a, b in wanted:
                        lo, hi = max(a, offset), min(b, b_stop)
                        if lo >= hi:
                            continue
                        for i, data in enumerate(batch.slice(lo - offset, hi - lo).to_pylist()):
                            row = lo + i
                            yield RawRow(Position(file_index, row - base, row), {} if drop_all else data)
                    offset = b_stop
            start = stop
        return meta.num_rows
