"""Safe reading of every file format a checkpoint folder may hold.

A checkpoint folder is downloaded from the internet, so nothing in it may run code when it is
read. Pickles (Geneformer's dictionaries, UCE's ``species_offsets.pkl``) go through a
restricted unpickler that rebuilds only plain containers, strings, numbers and numpy
scalars/arrays/dtypes; torch files go through ``torch.load(weights_only=True)``. Anything else
is refused with a :class:`CheckpointError` naming the file and the refused global, BEFORE it
runs. Full unpickling happens only with an explicit opt-in (``trust=True``, the
``--trust-checkpoint`` flag), and then a warning is logged.
"""

from __future__ import annotations

import _compat_pickle
import io
import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

#: the fix printed whenever a file is refused as unsafe
TRUST_FIX = ("re-download it from the official source; only if you are certain this is the authors' file, "
             "pass --trust-checkpoint")
_REDOWNLOAD = "re-download it from the official source"

#: (module, name) pairs a checkpoint pickle may reference: plain containers and values, and the
#: globals numpy uses to pickle scalars, arrays and dtypes (``numpy.core`` is numpy 1's name of
#: ``numpy._core``). Nothing here can run code or touch the file system.
_SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
                               "int", "float", "complex", "bool", "slice", "range")}
    | {("collections", "OrderedDict"), ("collections", "defaultdict"), ("_codecs", "encode")}
    | {(f"numpy.{core}.{mod}", name)
       for core in ("core", "_core")
       for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}
    | {("numpy", "ndarray"), ("numpy", "dtype")}
)
#: numpy 2 moved ``numpy.core`` to ``numpy._core`` (the old name warns on access)
_NUMPY_CORE = "numpy._core" if hasattr(np, "_core") else "numpy.core"


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` admits only :data:`_SAFE_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (``__builtin__.set`` in protocol 2), mapped as the base class does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in _SAFE_GLOBALS:
            raise _Refused(f"{module}.{name}")
        if module.startswith(("numpy.core.", "numpy._core.")):
            module = _NUMPY_CORE + module[module.index(".", len("numpy.")):]
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"persistent id {str(pid)[:40]!r}")


class _Refused(pickle.UnpicklingError):
    """A global (or persistent id) the restricted unpickler will not resolve."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(what)


def _refusal(path: Path, what: str, fix: str = TRUST_FIX) -> CheckpointError:
    return CheckpointError(
        f"{str(path)!r} is not a plain data file: it asks to load {what}, which could run code "
        "(refused; nothing in it was run)", fix)


def _warn_trusted(path: Path) -> None:
    log.warning("--trust-checkpoint: reading %s with full unpickling (any code in the file runs)", path)


def read_pickle(path: str | Path, *, trust: bool = False, what: str = "") -> Any:
    """Unpickle ``path`` with only plain containers, numbers, strings and numpy values allowed.

    ``trust=True`` uses the full unpickler (warned about). Raises :class:`CheckpointError`
    naming the file and the refused global, or when the file is not a readable pickle
    (``what``, e.g. ``"the Geneformer dictionary"``, names the file's role in that message).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {err}", _REDOWNLOAD) from err
    try:
        if trust:
            _warn_trusted(path)
            return pickle.loads(data)  # noqa: S301 - explicit --trust-checkpoint opt-in
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except _Refused as err:
        raise _refusal(path, err.what) from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"cannot read {_role(what)}{str(path)!r}: not a readable pickle file "
                              f"({type(err).__name__}: {err})",
                              _REDOWNLOAD) from err


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def torch_load(path: str | Path, *, trust: bool = False, mmap: bool = False, what: str = "") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=not trust)``.

    ``mmap`` memory-maps the tensors when the file is in the zip format (ignored otherwise).
    A global that ``weights_only`` refuses -> :class:`CheckpointError` naming the file and the
    global, with the ``--trust-checkpoint`` fix; any other read failure -> "not a readable
    torch file" (``what`` names the file's role in that message).
    """
    path = Path(path)
    extra: dict[str, Any] = {}
    if mmap and zipfile.is_zipfile(path):
        extra["mmap"] = True
    if trust:
        _warn_trusted(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust, **extra)
    except pickle.UnpicklingError as err:
        hit = _GLOBAL_RE.search(str(err))
        if not trust and hit is not None:
            raise _refusal(path, hit.group(1)) from None
        raise _unreadable_torch(path, err, what) from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise _unreadable_torch(path, err, what) from err


def _role(what: str) -> str:
    return f"{what} " if what else ""


def _unreadable_torch(path: Path, err: BaseException, what: str = "") -> CheckpointError:
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    detail = next((s for s in lines if "error:" in s.lower() or s.startswith("Unsupported")), lines[0] if lines else "")
    if "WeightsUnpickler error" in detail:
        detail = next((s for s in lines if s.startswith("Unsupported")), detail)
    detail = detail[:300] or "empty or truncated file"
    return CheckpointError(f"cannot read {_role(what)}{str(path)!r}: not a readable torch file "
                           f"({type(err).__name__}: {detail})",
                           _REDOWNLOAD)


def check_torch_file(path: str | Path, *, fix: str = TRUST_FIX) -> None:
    """Refuse (without reading any tensor) a zip-format torch file that needs a global
    ``weights_only=True`` does not allow. Used before handing a ``pytorch_model.bin`` to a
    loader that reports errors less precisely; ``fix`` is the advice given."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return  # the legacy format cannot be scanned; torch.load(weights_only=True) still guards it
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - a damaged archive
        raise _unreadable_torch(path, err) from err
    if unsafe:
        raise _refusal(path, ", ".join(unsafe[:5]), fix)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file as a CPU state dict (the format holds no code)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({err})", _REDOWNLOAD) from err


def read_json(path: str | Path) -> Any:
    """A JSON file; unreadable or invalid -> :class:`CheckpointError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {str(path)!r} as JSON ({err})", _REDOWNLOAD) from err


def read_npy(path: str | Path) -> np.ndarray:
    """A ``.npy`` array, never unpickling (``allow_pickle=False``)."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):  # never unpickled, trusted or not: a numeric file is expected
            raise CheckpointError(f"{str(path)!r} holds pickled Python objects (an object array), not numbers "
                                  "(it was not unpickled)", _REDOWNLOAD) from None
        raise CheckpointError(f"{str(path)!r} is not a readable .npy file ({err})", _REDOWNLOAD) from err
    except (OSError, EOFError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable .npy file ({err})", _REDOWNLOAD) from err
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        raise CheckpointError(f"{str(path)!r} is an .npz archive, not a .npy array", _REDOWNLOAD)
    return arr


__all__ = ["TRUST_FIX", "check_torch_file", "read_json", "read_npy", "read_pickle", "read_safetensors",
           "torch_load"]
