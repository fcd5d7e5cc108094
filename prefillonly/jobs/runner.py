"""``run_job``: stream rows -> requests -> processor -> sharded output, resumable exactly once.

Shard ``k`` always holds input rows ``[k * rows_per_shard, (k + 1) * rows_per_shard)`` of
the global row stream (all files in sorted order), results and error rows together. A
shard is committed by renaming its data file into place (see :mod:`.writers`), so after a
kill at any point — SIGKILL included — every shard is either fully there or absent. A
rerun lists the committed shards, skips their rows unparsed (Parquet: whole row groups
from the footer), deletes temp files of the killed run and recomputes the rest. Each input
row therefore ends up in the output exactly once.

Data-parallel: ``shard_filter=lambda k: k % n == i`` in worker ``i`` of ``n``; each worker
writes its own shards into the same directory and the set of shards is the output — there
is no merge step.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import InvalidRequestError
from .prepare import RequestBuilder
from .readers import InputFile, Position, ReadStats, count_rows, iter_batches, probe_columns, resolve_inputs
from .spec import RESERVED_OUTPUT_COLUMNS, JobSpec
from .writers import (
    ERRORS_DIR,
    JOB_FILE,
    ShardWriter,
    completed_shards,
    has_shards,
    read_schema,
    remove_temp_files,
    shard_name,
    warm_up,
    write_atomic,
)

#: The engine, seen from a job: takes request dicts (see :mod:`.prepare`: ``id``,
#: ``position``, ``text`` or ``messages``, maybe ``images``) and returns, in order, one
#: item per request: a dict of result columns, or a string saying why that row failed.
#: A result dict may carry ``"_tokens": int`` (tokens the row cost); the runner sums it
#: for tokens/s and does not write it. Raising aborts the job (the current shard is
#: dropped and recomputed on the next run) — reserve that for failures that are not
#: about one row.
#:
#: A processor may also have ``prepare(requests) -> state``: the runner then calls it in
#: the reader thread, one batch ahead, and calls ``processor(requests, state)``. This is
#: where CPU work that does not need the engine (tokenisation) goes, so that it overlaps
#: the engine's work on the previous batch. ``prepare`` must not touch the engine, and
#: whatever it raises aborts the job like the processor's own errors.
Processor = Callable[..., list["dict[str, Any] | str"]]

TOKENS_KEY = "_tokens"


@dataclass
class JobSummary:
    """What one ``run_job`` call did (this run only; committed shards it skipped are counted apart)."""

    output: str
    rows: int = 0
    """Rows handled by this run: results + errors."""
    results: int = 0
    errors: int = 0
    tokens: int = 0
    shards_written: int = 0
    shards_already_done: int = 0
    rows_skipped: int = 0
    """Rows read past without processing: already done, or owned by other workers."""
    wall_s: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def __str__(self) -> str:
        parts = [
            f"{self.rows:,} rows ({self.results:,} results, {self.errors:,} errors) in {self.wall_s:.2f} s",
            f"{self.rows_per_s:,.1f} rows/s",
        ]
        if self.tokens:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s")
        text = ", ".join(parts)
        text += f"; {self.shards_written} shards written"
        if self.shards_already_done:
            text += f", {self.shards_already_done} already done ({self.rows_skipped:,} rows skipped)"
        elif self.rows_skipped:
            text += f" ({self.rows_skipped:,} rows skipped)"
        return text + f"; output: {self.output}"


class ShardSelector:
    """Wants the rows of shards that are not committed yet and pass ``shard_filter``."""

    def __init__(self, rows_per_shard: int, done: set[int], shard_filter: Callable[[int], bool] | None) -> None:
        self.rows_per_shard = rows_per_shard
        self.done = done
        self.shard_filter = shard_filter
        self._last_shard = -1
        self._last_wanted = False

    def wants_shard(self, shard: int) -> bool:
        return shard not in self.done and (self.shard_filter is None or bool(self.shard_filter(shard)))

    def wants(self, row: int) -> bool:
        shard = row // self.rows_per_shard
        if shard != self._last_shard:
            self._last_shard, self._last_wanted = shard, self.wants_shard(shard)
        return self._last_wanted

    def ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        r = self.rows_per_shard
        out: list[tuple[int, int]] = []
        shard = start // r
        while shard * r < stop:
            if self.wants_shard(shard):
                a, b = max(start, shard * r), min(stop, (shard + 1) * r)
                if out and out[-1][1] == a:
                    out[-1] = (out[-1][0], b)
                else:
                    out.append((a, b))
            shard += 1
        return out

    def count_wanted(self, total_rows: int) -> int:
        r = self.rows_per_shard
        return sum(min(r, total_rows - k * r) for k in range(math.ceil(total_rows / r)) if self.wants_shard(k))


def check_input(spec: JobSpec) -> tuple[list[InputFile], list[str]]:
    """The job's input files and columns, checked against the spec (cheap: one file is probed).

    Run before a model loads, so that a wrong path or column fails in a second; ``run_job``
    repeats the same checks.
    """
    files = resolve_inputs(spec.input, spec.input_format)
    out_real = os.path.realpath(spec.output) + os.sep
    files = [f for f in files if not os.path.realpath(f.path).startswith(out_real)]  # our own shards are not input
    if not files:
        raise InvalidRequestError("input", f"{spec.input!r} has no files outside the output directory {spec.output!r}")
    columns: list[str] = []
    for probed in files:  # the first file with any rows says which columns the input has
        columns = probe_columns(probed)
        if columns:
            break
    spec.check_columns(columns, source=f"input file {probed.name!r}")
    return files, columns


def run_job(
    spec: JobSpec,
    processor: Processor,
    *,
    progress: bool = True,
    shard_filter: Callable[[int], bool] | None = None,
    fingerprint_extra: Mapping[str, Any] | None = None,
    fsync: bool = True,
    prefetch: bool = True,
) -> JobSummary:
    """Run (or resume) a job and return what this call did.

    ``shard_filter(k)`` limits this call to shards for which it is true (data-parallel
    workers). ``fingerprint_extra`` (JSON-able: e.g. engine settings that change results)
    is stored with the spec fingerprint; a resume must match it too. ``prefetch`` reads
    the next batch, builds its requests and runs ``processor.prepare`` on them in a
    background thread while the processor runs.
    """
    t0 = time.perf_counter()
    files, columns = check_input(spec)
    builder = RequestBuilder(spec, input_has_id=(spec.id_column or "id") in columns)

    out = Path(spec.output)
    (out / ERRORS_DIR).mkdir(parents=True, exist_ok=True)
    _check_fingerprint(out, spec, files, fingerprint_extra)

    def mine(shard: int) -> bool:
        return shard_filter is None or bool(shard_filter(shard))

    fmt = spec.output_format
    warm_up(fmt)
    done = completed_shards(out, fmt)
    remove_temp_files(out, mine)
    selector = ShardSelector(spec.rows_per_shard, done, shard_filter)
    total_rows = count_rows(files)
    todo = selector.count_wanted(total_rows) if total_rows is not None else None
    # New shards reuse the committed shards' Parquet schema when their rows fit it, so the
    # directory reads as one dataset even if, say, a shard's first rows have a null column.
    schema_hint = read_schema(out / shard_name(max(done), fmt)) if done and fmt == "parquet" else None

    summary = JobSummary(output=str(out), shards_already_done=sum(1 for k in done if mine(k)))
    stats = ReadStats()
    bar = _progress_bar(todo, progress, desc=f"{spec.task}")
    r = spec.rows_per_shard
    writer: ShardWriter | None = None
    prepare = getattr(processor, "prepare", None)

    def staged() -> Iterator[_Staged]:
        for batch in iter_batches(files, spec.batch_rows, columns=spec.needed_columns(), selector=selector, stats=stats):
            built = [builder.build(raw) for raw in batch]
            requests = [b for _, b in built if not isinstance(b, str)]
            state = prepare(requests) if prepare is not None and requests else None
            yield batch, built, requests, state

    batches = _prefetch(staged()) if prefetch else staged()
    try:
        for batch, built, requests, state in batches:
            outputs = _call(processor, requests, state, prepare is not None) if requests else []
            results = iter(outputs)
            for raw, (row_id, built_item) in zip(batch, built):
                shard = raw.position.row // r
                if writer is None or writer.shard != shard:
                    if writer is not None:  # cannot happen: wanted shards are read whole
                        raise RuntimeError(
                            f"internal error: shard {writer.shard} ended after {writer.results + writer.errors} of {r} rows"
                        )
                    writer = ShardWriter(
                        out, shard, fmt, max_buffered_rows=spec.max_buffered_rows, schema_hint=schema_hint, fsync=fsync
                    )
                item: Any = built_item if isinstance(built_item, str) else next(results)
                write_row(writer, summary, row_id, raw.position, files[raw.position.file_index].name, item)
                if writer.results + writer.errors == r:
                    schema_hint = commit_shard(writer, summary, schema_hint)
                    writer = None
            summary.rows += len(batch)
            _update_bar(bar, len(batch), summary, t0)
        if writer is not None:  # the input's last, short shard
            commit_shard(writer, summary, schema_hint)
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    summary.rows_skipped = stats.rows_skipped
    summary.wall_s = time.perf_counter() - t0
    return summary


#: One batch, ready for the processor: raw rows, ``(id, request or reason)`` per row,
#: the requests, and what ``processor.prepare`` made of them.
_Staged = tuple[list[Any], list[tuple[Any, Any]], list[dict[str, Any]], Any]


def write_row(
    writer: ShardWriter, summary: JobSummary, row_id: Any, position: Position, file: str, item: dict[str, Any] | str
) -> None:
    """Write one row's result (or its error reason, a str) and count it in ``summary``.

    The single-process run and the Ray sink both write through here, so their output is the same.
    """
    if isinstance(item, str):
        writer.add_error(row_id, position, file, item or "failed (no reason given)")
        summary.errors += 1
        return
    tokens = item.get(TOKENS_KEY)
    if tokens is not None:  # the processor's token count is for the summary, not a result column
        item = {k: v for k, v in item.items() if k != TOKENS_KEY}
        summary.tokens += int(tokens)
    writer.add_result(row_id, position.row, item)
    summary.results += 1


def commit_shard(writer: ShardWriter, summary: JobSummary, schema_hint: Any) -> Any:
    """Commit a finished shard; returns the schema later shards should reuse.

    An all-error shard's schema says nothing about results, so it keeps the previous hint.
    """
    writer.commit()
    summary.shards_written += 1
    return writer.schema if writer.results else schema_hint


def _call(processor: Processor, requests: list[dict[str, Any]], state: Any = None, prepared: bool = False) -> list[Any]:
    """Call the processor (with its ``prepare`` state when it has one) and check it kept its side of the contract."""
    outputs = processor(requests, state) if prepared else processor(requests)
    if not isinstance(outputs, (list, tuple)):
        raise TypeError(f"processor must return a list, got {type(outputs).__name__}")
    if len(outputs) != len(requests):
        raise ValueError(
            f"processor returned {len(outputs)} results for {len(requests)} rows; it must return one per row, in order"
        )
    for item in outputs:
        if isinstance(item, str):
            continue
        if not isinstance(item, dict):
            raise TypeError(f"processor results must be dicts or error strings, got {type(item).__name__}")
        for key in RESERVED_OUTPUT_COLUMNS:
            if key in item:
                raise ValueError(
                    f"processor result has the reserved key {key!r}; the runner writes {', '.join(RESERVED_OUTPUT_COLUMNS)} itself"
                )
    return list(outputs)


# ----------------------------------------------------------------------------- fingerprint


def _check_fingerprint(out: Path, spec: JobSpec, files: list[Any], extra: Mapping[str, Any] | None) -> None:
    """Refuse to resume into a directory written by a different job; record ours otherwise.

    Before any shard is committed the record may still be replaced (a run stopped during
    start-up and restarted with a fixed spec should not be refused).
    """
    record = {
        "version": 1,
        "spec": spec.fingerprint(),
        "extra": json.loads(json.dumps(dict(extra or {}), sort_keys=True, default=str)),
        "inputs": [{"name": f.name, "size": f.size} for f in files],
    }
    path = out / JOB_FILE
    if path.exists() and has_shards(out):
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old == record:
            return
        raise InvalidRequestError(
            "output",
            f"{str(out)!r} holds the output of a different job ({_describe_diff(old, record)}); "
            "rerun with the original settings to resume, or use a new output directory (or delete this one) to start over",
        )
    if has_shards(out) and not path.exists():
        raise InvalidRequestError(
            "output", f"{str(out)!r} already holds shards but no {JOB_FILE}; use an empty or new output directory"
        )
    write_atomic(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_diff(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict) or old.get("version") != new["version"]:
        return f"unreadable or old {JOB_FILE}"
    diffs = []
    old_spec, new_spec = old.get("spec", {}), new["spec"]
    for key in sorted(set(old_spec) | set(new_spec)):
        if old_spec.get(key) != new_spec.get(key):
            diffs.append(f"{key}: {_short(old_spec.get(key))} -> {_short(new_spec.get(key))}")
    old_extra, new_extra = old.get("extra", {}), new["extra"]
    for key in sorted(set(old_extra) | set(new_extra)):
        if old_extra.get(key) != new_extra.get(key):
            diffs.append(f"{key}: {_short(old_extra.get(key))} -> {_short(new_extra.get(key))}")
    if old.get("inputs") != new["inputs"]:
        before = {f["name"]: f["size"] for f in old.get("inputs", [])}
        now = {f["name"]: f["size"] for f in new["inputs"]}
        changed = [n for n in sorted(set(before) | set(now)) if before.get(n) != now.get(n)]
        detail = ", ".join(
            f"{n} ({'new' if n not in before else 'gone' if n not in now else f'{before[n]} -> {now[n]} bytes'})"
            for n in changed[:3]
        )
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        diffs.append(f"input files changed: {detail}{more}" if changed else "input file order changed")
    return "; ".join(diffs) or "different fingerprint"


# ----------------------------------------------------------------------------- progress

T = TypeVar("T")


def _progress_bar(total: int | None, enabled: bool, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but the job must not need it
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(
        total=total, unit="row", unit_scale=True, desc=desc, dynamic_ncols=True, smoothing=0.05, mininterval=0.5
    )


def _update_bar(bar: Any, n: int, summary: JobSummary, t0: float) -> None:
    postfix: dict[str, Any] = {"errors": summary.errors}
    if summary.tokens:
        postfix["tok/s"] = f"{summary.tokens / max(time.perf_counter() - t0, 1e-9):,.0f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(n)


class _NoBar:
    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _prefetch(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Produce ``items`` in a background thread, at most ``depth`` ahead (memory stays bounded)."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(("error", e))

    thread = threading.Thread(target=work, name="prefillonly-job-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "item":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        stop.set()
        thread.join(timeout=5)
