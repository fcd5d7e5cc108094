"""Run a job on one engine in this process (or as worker ``rank`` of ``world``)."""

from __future__ import annotations

from .engine_processor import EngineProcessor, check_job, engine_kwargs
from .runner import JobSummary, check_input, run_job
from .spec import JobSpec
from .writers import warm_up


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
