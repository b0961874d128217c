"""Helpers for tests that run the CLIs."""

from __future__ import annotations

from typing import Any


def assert_refused(result: Any, *words: str) -> str:
    """A clean refusal: exit 2, ``error:`` + ``fix:``, no traceback, each of ``words`` in the
    output; returns the output on one line."""
    out = result.output.replace("\n", " ")
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "error:" in out and "fix:" in out and "Traceback" not in out, result.output
    for w in words:
        assert w in out, (w, result.output)
    return out
