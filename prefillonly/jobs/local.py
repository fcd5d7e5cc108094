"""Run a job on one engine in this process (or as worker ``rank`` of ``world``)."""

from __future__ import annotations

import os

from ..errors import InvalidRequestError
from .engine_processor import EngineProcessor, check_job, engine_kwargs
from .readers import InputFile, probe_columns, resolve_inputs
from .runner import JobSummary, run_job
from .spec import JobSpec
from .writers import warm_up


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


def load_engine(spec: JobSpec, rank: int = 0):
    from ..default_model import default_model_path
    from ..llm import LLM
    from .parallel import worker_device

    kwargs = engine_kwargs(spec)
    kwargs["device"] = worker_device(rank, kwargs.get("device"))
    model = spec.model or str(default_model_path())
    return LLM(model, use_tqdm=False, **kwargs)


def fingerprint_extra(llm) -> dict[str, str]:
    """Engine settings that change results; a resumed job must agree on them (any runner)."""
    return {"dtype": str(llm.dtype)}


def run_local(spec: JobSpec, progress: bool = True, rank: int = 0, world: int = 1) -> JobSummary:
    check_job(spec)  # option typos and data mistakes fail before the model loads
    check_input(spec)
    warm_up(spec.output_format)  # the writer's imports, behind the model load
    llm = load_engine(spec, rank)
    processor = EngineProcessor(llm, spec)
    shard_filter = None if world == 1 else (lambda k: k % world == rank)
    return run_job(spec, processor, progress=progress, shard_filter=shard_filter, fingerprint_extra=fingerprint_extra(llm))
