"""A tiny dataset registry (pooch): named real datasets, cached locally, verified by sha256.

The cache (``$SCDM_DATA_DIR``, default the user cache: ``$SCDM_CACHE_DIR``,
``$XDG_CACHE_HOME/scdm`` or ``~/.cache/scdm``) is seeded from a local mirror folder when one
is present — ``shared/data`` (see :mod:`scdm_embed.locations`: ``$SCDM_SHARED`` or beside the
checkout) — so nothing is downloaded when the files are already on the machine. Otherwise
files come from ``$SCDM_DATA_URL`` (a base URL holding the same relative paths).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pooch

from . import locations
from .errors import InputError


@dataclass(frozen=True)
class DatasetInfo:
    """One registry entry."""

    name: str
    path: str  #: relative path in the cache / mirror
    sha256: str
    description: str
    n_cells: int


REGISTRY: dict[str, DatasetInfo] = {
    "gse149214_pc9": DatasetInfo(
        name="gse149214_pc9",
        path="gse149214_pc9_erlotinib/pc9_d11_erlotinib_qc200.h5ad",
        sha256="2e8f1a370a0608720c9d5032a0f6ff0cd50ad97f280652057e9ff9b548359fad",
        description="GSE149214 PC9 lung adenocarcinoma, day 11 erlotinib vs control (Aissa et al. 2021); "
        "2,121 cells, raw counts; resistant = drug-tolerant persisters, sensitive = untreated",
        n_cells=2121,
    ),
}
DEFAULT_DATASET = "gse149214_pc9"


def cache_dir() -> Path:
    """Where datasets are cached: ``$SCDM_DATA_DIR``, else the user cache (:func:`scdm_embed.locations.cache_dir`)."""
    return Path(os.environ["SCDM_DATA_DIR"]) if os.environ.get("SCDM_DATA_DIR") else locations.cache_dir()


def _mirrors() -> list[Path]:
    return [d / "data" for d in locations.shared_dirs()]


def _seed_cache(info: DatasetInfo, target: Path, mirrors: Sequence[Path]) -> None:
    if target.exists():
        return
    from .models.base import sha256_file  # lazy: the models package imports torch

    for m in mirrors:
        src = m / info.path
        if src.exists() and sha256_file(src) == info.sha256:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".part")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
            return


def fetch(name: str = DEFAULT_DATASET, *, base_url: str | None = None, mirrors: Sequence[Path] | None = None,
          progress: bool = False) -> Path:
    """Local path of registry dataset ``name``: from the cache, a local mirror, or downloaded.

    ``mirrors`` are folders laid out like the cache (default: ``$SCDM_SHARED/data`` and the
    ``shared/data`` beside the checkout); a mirrored file is copied in only if its sha256 matches.
    """
    if name not in REGISTRY:
        raise InputError(f"unknown dataset {name!r}", f"use one of: {', '.join(REGISTRY)} (scdm-embed datasets), or give a file path")
    info = REGISTRY[name]
    target = cache_dir() / info.path
    _seed_cache(info, target, _mirrors() if mirrors is None else mirrors)
    url = base_url or os.environ.get("SCDM_DATA_URL")
    if not target.exists() and not url:
        raise InputError(f"dataset {name!r} is not cached and no download location is configured",
                         "put the shared/ folder beside the checkout (or set SCDM_SHARED), or set SCDM_DATA_URL")
    odie = pooch.create(path=cache_dir(), base_url=(url or "file:///nonexistent/").rstrip("/") + "/",
                        registry={info.path: f"sha256:{info.sha256}"})
    try:
        return Path(odie.fetch(info.path, progressbar=progress))
    except Exception as e:  # noqa: BLE001 - network / hash errors become user errors
        raise InputError(f"could not fetch dataset {name!r}: {e}", "check SCDM_DATA_URL or the network, or seed the cache from shared/") from e


def resolve(input: str | Path) -> Path:
    """A file path as given, or the cached path of a registry name."""
    p = Path(input)
    if p.exists() or str(input) not in REGISTRY:
        return p
    return fetch(str(input))
