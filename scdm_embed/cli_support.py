"""What both CLIs share: turning user errors into a clear message and exit status 2."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from .errors import ScdmError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def make_console() -> Console:
    """stdout console: terminal width in a terminal, 160 columns when piped (logs, make)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


#: the advice printed for an operating-system error, by errno
_OS_FIXES: dict[int, str] = {
    errno.ENOSPC: "free some disk space (or point --store / --out at a disk with room), then re-run the same command",
    errno.EDQUOT: "the disk quota is used up: free some space or use another location, then re-run the same command",
    errno.EACCES: "check the permissions of that path, or use a location you can read and write",
    errno.EPERM: "check the permissions of that path, or use a location you can read and write",
    errno.EROFS: "that file system is read-only: point --store / --out at a writable location",
    errno.ENOENT: "check that the path (and every folder above it) exists",
    errno.ENOTDIR: "a part of that path is a file, not a folder: check the path",
    errno.EISDIR: "that path is a folder where a file is expected: check the path",
    errno.EEXIST: "that path already exists: remove it or choose another",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or close other programs, then re-run",
    errno.ENFILE: "too many open files: raise the limit (ulimit -n) or close other programs, then re-run",
    errno.EIO: "the disk reported an input/output error: check the disk and the file, then re-run",
    errno.ENAMETOOLONG: "use a shorter path",
}
_OS_DEFAULT_FIX = "check the path, its permissions and the free disk space, then re-run the same command"


def os_error_message(e: OSError) -> tuple[str, str]:
    """``(problem, fix)`` for an :class:`OSError`: ``"<strerror> (<filename>)"`` and the advice for its errno."""
    problem = e.strerror or str(e) or type(e).__name__
    names = [str(f) for f in (e.filename, e.filename2) if f is not None]
    if names:
        problem += f" ({' -> '.join(names)})"
    return problem, _OS_FIXES.get(e.errno, _OS_DEFAULT_FIX) if e.errno is not None else _OS_DEFAULT_FIX


def _print_error(problem: str, fix: str | None) -> None:
    err_console.print(f"[bold red]error:[/] {escape(problem)}")
    if fix:
        err_console.print(f"[bold]fix:[/] {escape(fix)}")


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print :class:`ScdmError` as ``error: ...`` + ``fix: ...`` (no traceback) and exit 2.

    An :class:`OSError` that reaches the CLI (full disk, no permission, read-only file system,
    missing path, ...) is the last line of defence: ``error: <strerror> (<filename>)`` and a fix
    for its errno, exit 2 (``SCDM_DEBUG=1`` re-raises it with its traceback). Any other exception
    is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ScdmError as e:
            _print_error(e.problem, e.fix)
            raise typer.Exit(2) from None
        except OSError as e:
            if os.environ.get("SCDM_DEBUG"):
                raise
            _print_error(*os_error_message(e))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: finished chunks are saved; re-run the same command to resume")
            sys.exit(130)

    return wrapper


def parse_options(items: list[str] | None) -> dict[str, str]:
    """``["layer=-2", "pooling=cls"]`` -> ``{"layer": "-2", "pooling": "cls"}``.

    Values stay strings: each model's declared options type them (``models/_options.py``).
    Keys are stripped and ``-`` becomes ``_``.
    """
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ScdmError(f"model option {item!r} is not KEY=VALUE", "write it like --option layer=-2")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v
    return out
