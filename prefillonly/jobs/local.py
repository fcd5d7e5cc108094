"""Run a job on one engine in this process (or as worker ``rank`` of ``world``)."""

from __future__ import annotations

from .engine_processor import EngineProcessor, engine_kwargs
from .runner import JobSummary, run_job
from .spec import JobSpec


def load_engine(spec: JobSpec, rank: int = 0):
    from ..default_model import default_model_path
    from ..llm import LLM
    from .parallel import worker_device

    kwargs = engine_kwargs(spec)
    kwargs["device"] = worker_device(rank, kwargs.get("device"))
    model = spec.model or str(default_model_path())
    return LLM(model, use_tqdm=False, **kwargs)


def run_local(spec: JobSpec, progress: bool = True, rank: int = 0, world: int = 1) -> JobSummary:
    llm = load_engine(spec, rank)
    processor = EngineProcessor(llm, spec)
    extra = {"dtype": str(llm.dtype)}
    shard_filter = None if world == 1 else (lambda k: k % world == rank)
    return run_job(spec, processor, progress=progress, shard_filter=shard_filter, fingerprint_extra=extra)
