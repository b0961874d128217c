"""Typed, declared model options (``--option KEY=VALUE`` / ``Adapter(ckpt, **options)``).

Each adapter lists its options once, as ``options_spec`` (a tuple of :class:`Option`);
:func:`resolve_options` turns what the user gave (strings from the CLI, typed values from
Python) into a dict holding EVERY declared option, defaults filled in, so that provenance
records what really ran. Unknown keys and values of the wrong type are refused with an
:class:`~scdm_embed.errors.ScdmError` that names the key and lists the valid options.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ScdmError

#: the types an option can have; ``Path`` values are kept as ``str`` (JSON-able provenance)
OPTION_TYPES: tuple[type, ...] = (bool, int, float, str, Path)
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_NONE = ("none", "null")


@dataclass(frozen=True)
class Option:
    """One declared model option.

    ``type`` is ``bool``, ``int``, ``float``, ``str`` or ``Path`` (a file or folder path,
    resolved to ``str``). ``default=None`` means "unset" (the adapter decides, e.g. from the
    checkpoint) and makes ``None`` an accepted value. ``choices`` restricts the value
    (strings match case-insensitively and become the declared spelling). ``check`` returns
    ``None`` when a value is fine, else what it must be (e.g. ``"must be >= 1"``).
    ``aliases`` maps words accepted in place of a value (case-insensitive), e.g.
    ``{"e": None}`` for a natural-log base.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    aliases: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in OPTION_TYPES:
            raise TypeError(f"option {self.name!r}: type must be one of {[t.__name__ for t in OPTION_TYPES]}")
        if not self.help:
            raise TypeError(f"option {self.name!r} needs a help text")

    @property
    def type_name(self) -> str:
        """``bool``, ``int``, ``float``, ``str`` or ``path``."""
        return "path" if self.type is Path else self.type.__name__

    @property
    def nullable(self) -> bool:
        """Whether ``None`` is a valid value (the default is ``None``, or an alias means ``None``)."""
        return self.default is None or any(v is None for v in self.aliases.values())

    def describe(self) -> str:
        """``name (type, default X)``, with the choices when there are some."""
        extra = f", one of {'/'.join(map(str, self.choices))}" if self.choices else ""
        return f"{self.name} ({self.type_name}, default {_show(self.default)}{extra})"

    def coerce(self, value: Any) -> Any:
        """The value as this option's type; raises ``ValueError`` saying what is expected."""
        if value is None:
            if self.nullable:
                return None
            raise ValueError(f"needs a value ({self.type_name})")
        if isinstance(value, str):
            word = value.strip().lower()
            for k, v in self.aliases.items():
                if k.lower() == word:
                    return v
            if self.nullable and self.type not in (str, Path) and word in _NONE:
                return None
        out = _COERCE[self.type](value)
        if self.choices is not None:
            out = self._choice(out)
        if self.check is not None:
            complaint = self.check(out)
            if complaint:
                raise ValueError(complaint)
        return out

    def _choice(self, value: Any) -> Any:
        for c in self.choices or ():
            if value == c or (isinstance(value, str) and isinstance(c, str) and value.lower() == c.lower()):
                return c
        raise ValueError(f"must be one of {', '.join(map(str, self.choices or ()))}")


# -- coercion --------------------------------------------------------------------------------
def _to_bool(v: Any) -> bool:
    if isinstance(v, bool) or type(v).__name__ == "bool_":  # numpy bools too
        return bool(v)
    if isinstance(v, str):
        s = v.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
    elif isinstance(v, numbers.Integral) and int(v) in (0, 1):
        return bool(int(v))
    raise ValueError("is not true/false (use true, false, yes, no, 1 or 0)")


def _to_int(v: Any) -> int:
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        raise ValueError("is not an integer (a bool was given)")
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, str):
        s = v.strip()
        try:
            return int(s)
        except ValueError:
            try:
                v = float(s)
            except ValueError:
                raise ValueError("is not an integer") from None
    if isinstance(v, numbers.Real) and math.isfinite(float(v)) and float(v).is_integer():
        return int(v)
    raise ValueError("is not an integer")


def _to_float(v: Any) -> float:
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        raise ValueError("is not a number (a bool was given)")
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            pass
    raise ValueError("is not a number")


def _to_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    raise ValueError("is not a string")


def _to_path(v: Any) -> str:
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if isinstance(v, str) and v.strip():
        return v
    raise ValueError("is not a path")


_COERCE: dict[type, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str,
                                            Path: _to_path}


# -- checks ----------------------------------------------------------------------------------
def at_least(lo: float) -> Callable[[Any], str | None]:
    """``check``: the value is ``>= lo``."""
    return lambda v: None if v >= lo else f"must be >= {lo:g}"


def greater_than(lo: float) -> Callable[[Any], str | None]:
    """``check``: the value is ``> lo``."""
    return lambda v: None if v > lo else f"must be > {lo:g}"


# -- resolution ------------------------------------------------------------------------------
def valid_options(specs: Iterable[Option]) -> str:
    """The fix text listing every option: ``valid options: a (int, default 1), ...``."""
    specs = tuple(specs)
    if not specs:
        return "this model takes no options: drop --option"
    return "valid options: " + "; ".join(s.describe() for s in specs) + " (scdm-embed list-models --options)"


def resolve_options(model_name: str, specs: Iterable[Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared option, typed, from ``given`` (strings or typed values) and the defaults.

    Raises :class:`ScdmError` naming the key for an unknown option (suggesting the closest
    name) or a value that is not of the option's type / choices / range.
    """
    specs = tuple(specs)
    by_name = {s.name: s for s in specs}
    out: dict[str, Any] = {s.name: s.default for s in specs}
    for raw_key, value in given.items():
        key = str(raw_key).strip().replace("-", "_")
        spec = by_name.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, list(by_name), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ScdmError(f"unknown {model_name} option {key!r}{hint}", valid_options(specs))
        try:
            out[key] = spec.coerce(value)
        except ValueError as err:
            raise ScdmError(f"{model_name} option {key}={_show(value)} {err}",
                            valid_options(specs)) from None
    return out


def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


__all__ = ["OPTION_TYPES", "Option", "at_least", "greater_than", "resolve_options", "valid_options"]
