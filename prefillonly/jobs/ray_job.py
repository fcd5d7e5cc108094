"""``prefillonly run --ray``: the same job on a Ray cluster, through Ray Data.

The pipeline is read -> ``map_batches`` with one engine actor per GPU -> write:

1. The driver lists the input files, counts rows where that is cheap (Parquet footers;
   JSON Lines/CSV are counted by parallel Ray tasks when there are several files) and cuts
   the input into *read units*: one per Parquet shard slice, one per JSONL/CSV file. Each
   unit knows the global row number its file starts at.
2. Read (Ray tasks): each unit is read with this package's own streaming readers and
   :class:`~.prepare.RequestBuilder`, so positions, default ids and per-row errors are
   exactly those of the single-process run. Rows travel as ``position``, ``file_index``,
   ``row_index`` and one pickled ``payload`` column (id + request, or id + reason), so no
   schema inference can change an id or a value on the way.
3. Engine (``map_batches`` over an actor pool of ``num_workers`` actors, ``num_gpus=1``
   each when the cluster has GPUs, else CPU actors): each actor loads the model once and
   runs :class:`~.engine_processor.EngineProcessor` on ``batch_rows`` rows at a time.
4. Write (the driver): results stream back in input order (``preserve_order``) and are
   written by the same :class:`~.writers.ShardWriter` as the single-process path, so the
   output is the same files — ``part-NNNNNN.<fmt>`` holding rows ``[k*R, (k+1)*R)``,
   ``_errors/part-NNNNNN.jsonl``, ``_job.json`` — committed atomically shard by shard.

Resume works as for a local run: committed shards are skipped (their rows are not even
read), and the output directory may be resumed with or without ``--ray``. Memory stays
bounded: Ray Data streams blocks with backpressure and the driver holds at most one
shard's write buffer (``max_buffered_rows``) per shard in flight.

Input files (and the model directory) must be readable at the same path on every node
(a shared filesystem); the output directory only needs to be writable by the driver.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import PrefillOnlyError
from .engine_processor import EngineProcessor, check_job
from .local import check_input
from .prepare import RequestBuilder
from .readers import AllRows, InputFile, Position, RawRow, ReadStats, iter_rows
from .runner import (
    JobSummary,
    ShardSelector,
    _call,
    _check_fingerprint,
    _progress_bar,
    _update_bar,
    commit_shard,
    write_row,
)
from .spec import JobSpec
from .writers import (
    ERRORS_DIR,
    ShardWriter,
    completed_shards,
    read_schema,
    remove_temp_files,
    shard_name,
)

_PAYLOAD = "payload"
_FATAL = -1  # the position of an in-band job-stopping error


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise PrefillOnlyError(
            "ray: --ray needs Ray Data; install it with pip install 'prefillonly[ray]' (or pip install 'ray[data]')"
        ) from None
    return ray


# ----------------------------------------------------------------------------- read units


@dataclass(frozen=True)
class _Unit:
    """Rows ``[start, stop)`` of the global stream, all in file ``file_index`` (which starts at ``base``)."""

    file_index: int
    base: int
    start: int
    stop: int | None  # None: to the end of the file (row count not known)


class _UnitSelector:
    """A unit's wanted rows, in the file-local row numbers the reader sees (it reads one file)."""

    def __init__(self, unit: _Unit, shards: ShardSelector) -> None:
        self.base = unit.base
        self.start = unit.start
        self.stop = math.inf if unit.stop is None else unit.stop
        self.shards = shards

    def wants(self, row: int) -> bool:
        g = row + self.base
        return self.start <= g < self.stop and self.shards.wants(g)

    def ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        a, b = max(start + self.base, self.start), min(stop + self.base, self.stop)
        if a >= b:
            return []
        return [(x - self.base, y - self.base) for x, y in self.shards.ranges(a, int(b))]


@dataclass
class _Reader:
    """The read stage: one unit in, batches of request rows out (a generator UDF)."""

    spec: dict[str, Any]
    files: list[InputFile]
    input_has_id: bool
    done: frozenset[int]

    def __call__(self, units: Any) -> Iterator[Any]:
        try:
            yield from self._read(units)
        except PrefillOnlyError as e:  # e.g. a JSON array where JSON Lines were expected
            yield _fatal_table(e)

    def _read(self, units: Any) -> Iterator[Any]:
        import pyarrow as pa

        spec = JobSpec.from_dict(self.spec)
        builder = RequestBuilder(spec, input_has_id=self.input_has_id)
        shards = ShardSelector(spec.rows_per_shard, set(self.done), None)
        columns = spec.needed_columns()
        for i in range(len(units["file_index"])):
            unit = _Unit(*(int(units[k][i]) for k in ("file_index", "base", "start")), _stop(units["stop"][i]))
            selector = _UnitSelector(unit, shards)
            rows = iter_rows(
                [self.files[unit.file_index]], columns=columns, selector=selector, batch_rows=spec.batch_rows
            )
            batch: list[tuple[int, int, int, bytes]] = []
            for raw in rows:  # positions are file-local: shift them to the global stream
                pos = Position(unit.file_index, raw.position.row_index, raw.position.row + unit.base)
                row_id, item = builder.build(RawRow(pos, raw.data, raw.error))
                batch.append((pos.row, pos.file_index, pos.row_index, pickle.dumps((row_id, item), protocol=5)))
                if len(batch) >= spec.batch_rows:
                    yield _rows_table(pa, batch)
                    batch = []
            if batch:
                yield _rows_table(pa, batch)


