"""Turn one input row into one processor request (or the reason it cannot be one).

Per-row problems — a template column missing or null, messages that are not a list of
chat messages, an empty image cell, a missing id — become error rows here, before the
processor is called, so one odd row never stops a job of millions.
"""

from __future__ import annotations

import json
from typing import Any

from .readers import RawRow
from .spec import JobSpec
from .template import FillError

#: What the processor receives per row. Keys: ``id``, ``position`` (global row number),
#: then ``text`` (filled template) or ``messages`` (list of {"role", "content", ...}),
#: and ``images`` (a list, one value per image column: path, URL, bytes or
#: {"bytes"/"path"} dict as stored) when the spec has image columns.
Request = dict[str, Any]


def _normalize_id(value: Any) -> Any:
    """Ids are ints or strings, so that every shard's ``id`` column has one type."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return str(value)


class RequestBuilder:
    """Builds requests for one job.

    ``input_has_id`` says whether the input has the id column: if it does, every row must
    carry a non-empty id; if not, ids are global row numbers.
    """

    def __init__(self, spec: JobSpec, *, input_has_id: bool) -> None:
        self.template = spec.template
        self.messages_column = spec.messages_column
        self.image_columns = list(spec.image_columns)
        self.id_column = spec.id_column or "id"
        self.use_id_column = input_has_id or spec.id_column is not None

    def row_id(self, raw: RawRow) -> Any:
        """The id of a row, or its global position when it has none (or could not be read)."""
        if raw.data is not None and self.use_id_column:
            value = raw.data.get(self.id_column)
            if value is not None and value != "":
                return _normalize_id(value)
        return raw.position.row

    def build(self, raw: RawRow) -> tuple[Any, Request | str]:
        """``(id, request)`` or ``(id, reason)``."""
        row_id = self.row_id(raw)
        if raw.error is not None:
            return row_id, raw.error
        data = raw.data or {}
        if self.use_id_column and data.get(self.id_column) in (None, ""):
            return row_id, f"missing id: column {self.id_column!r} is absent or empty"
        request: Request = {"id": row_id, "position": raw.position.row}
        if self.template is not None:
            try:
                request["text"] = self.template.fill(data)
            except FillError as e:
                return row_id, str(e)
        else:
            col = self.messages_column
            assert col is not None
            messages = data.get(col)
            if messages is None:
                return row_id, f"missing column {col!r} (messages_column)"
            if isinstance(messages, (str, bytes)):
                try:
                    messages = json.loads(messages)
                except ValueError as e:
                    return row_id, f"column {col!r}: not a JSON list of messages: {e}"
            if (
                not isinstance(messages, list)
                or not messages
                or not all(isinstance(m, dict) and "role" in m for m in messages)
            ):
                return row_id, f'column {col!r}: expected a non-empty list of {{"role": ..., "content": ...}} messages'
            request["messages"] = messages
        if self.image_columns:
            images = []
            for col in self.image_columns:
                value = data.get(col)
                if value is None or value == "" or value == b"":
                    return row_id, f"column {col!r} has no image"
                images.append(value)
            request["images"] = images
        return row_id, request
