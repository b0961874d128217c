"""Errors that name the problem and the fix."""

from __future__ import annotations


class ScdmError(Exception):
    """A user-facing error: what is wrong and how to fix it.

    The CLIs print ``str(err)`` without a traceback and exit with status 2.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


class InputError(ScdmError):
    """The input AnnData cannot be used as it is."""


class StoreError(ScdmError):
    """The store does not hold what was asked for, or would be damaged by the request."""


class StaleCacheError(StoreError):
    """The store holds embeddings computed from another input or checkpoint."""


class CheckpointError(ScdmError):
    """A model checkpoint is missing files or does not match the model's layout."""
