"""What a batch job does: ``JobSpec``, loaded from a small YAML/JSON job file plus CLI overrides.

The spec is validated when it is built, so a typo fails in the first second with the field
named, not an hour into a run. Checks that need the data (does the template's ``{column}``
exist?) are in :meth:`JobSpec.check_columns`, called by the runner once it has peeked at
the input.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError
from .template import Template

TASKS = ("classify", "score", "embed", "next_token")
INPUT_FORMATS = ("jsonl", "csv", "parquet")
OUTPUT_FORMATS = ("parquet", "jsonl")

#: Extension -> input format. ``.json`` is read as JSON Lines (one object per line).
#: ``.gz`` may follow a ``jsonl``/``csv`` extension.
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}

#: Column names the output always has; result columns may not reuse them.
RESERVED_OUTPUT_COLUMNS = ("id", "position")

#: Fields that change what the output holds. A resumed run must agree on all of them;
#: batch sizes and paths may change between runs.
FINGERPRINT_FIELDS = (
    "input_format",
    "output_format",
    "id_column",
    "prompt",
    "messages_column",
    "task",
    "task_options",
    "image_columns",
    "rows_per_shard",
    "model",
)


def format_for_path(path: str | os.PathLike[str]) -> str | None:
    """The input format implied by a file name, or None when the extension is unknown."""
    name = os.path.basename(os.fspath(path)).lower()
    if name.endswith(".gz"):
        fmt = EXTENSIONS.get(os.path.splitext(name[:-3])[1])
        return fmt if fmt in ("jsonl", "csv") else None
    return EXTENSIONS.get(os.path.splitext(name)[1])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class JobSpec:
    """One batch job: where rows come from, how each becomes a request, where results go.

    Exactly one of ``prompt`` (a template such as ``"Review: {text}"``) or
    ``messages_column`` (a column holding chat messages, as a list or a JSON string) says
    how a row becomes a request.
    """

    input: str
    """A file, a glob (``data/*.jsonl``, ``**`` allowed) or a directory (read recursively)."""
    output: str
    """Output directory; shards ``part-NNNNNN.<fmt>`` and ``_errors/part-NNNNNN.jsonl`` go here."""
    task: str
    """One of ``classify``, ``score``, ``embed``, ``next_token``."""
    prompt: str | None = None
    messages_column: str | None = None
    input_format: str | None = None
    """``jsonl``, ``csv`` or ``parquet``; None picks it per file from the extension."""
    output_format: str = "parquet"
    id_column: str | None = None
    """Column holding row ids. None: use ``id`` when the input has it, else the row's
    global position. A column named explicitly must exist."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Passed to the processor as is (labels, instruction, query, dimensions, normalize, top_k, ...)."""
    image_columns: list[str] = field(default_factory=list)
    rows_per_shard: int = 10_000
    batch_rows: int = 1024
    """Rows handed to the processor per call (fewer when some rows are unreadable)."""
    max_buffered_rows: int = 10_000
    """Result rows held in memory before they are flushed into the shard being written
    (one Parquet row group each; JSONL rows go straight to the shard's temp file). Memory
    is bounded by about this many results plus two input batches, whatever the input size."""
    model: str | None = None
    """For the CLI; part of the fingerprint so a resume with another model is refused."""
    engine: dict[str, Any] = field(default_factory=dict)
    """Free-form engine settings for the CLI; not part of the fingerprint."""

    def __post_init__(self) -> None:
        if isinstance(self.image_columns, str):
            self.image_columns = [self.image_columns]
        elif isinstance(self.image_columns, (tuple, list)):
            self.image_columns = list(self.image_columns)
        if self.task_options is None:
            self.task_options = {}
        if self.engine is None:
            self.engine = {}
        self.validate()

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Check every field on its own; raises InvalidRequestError naming the field."""
        for name in ("input", "output"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                setattr(self, name, value)
            if not isinstance(value, str) or not value.strip():
                raise InvalidRequestError(name, "required: give a path")
        if self.task not in TASKS:
            raise InvalidRequestError("task", f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.input_format is not None and self.input_format not in INPUT_FORMATS:
            raise InvalidRequestError(
                "input_format",
                f"unknown format {self.input_format!r}; choose one of {', '.join(INPUT_FORMATS)} (or leave it out to use the extension)",
            )
        if self.output_format not in OUTPUT_FORMATS:
            raise InvalidRequestError(
                "output_format", f"unknown format {self.output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}"
            )
        if (self.prompt is None) == (self.messages_column is None):
            raise InvalidRequestError(
                "prompt",
                "give exactly one of 'prompt' (a template like \"Review: {text}\") or 'messages_column' (a column of chat messages)",
            )
        if self.prompt is not None:
            template = Template(self.prompt, field="prompt")
            if not template.columns and not self.image_columns:
                raise InvalidRequestError(
                    "prompt", "template has no {column} fields, so every row would get the same prompt; add e.g. {text}"
                )
        for name in ("messages_column", "id_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequestError(name, f"must be a non-empty column name, got {value!r}")
        if not all(isinstance(c, str) and c for c in self.image_columns):
            raise InvalidRequestError("image_columns", f"must be a list of column names, got {self.image_columns!r}")
        if not isinstance(self.task_options, dict):
            raise InvalidRequestError("task_options", f"must be a mapping, got {type(self.task_options).__name__}")
        if not isinstance(self.engine, dict):
            raise InvalidRequestError("engine", f"must be a mapping, got {type(self.engine).__name__}")
        if self.model is not None and not isinstance(self.model, str):
            raise InvalidRequestError("model", f"must be a string, got {type(self.model).__name__}")
        for name in ("rows_per_shard", "batch_rows", "max_buffered_rows"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise InvalidRequestError(name, f"must be a positive integer, got {value!r}")
        if self.max_buffered_rows < self.batch_rows:
            raise InvalidRequestError(
                "max_buffered_rows", f"({self.max_buffered_rows}) must be at least batch_rows ({self.batch_rows})"
            )
        self._validate_task_options()

    def _validate_task_options(self) -> None:
        """Type-check the options this layer knows; others pass through for the engine to judge."""
        opts = self.task_options
        where = "task_options"
        labels = opts.get("labels")
        if self.task == "classify" and labels is None:
            raise InvalidRequestError(f"{where}.labels", "classify needs a list of labels, e.g. [positive, negative]")
        if labels is not None:
            if (
                not isinstance(labels, (list, tuple))
                or len(labels) < 2
                or not all(isinstance(x, str) and x for x in labels)
            ):
                raise InvalidRequestError(
                    f"{where}.labels", f"must be a list of at least 2 non-empty strings, got {labels!r}"
                )
            dupes = sorted({x for x in labels if list(labels).count(x) > 1})
            if dupes:
                raise InvalidRequestError(f"{where}.labels", f"duplicate labels: {', '.join(dupes)}")
            opts["labels"] = list(labels)
        for name in ("instruction", "query"):
            if name in opts and not isinstance(opts[name], str):
                raise InvalidRequestError(f"{where}.{name}", f"must be a string, got {type(opts[name]).__name__}")
        for name in ("dimensions", "top_k"):
            if name in opts and opts[name] is not None and (not _is_int(opts[name]) or opts[name] < 1):
                raise InvalidRequestError(f"{where}.{name}", f"must be a positive integer, got {opts[name]!r}")
        if "normalize" in opts and not isinstance(opts["normalize"], bool):
            raise InvalidRequestError(f"{where}.normalize", f"must be true or false, got {opts['normalize']!r}")

    def check_columns(self, available: Iterable[str], *, source: str = "the input") -> None:
        """Check the columns the spec reads against those the input has.

        Raises InvalidRequestError naming the spec field and listing the available columns.
        """
        have = list(available)
        have_set = set(have)

        def fail(field_name: str, column: str) -> None:
            close = difflib.get_close_matches(column, have, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listing = ", ".join(have) if have else "(none)"
            raise InvalidRequestError(field_name, f"unknown column {column!r}{hint}; {source} has columns: {listing}")

        if self.prompt is not None:
            for column in Template(self.prompt).columns:
                if column not in have_set:
                    fail("prompt", column)
        if self.messages_column is not None and self.messages_column not in have_set:
            fail("messages_column", self.messages_column)
        if self.id_column is not None and self.id_column not in have_set:
            fail("id_column", self.id_column)
        for column in self.image_columns:
            if column not in have_set:
                fail("image_columns", column)

    # ------------------------------------------------------------------ derived

    @property
    def template(self) -> Template | None:
        return Template(self.prompt) if self.prompt is not None else None

    def needed_columns(self) -> list[str]:
        """Input columns the job reads (readers drop the rest to save memory)."""
        cols: dict[str, None] = {}
        if self.prompt is not None:
            for c in Template(self.prompt).columns:
                cols.setdefault(c)
        if self.messages_column is not None:
            cols.setdefault(self.messages_column)
        for c in self.image_columns:
            cols.setdefault(c)
        cols.setdefault(self.id_column or "id")
        return list(cols)

    def fingerprint(self) -> dict[str, Any]:
        """The fields a resumed run must agree on, as plain JSON-able data."""
        return json.loads(json.dumps({k: getattr(self, k) for k in FINGERPRINT_FIELDS}, sort_keys=True, default=str))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Build from a mapping; unknown keys are refused (with a did-you-mean)."""
        if not isinstance(data, Mapping):
            raise InvalidRequestError("job", f"must be a mapping of fields, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InvalidRequestError(str(key), f"unknown job field{hint}; known fields: {', '.join(known)}")
        for key in ("input", "output", "task"):
            if data.get(key) in (None, ""):
                raise InvalidRequestError(key, "required")
        return cls(**dict(data))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> JobSpec:
        """Load a job file (``.json`` always; ``.yaml``/``.yml`` when PyYAML is installed).

        Relative ``input``/``output`` paths in the file are relative to the file's folder,
        so a job file works from any working directory. ``overrides`` (CLI flags) win over
        the file; None values are ignored, and ``task_options``/``engine`` are merged key by
        key rather than replaced.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise InvalidRequestError("job_file", f"cannot read {str(p)!r}: {e.strerror or e}") from None
        suffix = p.suffix.lower()
        if suffix in (".yaml", ".yml"):
            data = _load_yaml(text, p)
        elif suffix == ".json":
            data = _load_json(text, p)
        else:
            try:
                data = json.loads(text)
            except ValueError:
                data = _load_yaml(text, p)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise InvalidRequestError(
                "job_file", f"{str(p)!r} must hold a mapping of job fields, got {type(data).__name__}"
            )
        for key in ("input", "output"):
            value = data.get(key)
            if isinstance(value, str) and value:
                value = os.path.expanduser(value)
                if not os.path.isabs(value):
                    value = os.path.join(p.parent, value)
                data[key] = value
        for key, value in overrides.items():
            if value is None:
                continue
            if key in ("task_options", "engine") and isinstance(value, Mapping) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return cls.from_dict(data)


def _load_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise InvalidRequestError("job_file", f"{str(path)!r} is not valid JSON: {e}") from None


def _load_yaml(text: str, path: Path) -> Any:
    try:
        import yaml  # optional dependency
    except ImportError:
        raise InvalidRequestError(
            "job_file",
            f"{str(path)!r} looks like YAML but PyYAML is not installed; pip install pyyaml, or write the job as JSON",
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidRequestError("job_file", f"{str(path)!r} is not valid YAML: {e}") from None
