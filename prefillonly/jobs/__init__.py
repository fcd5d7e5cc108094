"""Batch jobs over files: read rows, build requests, run a processor, write sharded output.

This layer knows nothing about the engine: the engine plugs in as a :data:`Processor`.
See :mod:`.runner` for the resume guarantees and :mod:`.writers` for the output schema.
"""

from .readers import InputFile, Position, RawRow, iter_batches, resolve_inputs
from .runner import JobSummary, Processor, run_job
from .spec import JobSpec

__all__ = [
    "InputFile",
    "JobSpec",
    "JobSummary",
    "Position",
    "Processor",
    "RawRow",
    "iter_batches",
    "resolve_inputs",
    "run_job",
]