def _stop(value: Any) -> int | None:
    value = int(value)
    return None if value < 0 else value


def _rows_table(pa: Any, rows: list[tuple[int, int, int, bytes]]) -> Any:
    position, file_index, row_index, payload = zip(*rows)
    return pa.table(
        {
            "position": pa.array(position, pa.int64()),
            "file_index": pa.array(file_index, pa.int64()),
            "row_index": pa.array(row_index, pa.int64()),
            _PAYLOAD: pa.array(payload, pa.large_binary()),
        }
    )


def _fatal_table(error: PrefillOnlyError) -> Any:
    """A job-stopping error, sent in-band: Ray Data's wrapping would lose the exception's type and text."""
    import pyarrow as pa

    return _rows_table(pa, [(_FATAL, _FATAL, _FATAL, pickle.dumps(str(error)))])


def _count_file_rows(file: InputFile) -> int | str:
    """Rows of one JSONL/CSV file, by the readers' own rules (lines are split, not parsed)."""

    class Nothing(AllRows):
        def wants(self, row: int) -> bool:
            return False

        def ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
            return []

    stats = ReadStats()
    try:
        for _ in iter_rows([file], selector=Nothing(), stats=stats):
            pass
    except PrefillOnlyError as e:
        return str(e)
    return stats.rows_seen


def _row_counts(ray: Any, files: list[InputFile]) -> list[int] | None:
    """Rows per file, or None when only a full read would tell (one JSONL/CSV file)."""
    import pyarrow.parquet as pq

    if all(f.format == "parquet" for f in files):
        return [pq.ParquetFile(f.path).metadata.num_rows for f in files]
    if len(files) == 1:
        return None  # read it as one sequential unit: counting would cost a second pass
    count = ray.remote(num_cpus=1)(_count_file_rows)
    counts: list[int | None] = [None] * len(files)
    pending = {}
    for i, f in enumerate(files):
        if f.format == "parquet":
            counts[i] = pq.ParquetFile(f.path).metadata.num_rows
        else:
            pending[i] = count.remote(f)
    for i, ref in pending.items():
        n = ray.get(ref)
        if isinstance(n, str):
            raise PrefillOnlyError(n)
        counts[i] = n
    return [int(c) for c in counts]  # type: ignore[arg-type]


