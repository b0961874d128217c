"""Where scdm looks for things on disk, declared once: the shared reference folder and the user cache.

* ``shared/`` (real datasets, vocabularies, reference fixtures): ``$SCDM_SHARED``, else the
  ``shared`` folder beside the checkout, else the one beside the working directory.
* the user cache (dataset downloads, the checkpoint-hash cache): ``$SCDM_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/scdm``, else ``~/.cache/scdm``.

Only the standard library is imported here, so any module (and the CLIs) can use it cheaply.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the checkout this package was imported from (``shared/`` is looked for beside it)
_CHECKOUT = Path(__file__).resolve().parents[1]


def shared_dirs() -> list[Path]:
    """Candidate ``shared/`` folders, most specific first (they need not exist)."""
    out: list[Path] = []
    if os.environ.get("SCDM_SHARED"):
        out.append(Path(os.environ["SCDM_SHARED"]))
    for p in (_CHECKOUT.parent / "shared", Path.cwd().parent / "shared"):
        if p not in out:
            out.append(p)
    return out


def shared_dir() -> Path:
    """The ``shared/`` folder: ``$SCDM_SHARED`` when set (even if missing, so errors name it),
    else the first existing candidate, else the one beside the checkout."""
    cands = shared_dirs()
    if os.environ.get("SCDM_SHARED"):
        return cands[0].resolve()
    return next((p for p in cands if p.is_dir()), cands[0]).resolve()


def cache_dir() -> Path:
    """The user cache folder (not created here)."""
    if os.environ.get("SCDM_CACHE_DIR"):
        return Path(os.environ["SCDM_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "scdm"


__all__ = ["cache_dir", "shared_dir", "shared_dirs"]
