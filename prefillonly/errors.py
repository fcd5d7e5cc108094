"""Typed errors. Every message names the bad input and says what to do about it."""

from __future__ import annotations


class PrefillOnlyError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidRequestError(PrefillOnlyError, ValueError):
    """One request (or one argument of a call) is unusable.

    ``field`` names the offending argument or request field, so that servers and
    batch jobs can report it without parsing the message.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class PromptTooLongError(InvalidRequestError):
    """A request has more tokens than ``max_model_len`` and no ``truncate`` was given."""


class ImageError(InvalidRequestError):
    """An image could not be fetched, decoded or accepted (too large, empty, corrupt)."""


class CheckpointError(PrefillOnlyError, OSError):
    """A model directory is missing files, has corrupt files, or an unsupported architecture."""


class OutOfMemoryError(PrefillOnlyError, RuntimeError):
    """One request did not fit in device memory even when run alone."""