def _units(files: list[InputFile], counts: list[int] | None, shards: ShardSelector, r: int) -> list[_Unit]:
    """Read units covering the wanted rows: Parquet split at shard boundaries, other files whole."""
    if counts is None:
        return [_Unit(0, 0, 0, None)]
    units = []
    base = 0
    for fi, (f, n) in enumerate(zip(files, counts)):
        for a, b in shards.ranges(base, base + n):
            if f.format == "parquet":  # row groups outside a unit are skipped from the footer
                k = a
                while k < b:
                    end = min(b, (k // r + 1) * r)
                    units.append(_Unit(fi, base, k, end))
                    k = end
            else:  # one sequential pass per file, whatever its wanted ranges
                units.append(_Unit(fi, base, base, base + n))
                break
        base += n
    return units


# ----------------------------------------------------------------------------- engine actor


class EngineActor:
    """The engine stage: one model per actor (per GPU), request rows in, result rows out."""

    def __init__(self, spec: dict[str, Any], expected_dtype: str | None, cpu_threads: int | None) -> None:
        self.fatal: PrefillOnlyError | None = None
        try:
            self._load(spec, expected_dtype, cpu_threads)
        except PrefillOnlyError as e:  # reported with the first batch, in-band
            self.fatal = e

    def _load(self, spec: dict[str, Any], expected_dtype: str | None, cpu_threads: int | None) -> None:
        from .local import fingerprint_extra, load_engine

        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        self.spec = JobSpec.from_dict(spec)
        self.llm = load_engine(self.spec)
        self.processor = EngineProcessor(self.llm, self.spec)
        dtype = fingerprint_extra(self.llm)["dtype"]
        if expected_dtype is not None and dtype != expected_dtype:
            raise PrefillOnlyError(f"dtype: the engine loaded the model as {dtype}, the driver expected {expected_dtype}")

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        if self.fatal is not None:
            return _fatal_table(self.fatal)
        positions = batch.column("position").to_pylist()
        if _FATAL in positions:  # a reader's error: pass it on to the driver, alone
            return batch.slice(positions.index(_FATAL), 1)
        rows = [pickle.loads(p) for p in batch.column(_PAYLOAD).to_pylist()]
        requests = [item for _, item in rows if not isinstance(item, str)]
        try:
            outputs = iter(_call(self.processor, requests) if requests else [])
        except PrefillOnlyError as e:  # not about one row (the local run would stop too)
            return _fatal_table(e)
        payload = [
            pickle.dumps((row_id, item if isinstance(item, str) else next(outputs)), protocol=5)
            for row_id, item in rows
        ]
        return batch.set_column(batch.schema.get_field_index(_PAYLOAD), _PAYLOAD, pa.array(payload, pa.large_binary()))


# ----------------------------------------------------------------------------- driver


def _expected_dtype(spec: JobSpec, model: str) -> str:
    """The dtype the engine will load with (for the resume fingerprint), from the config alone."""
    from ..engine.loader import read_checkpoint
    from ..llm import _resolve_dtype

    return str(_resolve_dtype(spec.engine.get("dtype"), read_checkpoint(model).config))


def _model_path(spec: JobSpec) -> str:
    if spec.model is None:
        from ..default_model import default_model_path

        return str(default_model_path())
    from ..engine.loader import resolve_model_path

    return str(Path(resolve_model_path(spec.model)).resolve())


def _init_ray(ray: Any, num_workers: int, init_kwargs: dict[str, Any] | None) -> bool:
    """Connect to ``$RAY_ADDRESS`` or start a local instance; True when this call did it."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"address": address, "include_dashboard": False, "logging_level": logging.WARNING}
    if address is None:  # a local instance: room for every actor plus the read tasks
        kwargs["num_cpus"] = max(os.cpu_count() or 1, num_workers + 1)
    kwargs.update(init_kwargs or {})
    ray.init(**kwargs)
    return True


def run_ray(
    spec: JobSpec,
    num_workers: int = 1,
    progress: bool = True,
    *,
    init_kwargs: dict[str, Any] | None = None,
    fsync: bool = True,
) -> JobSummary:
    """Run (or resume) ``spec`` on Ray with ``num_workers`` engine actors; same output as :func:`.local.run_local`.

    Connects to the cluster at ``$RAY_ADDRESS`` if set, else starts a local Ray instance,
    and shuts it down afterwards; a Ray already initialized in this process is used as is
    and left running. ``init_kwargs`` go to ``ray.init``.
    """
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise PrefillOnlyError(f"data_parallel: must be a positive number of engine actors, got {num_workers!r}")
    check_job(spec)
    ray = _import_ray()
    t0 = time.perf_counter()

    # The same checks and bookkeeping as run_job, all before any cluster work.
    files, columns = check_input(spec)
    files = [replace(f, path=os.path.abspath(f.path)) for f in files]  # Ray workers do not share our cwd
    input_has_id = (spec.id_column or "id") in columns
    model = _model_path(spec)
    dtype = _expected_dtype(spec, model)

    out = Path(spec.output)
    (out / ERRORS_DIR).mkdir(parents=True, exist_ok=True)
    _check_fingerprint(out, spec, files, {"dtype": dtype})  # the same record as run_local: resumable either way
    done = completed_shards(out, spec.output_format)
    remove_temp_files(out, lambda k: True)
    shards = ShardSelector(spec.rows_per_shard, done, None)
    hint = read_schema(out / shard_name(max(done), "parquet")) if done and spec.output_format == "parquet" else None

    started = _init_ray(ray, num_workers, init_kwargs)
    summary = JobSummary(output=str(out), shards_already_done=len(done))
    bar: Any = None
    sink: _Sink | None = None
    try:
        counts = _row_counts(ray, files)
        total = sum(counts) if counts is not None else None
        todo = shards.count_wanted(total) if total is not None else None
        if total is not None:
            summary.rows_skipped = total - (todo or 0)
        units = _units(files, counts, shards, spec.rows_per_shard)
        sink = _Sink(spec, files, total, summary, hint, fsync)
        bar = _progress_bar(todo, progress, desc=f"{spec.task} (ray)")
        if units:
            engine = dict(spec.engine)
            on_gpu = _use_gpus(ray, engine.get("device"))
            if on_gpu:
                engine["device"] = "cuda"  # each actor sees only its own GPU
            worker_spec = {**spec.to_dict(), "model": model, "engine": engine}
            stream = _pipeline(
                ray, units, files, worker_spec, spec, input_has_id, done, dtype, num_workers, on_gpu, progress
            )
            for batch in stream:
                sink.add(batch)
                _update_bar(bar, batch.num_rows, summary, t0)
        sink.finish()
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        if started:
            ray.shutdown()
    summary.wall_s = time.perf_counter() - t0
    return summary


def _supports_streaming_repartition(ds: Any) -> bool:
    import inspect

    try:
        return "target_num_rows_per_block" in inspect.signature(ds.repartition).parameters
    except (TypeError, ValueError):
        return False


def _use_gpus(ray: Any, device: str | None) -> bool:
    """One GPU per actor when the cluster has GPUs (unless the job says ``device: cpu``)."""
    if device is not None and not str(device).startswith("cuda"):
        return False
    gpus = ray.cluster_resources().get("GPU", 0)
    if device is not None and gpus <= 0:
        raise PrefillOnlyError(f"engine.device: {device!r} asked for, but the Ray cluster has no GPUs")
    return gpus > 0


def _pipeline(
    ray: Any,
    units: list[_Unit],
    files: list[InputFile],
    worker_spec: dict[str, Any],
    spec: JobSpec,
    input_has_id: bool,
    done: set[int],
    dtype: str,
    num_workers: int,
    on_gpu: bool,
    progress: bool,
) -> Iterator[Any]:
    """read -> map_batches(EngineActor): a stream of pyarrow result batches, in input order."""
    from ray.data import DataContext

    ctx = DataContext.get_current()  # datasets copy it when created; restored below for the caller's
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True  # the driver writes shard after shard
    ctx.enable_progress_bars = False  # our own bar counts rows
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    if not progress:
        data_logger.setLevel(logging.WARNING)
    try:
        items = [
            {"file_index": u.file_index, "base": u.base, "start": u.start, "stop": -1 if u.stop is None else u.stop}
            for u in units
        ]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            _Reader(worker_spec, files, input_has_id, frozenset(done)),
            batch_size=1,
            batch_format="numpy",
            num_cpus=0.5,
        )
        if _supports_streaming_repartition(ds):  # batch-sized blocks spread one big file over every actor
            ds = ds.repartition(target_num_rows_per_block=spec.batch_rows)
        if on_gpu:
            resources: dict[str, Any] = {"num_gpus": 1}
            cpu_threads = None
        else:  # CPU actors split this machine's cores (a local instance); one Ray CPU each
            resources = {"num_cpus": 1}
            cpu_threads = max(1, (os.cpu_count() or 1) // num_workers)
        ds = ds.map_batches(
            EngineActor,
            fn_constructor_kwargs={"spec": worker_spec, "expected_dtype": dtype, "cpu_threads": cpu_threads},
            batch_size=spec.batch_rows,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=num_workers),
            **resources,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        data_logger.setLevel(saved_level)


class _Sink:
    """The write stage: result rows -> the same ShardWriters (and files) as the single-process run."""

    def __init__(
        self,
        spec: JobSpec,
        files: list[InputFile],
        total: int | None,
        summary: JobSummary,
        schema_hint: Any,
        fsync: bool,
    ) -> None:
        self.spec = spec
        self.files = files
        self.total = total
        self.summary = summary
        self.schema_hint = schema_hint
        self.fsync = fsync
        self.writers: dict[int, ShardWriter] = {}

    def _size(self, shard: int) -> int:
        r = self.spec.rows_per_shard
        return r if self.total is None else min(r, self.total - shard * r)

    def add(self, batch: Any) -> None:
        summary = self.summary
        cols = batch.to_pydict()
        for pos, fi, ri, payload in zip(cols["position"], cols["file_index"], cols["row_index"], cols[_PAYLOAD]):
            if pos == _FATAL:
                raise PrefillOnlyError(pickle.loads(payload))
            row_id, item = pickle.loads(payload)
            shard = pos // self.spec.rows_per_shard
            writer = self.writers.get(shard)
            if writer is None:
                writer = self.writers[shard] = ShardWriter(
                    self.spec.output,
                    shard,
                    self.spec.output_format,
                    max_buffered_rows=self.spec.max_buffered_rows,
                    schema_hint=self.schema_hint,
                    fsync=self.fsync,
                )
            write_row(writer, summary, row_id, Position(fi, ri, pos), self.files[fi].name, item)
            summary.rows += 1
            if writer.results + writer.errors == self._size(shard):
                self._commit(shard)

    def _commit(self, shard: int) -> None:
        self.schema_hint = commit_shard(self.writers.pop(shard), self.summary, self.schema_hint)

    def finish(self) -> None:
        """Commit the last, short shard of an input whose length was not known in advance."""
        if (self.total is not None and self.writers) or len(self.writers) > 1:
            counts = {k: w.results + w.errors for k, w in self.writers.items()}
            raise RuntimeError(f"internal error: shards {counts} (rows received) ended incomplete; rerun to resume")
        for shard in list(self.writers):
            self._commit(shard)

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()
