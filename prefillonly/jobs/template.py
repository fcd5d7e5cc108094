"""Prompt templates: ``"Review: {text}\\nSentiment:"`` filled from one input row.

Fields name columns literally (``{my col}``, ``{a.b}`` are columns called ``my col`` and
``a.b``), because data files rarely have Python-identifier column names and attribute or
index lookups would only ever surprise. ``{{`` and ``}}`` are literal braces. A format
spec (``{score:.2f}``) is applied with :func:`format`, a conversion (``{x!r}``) too.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError


class FillError(Exception):
    """A row cannot fill the template (column missing or null); it becomes an error row, not a crash."""


@dataclass(frozen=True)
class _Field:
    column: str
    conversion: str | None
    format_spec: str


class Template:
    """A parsed prompt template. Parsing once keeps per-row filling to string joins."""

    def __init__(self, text: str, *, field: str = "prompt") -> None:
        if not isinstance(text, str):
            raise InvalidRequestError(field, f"must be a string, got {type(text).__name__}")
        self.text = text
        self._parts: list[str | _Field] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise InvalidRequestError(
                field, f"malformed template ({e}); write literal braces as {{{{ and }}}}"
            ) from None
        for literal, name, format_spec, conversion in parsed:
            if literal:
                self._parts.append(literal)
            if name is None:
                continue
            if name == "" or name.isdigit():
                raise InvalidRequestError(
                    field, "template fields must name a column, like {text}; positional fields {} / {0} are not allowed"
                )
            if format_spec and ("{" in format_spec):
                raise InvalidRequestError(field, f"nested fields in the format spec of {{{name}}} are not supported")
            self._parts.append(_Field(name, conversion, format_spec or ""))

    @property
    def columns(self) -> list[str]:
        """Columns the template reads, in first-use order, without duplicates."""
        seen: dict[str, None] = {}
        for part in self._parts:
            if isinstance(part, _Field):
                seen.setdefault(part.column)
        return list(seen)

    def fill(self, row: Mapping[str, Any]) -> str:
        """The prompt for ``row``. Raises :class:`FillError` when a field is absent or null."""
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            try:
                value = row[part.column]
            except KeyError:
                raise FillError(f"missing column {part.column!r} used by the prompt template") from None
            if value is None:
                raise FillError(f"column {part.column!r} is null; the prompt template needs it")
            if part.conversion == "r":
                value = repr(value)
            elif part.conversion == "a":
                value = ascii(value)
            elif part.conversion == "s":
                value = str(value)
            if part.format_spec:
                try:
                    out.append(format(value, part.format_spec))
                except (ValueError, TypeError) as e:
                    raise FillError(
                        f"column {part.column!r}: value {value!r} does not fit format {part.format_spec!r} ({e})"
                    ) from None
            else:
                out.append(value if isinstance(value, str) else str(value))
        return "".join(out)
