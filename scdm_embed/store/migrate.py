"""Upgrade a store written by an older scdm to the current format, in place (attributes only).

``scdm-embed migrate STORE`` (or :func:`migrate_store`) raises an element's ``encoding-version``
to the one this scdm writes where the element already conforms or can be made to from what the
store holds; no embedding, cell table or split is rewritten, and an element that cannot conform
keeps its version (readers read every version of the current major):

* ``scdm-dataset`` 0.1.0 -> 0.2.0: ``cells_hash`` is computed from the stored cell table (the
  same hash an extraction computes from the input's table, so a re-extraction stays up-to-date).
* ``scdm-embedding`` 0.1.0 -> 0.2.0 only where it already records ``trust_checkpoint`` and its
  ``X``/``done`` carry the crc32c codec (stores written between the two formats). Older arrays
  stay 0.1.0 (``trust_checkpoint`` reads as None, chunks are not checksummed);
  ``scdm-embed extract ... --overwrite`` rewrites one at the current version.
* ``scdm-store`` -> :data:`~.schema.FORMAT_VERSION`, last, with an entry in ``migrations``.

Everything is checked before anything is written (an element of an unknown kind or a newer
major refuses the whole migration), and the store lock is held throughout; an interrupted
migration is finished by running it again.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anndata as ad
import zarr

from .._version import __version__
from ..errors import StoreError
from ._core import cells_hash, check_store_path, store_lock, store_os_error
from .schema import FORMAT_VERSION, TOP_GROUPS, VERSIONS, check_element, is_older


@dataclass(frozen=True)
class Migration:
    """What :func:`migrate_store` changed (or, with ``dry_run``, would change)."""

    store: Path
    from_version: str
    to_version: str
    #: one line per element: ``"<path>: <kind> <old> -> <new> (<what>)"``
    changes: tuple[str, ...]
    #: elements left at an older version, with why
    kept: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def _has_crc32c(path: Path) -> bool:
    meta = json.loads((path / "zarr.json").read_text())
    return any(c.get("name") == "crc32c" for c in meta.get("codecs", []))


def _keys(parent, name: str) -> list[str]:
    """The subgroups of ``parent[name]`` (none if absent), without hidden staging groups."""
    return sorted(k for k in parent[name].group_keys() if not k.startswith(".")) if name in parent else []


def migrate_store(store: str | Path, *, dry_run: bool = False) -> Migration:
    """Upgrade ``store``'s attributes to the current format (see the module docstring)."""
    path = Path(store)
    check_store_path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"no scdm store at {str(path)!r}", "check the path given to `scdm-embed migrate`")
    with store_lock(path) as lock:
        if not lock.writable and not dry_run:
            raise store_os_error(PermissionError(errno.EACCES, "not writable"), path)
        root = zarr.open_group(str(path), mode="r" if dry_run else "r+")
        if root.attrs.get("encoding-type") != "scdm-store":
            raise StoreError(f"{str(path)!r} is a Zarr group but not an scdm store", "point `scdm-embed migrate` at an scdm store")
        check_element(root.attrs, "scdm-store", f"the store {str(path)!r}")
        updates: list[tuple[Any, dict[str, Any], str]] = []  # (node, attrs to set, change line)
        kept: list[str] = []

        def plan(node, kind: str, where: str, what: str = "", **attrs: Any) -> None:
            check_element(node.attrs, kind, f"{where} in {str(path)!r}")
            if is_older(node.attrs, kind):
                old = node.attrs.get("encoding-version")
                updates.append((node, {**attrs, "encoding-version": VERSIONS[kind]},
                                f"{where}: {kind} {old} -> {VERSIONS[kind]}{f' ({what})' if what else ''}"))

        def plan_array(node, where: str) -> None:
            plan(node, "array", where)

        for name, kind in TOP_GROUPS.items():
            if name in root:
                plan(root[name], kind, f"{name}/")
        for ds in _keys(root, "datasets"):
            g = root["datasets"][ds]
            check_element(g.attrs, "scdm-dataset", f"datasets/{ds} in {str(path)!r}")
            if is_older(g.attrs, "scdm-dataset") and "cells_hash" not in g.attrs:
                try:
                    h = cells_hash(ad.io.read_elem(g["cells"]))
                except (ValueError, RuntimeError, OSError, KeyError) as e:
                    raise StoreError(f"the cell table of dataset {ds!r} in {str(path)!r} cannot be read ({e})",
                                     f"re-extract it: `scdm-embed extract INPUT --dataset {ds} --store {path} --overwrite`") from None
                plan(g, "scdm-dataset", f"datasets/{ds}", "cells_hash from the stored cell table", cells_hash=h)
            else:
                plan(g, "scdm-dataset", f"datasets/{ds}")
        for model in _keys(root, "embeddings"):
            mg = root["embeddings"][model]
            plan(mg, "scdm-model", f"embeddings/{model}")
            for ds in _keys(root["embeddings"], model):
                g = mg[ds]
                where = f"embeddings/{model}/{ds}"
                arrays = [a for a in ("X", "done") if a in g]
                for arr in arrays:
                    plan_array(g[arr], f"{where}/{arr}")
                check_element(g.attrs, "scdm-embedding", f"{where} in {str(path)!r}")
                lacks = ([] if "trust_checkpoint" in g.attrs else ["no trust_checkpoint record"]) + \
                        [f"{a} without crc32c" for a in arrays if not _has_crc32c(path / where / a)]
                if is_older(g.attrs, "scdm-embedding") and lacks:
                    kept.append(f"{where}: scdm-embedding {g.attrs.get('encoding-version')} ({', '.join(lacks)}; "
                                f"reads as it is; `scdm-embed extract ... --model {model} --dataset {ds} --overwrite` "
                                "rewrites it at the current version)")
                else:
                    plan(g, "scdm-embedding", where)
        for ref in _keys(root, "references"):
            g = root["references"][ref]
            plan(g, "scdm-reference", f"references/{ref}")
            for arr in sorted(g.array_keys()):
                plan_array(g[arr], f"references/{ref}/{arr}")
        for name in _keys(root, "splits"):
            plan(root["splits"][name], "scdm-split", f"splits/{name}")

        old = str(root.attrs.get("encoding-version"))
        if is_older(root.attrs, "scdm-store"):
            history = [*root.attrs.get("migrations", []),
                       {"from": old, "to": FORMAT_VERSION, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "scdm_version": __version__}]
            updates.append((root, {"encoding-version": FORMAT_VERSION, "migrations": history},
                            f"/: scdm-store {old} -> {FORMAT_VERSION}"))
        if dry_run or not updates:
            return Migration(path, old, FORMAT_VERSION, tuple(u[2] for u in updates), tuple(kept))
        lock.keep()
        try:
            for node, attrs, _ in updates:  # the root last: an interrupted run is finished by the next
                node.attrs.update(attrs)
        except OSError as e:
            raise store_os_error(e, path) from None
    return Migration(path, old, FORMAT_VERSION, tuple(u[2] for u in updates), tuple(kept))


__all__ = ["Migration", "migrate_store"]
