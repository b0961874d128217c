"""What both CLIs share: turning user errors into a clear message and exit status 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from ._errors import ScdmError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def make_console() -> Console:
    """stdout console: terminal width in a terminal, 160 columns when piped (logs, make)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print :class:`ScdmError` as ``error: ...`` + ``fix: ...`` (no traceback) and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ScdmError as e:
            err_console.print(f"[bold red]error:[/] {e.problem}")
            if e.fix:
                err_console.print(f"[bold]fix:[/] {e.fix}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: finished chunks are saved; re-run the same command to resume")
            sys.exit(130)

    return wrapper


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["layer=-2", "pooling=cls"]`` -> ``{"layer": -2, "pooling": "cls"}`` (ints/floats/bools parsed)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ScdmError(f"model option {item!r} is not KEY=VALUE", "write it like --option layer=-2")
        k, v = item.split("=", 1)
        val: Any = v
        if v.lower() in ("true", "false"):
            val = v.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    val = cast(v)
                    break
                except ValueError:
                    pass
        out[k.strip().replace("-", "_")] = val
    return out
