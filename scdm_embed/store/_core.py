"""The embedding store: a Zarr v3 hierarchy keyed by model/dataset (format: ``store/README.md``).

Every group and array carries ``encoding-type``/``encoding-version`` (as anndata does); the
versions and typed attribute records live in :mod:`.schema`, and every element is checked
against it when read. Embedding arrays
are written chunk by chunk; a per-chunk ``done`` flag makes interrupted extractions resume, and
``complete`` marks a finished array. Readers refuse incomplete or stale arrays unless asked.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import zarr
from zarr.buffer.cpu import NDBuffer
from zarr.codecs import Crc32cCodec

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no metadata lock
    fcntl = None  # type: ignore[assignment]

from .._version import __version__
from ..errors import ScdmError, StaleCacheError, StoreError
from ._chunks import read_rows
from .schema import (
    FORMAT_VERSION,
    TOP_GROUPS,
    DatasetRecord,
    EmbeddingRecord,
    SplitRecord,
    StoreRecord,
    Telemetry,
    check_element,
    is_older,
    jsonable,
    stamp,
)

#: No compressor: float32 embeddings barely compress (Blosc-LZ4 + shuffle saves ~6%), and with the
#: direct chunk reader (store/_chunks.py) uncompressed 1,024-row chunks read fastest
#: (bench/bench_store_read.py --quick, loaded machine: category slice 0.91 vs 0.77 GB/s with LZ4,
#: 1.46x the whole-.npy-and-select path). Codecs are per-array Zarr metadata: arrays written with
#: any codec (LZ4 arrays of earlier versions included) read as they are.
#: a CRC-32C of every chunk: a damaged chunk is caught on read
EMBEDDING_CODECS = (Crc32cCodec(),)
#: one-byte done flags do not compress; the checksum still guards them
DONE_CODECS = (Crc32cCodec(),)
DEFAULT_STORE = Path("store") / "scdm.zarr"
#: the file inside a store that ``flock`` serialises metadata writes on (see :func:`store_lock`)
LOCK_NAME = ".scdm.lock"
#: write failures that mean "the store cannot be written" rather than a bug
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
warnings.filterwarnings("ignore", message=r".*\.scdm\.lock is not recognized.*")


def _stamp(node, kind: str, **attrs: Any) -> None:
    """Mark a new element as ``kind`` at this scdm's version of that kind (see :data:`.schema.VERSIONS`)."""
    node.attrs.update({**stamp(kind), **attrs})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")



def cells_hash(cells: pd.DataFrame) -> str:
    """sha256 of a cell table: index, column names, dtypes and every value (labels, study, ...)."""
    h = hashlib.sha256()
    h.update("\0".join(map(str, cells.index)).encode())
    for col in cells.columns:
        h.update(f"\1{col}\1{cells[col].dtype}\1".encode())
        h.update("\0".join(map(str, cells[col].to_numpy())).encode())
    return "sha256:" + h.hexdigest()


def shared_strings(values: np.ndarray) -> np.ndarray:
    """An object array equal to ``values`` whose repeated strings are ONE object each.

    A cell table read back holds a fresh string object per cell and column (~60 bytes; a third
    of a 512-d embedding row over a few columns); the study, sample and response of a cell are
    a handful of distinct values. Missing values (NaN, None) are kept as they are.
    """
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    out = np.asarray(values, dtype=object).copy()
    seen = codes >= 0
    out[seen] = np.asarray(uniques, dtype=object)[codes[seen]]
    return out


def store_location(path: str | Path) -> Path | str:
    """A local store path, or the fsspec URL a store path names (``s3://``, ``gs://``, ``memory://``, ...).

    ``file://`` URLs are local paths. A URL passed through :class:`~pathlib.Path` (``s3:/b/k``, as
    a CLI option typed ``Path`` makes it) is read as the URL it was.
    """
    text = str(path)
    scheme, sep, rest = text.partition(":/")
    if not sep or len(scheme) < 2 or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return Path(path)  # a local path (a one-letter "scheme" is a Windows drive)
    rest = rest.lstrip("/")
    return Path("/" + rest) if scheme.lower() == "file" else f"{scheme}://{rest}"


def check_store_path(path: str | Path) -> None:
    """Refuse a store path that is a file, lies under a file, or is a folder of other things."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            where = "is a file" if p == path else f"lies under the file {str(p)!r}"
            raise StoreError(f"the store path {str(path)!r} {where}", "point --store at a new path or an existing scdm store")
        if p.exists():
            break
    if path.is_dir() and not (path / "zarr.json").exists():
        try:
            other = sorted(e.name for e in os.scandir(path) if e.name != LOCK_NAME)
        except OSError as e:
            raise store_os_error(e, path) from None
        if other:
            raise StoreError(f"{str(path)!r} is a folder that is not an scdm store (it holds {', '.join(other[:3])}"
                             f"{', ...' if len(other) > 3 else ''})",
                             "pick a new path or an empty folder for --store")


def store_writable(path: str | Path) -> bool:
    """Whether the store (or, before it exists, the nearest existing folder above it) can be written."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return os.access(p, os.W_OK | os.X_OK)


def _os_errno(e: BaseException) -> int | None:
    """The errno of ``e`` or of the OSError it wraps (anndata re-raises write errors without it)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur.errno
        cur = cur.__cause__ or cur.__context__
    return None


def is_write_failure(e: BaseException) -> bool:
    """True for a full disk, exhausted quota, read-only file system or denied permission."""
    return _os_errno(e) in _WRITE_ERRNOS


def store_os_error(e: BaseException, path: str | Path) -> StoreError:
    """The StoreError a user sees for an OSError while writing (or reading) ``path``."""
    code = _os_errno(e)
    where = str(path)
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if code == errno.ENOSPC else "the disk quota is exhausted"
        return StoreError(f"{what} while writing the store {where!r}",
                          "free space (or pick --store on a disk with room) and re-run the same command; "
                          "chunks finished by earlier runs are kept")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = "is on a read-only file system" if code == errno.EROFS else "is not writable (permission denied)"
        return StoreError(f"the store {where!r} {what}", "make it writable, or point --store at a writable path")
    return StoreError(f"cannot write the store {where!r}: {e}", "check the disk and the path, then re-run the same command")


class StoreLock:
    """A held :func:`store_lock`; ``writable`` is False for a store this process cannot write."""

    def __init__(self, writable: bool) -> None:
        self.writable = writable
        self.kept = False

    def keep(self) -> None:
        """Keep the lock file (and the store folder made for it): this run wrote into the store."""
        self.kept = True


@contextlib.contextmanager
def store_lock(path: str | Path) -> Iterator[StoreLock]:
    """Hold an exclusive ``flock`` on ``<store>/.scdm.lock`` for metadata reads and writes.

    Fitting/attaching references, cell tables and array creation happen under it, so two
    extractions into one store agree on a single reference; chunk writes do not take it.
    The store folder is made for the lock file if needed; when the holder did not call
    :meth:`StoreLock.keep`, the lock file and folders it created are removed again, so a
    refused or no-op run leaves the store byte-identical. A store this process cannot
    write yields an unlocked, non-writable handle.
    """
    path = Path(path)
    if fcntl is None or (path.exists() and not store_writable(path)):
        yield StoreLock(writable=path.exists() and store_writable(path))
        return
    made: list[Path] = []

    def _mkdirs() -> None:
        for d in reversed([p for p in (path, *path.parents) if not p.exists()]):
            try:
                d.mkdir()
                made.append(d)
            except FileExistsError:
                pass

    lock_path = path / LOCK_NAME
    created = False
    try:
        while True:
            _mkdirs()
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(lock_path, os.O_RDWR)
                except FileNotFoundError:  # removed meanwhile: try again
                    continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it (a rolled-back store): lock the new one
            created = False
    except OSError as e:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise store_os_error(e, path) from None
    lk = StoreLock(writable=True)
    try:
        yield lk
    finally:
        if not lk.kept:
            if created:
                with contextlib.suppress(OSError):
                    lock_path.unlink()
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty
        os.close(fd)


@dataclass(frozen=True)
class EmbeddingInfo:
    """One model x dataset array as listed by :meth:`EmbeddingStore.entries`."""

    model: str
    dataset: str
    n_cells: int
    dim: int
    complete: bool
    chunks_done: int
    n_chunks: int
    stale: bool
    attrs: dict[str, Any]

    @property
    def record(self) -> EmbeddingRecord:
        """The array's attributes as a typed record (provenance, layout, telemetry)."""
        return EmbeddingRecord.from_attrs(self.attrs, f"embeddings/{self.model}/{self.dataset}")


class EmbeddingStore:
    """A Zarr v3 store of cell tables, embeddings, fitted references and splits.

    >>> st = EmbeddingStore("store/scdm.zarr")            # doctest: +SKIP
    >>> X, cells = st.load("pca", datasets=["pc9"])      # doctest: +SKIP
    """

    def __init__(self, path: str | Path = DEFAULT_STORE, *, mode: str = "r") -> None:
        where = store_location(path)
        if isinstance(where, str):  # an fsspec URL: read-only (writes stage and rename, and lock, locally)
            self._open_url(where, mode)
            return
        self.path = where
        self.mode = mode
        check_store_path(self.path)
        if mode == "r":
            if not (self.path / "zarr.json").exists():
                raise StoreError(f"no scdm store at {str(self.path)!r}",
                                 "run `scdm-embed extract INPUT --model NAME --store PATH` first, or check --store")
            self.root = zarr.open_group(str(self.path), mode="r")
            self._check_format(write=False)
            return
        if not store_writable(self.path):
            raise store_os_error(OSError(errno.EACCES, "not writable"), self.path)
        try:
            fresh = not (self.path / "zarr.json").exists()
            if not fresh:
                self.root = zarr.open_group(str(self.path), mode="a")
                self._check_format(write=True)
            else:
                self.path.mkdir(parents=True, exist_ok=True)
                self.root = zarr.open_group(str(self.path), mode="a", zarr_format=3, attributes={
                    **stamp("scdm-store"), **StoreRecord(scdm_version=__version__, created=_now()).to_attrs()})
            for name, kind in TOP_GROUPS.items():
                if name not in self.root:
                    _stamp(self.root.create_group(name), kind)
        except OSError as e:
            raise store_os_error(e, self.path) from None

    def _open_url(self, url: str, mode: str) -> None:
        """Open the store at an fsspec URL for reading (``self.path`` is then the URL string)."""
        self.path, self.mode = url, "r"  # type: ignore[assignment]
        if mode != "r":
            raise OSError(errno.EROFS, "scdm writes only local stores (an fsspec URL store is read-only)", url)
        try:
            self.root = zarr.open_group(url, mode="r")
        except (OSError, ValueError, KeyError) as e:  # GroupNotFoundError is a FileNotFoundError
            raise StoreError(f"no scdm store at {url!r} ({type(e).__name__})",
                             "check the URL and its credentials (fsspec reads them from the environment)") from None
        self._check_format(write=False)

    def _check_format(self, *, write: bool) -> None:
        """Refuse what is not an scdm store or is of another major format; to write, an older one too."""
        a = dict(self.root.attrs)
        if a.get("encoding-type") != "scdm-store":
            raise StoreError(f"{str(self.path)!r} is a Zarr group but not an scdm store", "point --store at an scdm store or a new path")
        check_element(a, "scdm-store", f"the store {str(self.path)!r}")
        for name, kind in TOP_GROUPS.items():
            if name in self.root:
                check_element(self.root[name].attrs, kind, f"{name}/ in {str(self.path)!r}")
        if write and is_older(a, "scdm-store"):
            raise StoreError(f"the store {str(self.path)!r} is format {a.get('encoding-version')}, older than the "
                             f"format {FORMAT_VERSION} this scdm writes (it reads it as it is)",
                             f"upgrade it in place with `scdm-embed migrate {self.path}` (attributes only, "
                             "embeddings are kept), then re-run; or write into a new store")

    @property
    def record(self) -> StoreRecord:
        """The root group's attributes as a typed record."""
        return StoreRecord.from_attrs(self.root.attrs, f"the store {str(self.path)!r}")

    def _element(self, kind: str, *parts: str):
        """The group at ``parts`` checked to be a ``kind`` element this scdm reads (None if absent)."""
        node = self._group(*parts)
        if node is not None:
            check_element(node.attrs, kind, f"{'/'.join(parts)} in {str(self.path)!r}")
        return node

    def _group(self, *parts: str):
        node = self.root
        for p in parts:
            try:  # one metadata read per level (``in`` then ``[]`` would be two)
                node = node[p]
            except KeyError:
                return None
        return node

    # -- datasets -------------------------------------------------------------------------
    def datasets(self) -> list[str]:
        g = self._group("datasets")
        return sorted(k for k in g.group_keys() if not k.startswith(".")) if g is not None else []

    def dataset_attrs(self, dataset: str) -> dict[str, Any]:
        """A dataset group's raw attributes (see :meth:`dataset_record` for the typed form)."""
        g = self._element("scdm-dataset", "datasets", dataset)
        if g is None:
            raise StoreError(f"dataset {dataset!r} is not in the store (has: {self.datasets()})", "extract it first, or check the name")
        return dict(g.attrs)

    def dataset_record(self, dataset: str) -> DatasetRecord:
        """A dataset's attributes as a typed record (``cells_hash`` None in 0.1.0 stores)."""
        return DatasetRecord.from_attrs(self.dataset_attrs(dataset), f"datasets/{dataset} in {str(self.path)!r}")

    def put_dataset(self, dataset: str, cells: pd.DataFrame, *, input_hash: str, **attrs: Any) -> None:
        """Write a dataset's cell table atomically (staged, then renamed into place).

        Its ``cells_hash`` (see :func:`cells_hash`) lets a re-extraction notice changed labels or metadata.
        """
        _check_name(dataset, "dataset")
        text = [c for c in cells.columns if not pd.api.types.is_numeric_dtype(cells[c]) and cells[c].isna().any()]
        if text:  # anndata writes a missing string as the text "None" / "nan": one more sample, study, ...
            raise ScdmError(f"cell table column(s) {text} of dataset {dataset!r} have cells with no value",
                            "fill them (e.g. with 'unknown') or drop those cells")
        final = self.path / "datasets" / dataset
        tmp_name = f".tmp-{dataset}-{uuid.uuid4().hex[:8]}"
        with _staged(self.path / "datasets" / tmp_name):
            g = self.root["datasets"].create_group(tmp_name)
            rec = DatasetRecord.from_attrs({"input_hash": input_hash, "cells_hash": cells_hash(cells),
                                            "n_cells": len(cells), "created": _now(), **jsonable(attrs)})
            _stamp(g, "scdm-dataset", **rec.to_attrs())
            ad.io.write_elem(g, "cells", cells)
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.path / "datasets" / tmp_name, final)
        self.__dict__.pop("_cells_cache", None)

    def cells(self, datasets: Sequence[str] | None = None) -> pd.DataFrame:
        """Cell tables of ``datasets`` (default all), concatenated.

        Index: ``"<dataset>/<cell_id>"``; columns ``dataset``, ``row`` (position in its dataset),
        ``label`` (1 sensitive, 0 resistant), ``response`` and the metadata roles present.
        """
        parts = [self._cell_table(ds) for ds in (datasets if datasets is not None else self.datasets())]
        if not parts:
            return pd.DataFrame(columns=["dataset", "row", "label", "response"])
        return pd.concat(parts)

    def _cell_table_key(self, ds: str) -> tuple[str, Any, Any, Any]:
        """(dataset, input hash, cells hash, group) of a dataset, its group read once per call."""
        g = self._element("scdm-dataset", "datasets", ds)
        if g is None:
            raise StoreError(f"dataset {ds!r} is not in the store (has: {self.datasets()})", "check the dataset name")
        return ds, g.attrs.get("input_hash"), g.attrs.get("cells_hash"), g

    def _cell_table(self, ds: str) -> pd.DataFrame:
        """One dataset's cell table, cached per handle by the dataset's input hash."""
        *key, g = self._cell_table_key(ds)
        key = tuple(key)
        cache = self.__dict__.setdefault("_cells_cache", {})
        if key not in cache:
            try:
                df = ad.io.read_elem(g["cells"])
            except (ValueError, RuntimeError, OSError, KeyError) as e:
                raise StoreError(f"the cell table of dataset {ds!r} in {str(self.path)!r} cannot be read ({e})",
                                 f"re-extract it: `scdm-embed extract INPUT --dataset {ds} --store {self.path} --overwrite`") from None
            for col in df.columns:
                if df[col].dtype == object:
                    df[col] = shared_strings(df[col].to_numpy())
            df.insert(0, "row", np.arange(len(df)))
            df.insert(0, "dataset", ds)
            df.index = pd.Index([f"{ds}/{c}" for c in df.index], name="cell")
            cache[key] = df
        return cache[key].copy()

    # -- embeddings -----------------------------------------------------------------------
    def embedding_group(self, model: str, dataset: str):
        """The model x dataset group (None if absent), checked to be an ``scdm-embedding`` element."""
        if self._element("scdm-model", "embeddings", model) is None:
            return None
        return self._element("scdm-embedding", "embeddings", model, dataset)

    def embedding_record(self, model: str, dataset: str) -> EmbeddingRecord | None:
        """The array's attributes as a typed record (provenance, layout, telemetry); None if absent."""
        g = self.embedding_group(model, dataset)
        return None if g is None else EmbeddingRecord.from_attrs(g.attrs, f"embeddings/{model}/{dataset} in {str(self.path)!r}")

    def create_embedding(self, model: str, dataset: str, *, n_cells: int, dim: int, chunk_rows: int,
                         dtype: str = "float32", compressors: Sequence[Any] | None = None, **attrs: Any):
        """Create an empty model x dataset array (rows chunked by ``chunk_rows``) with its done flags.

        ``compressors`` (Zarr bytes-to-bytes codecs) default to :data:`EMBEDDING_CODECS`; benchmarks pass others.
        """
        _check_name(model, "model")
        mg = self.root["embeddings"].require_group(model)
        if "encoding-type" not in mg.attrs:
            _stamp(mg, "scdm-model")
        if dataset in mg:
            del mg[dataset]
        g = mg.create_group(dataset)
        n_chunks = -(-n_cells // chunk_rows)
        x = g.create_array("X", shape=(n_cells, dim), chunks=(chunk_rows, dim), dtype=dtype, fill_value=np.nan,
                           compressors=EMBEDDING_CODECS if compressors is None else tuple(compressors))
        x.attrs.update(stamp("array"))
        done = g.create_array("done", shape=(n_chunks,), chunks=(1,), dtype="bool", fill_value=False,
                              compressors=DONE_CODECS)
        done.attrs.update(stamp("array"))
        rec = EmbeddingRecord.from_attrs({"model": model, "dataset": dataset, "n_cells": n_cells, "dim": dim,
                                          "chunk_rows": chunk_rows, "dtype": dtype, "complete": False,
                                          "created": _now(), **jsonable(attrs)}, f"embeddings/{model}/{dataset}")
        _stamp(g, "scdm-embedding", **rec.to_attrs())
        return g

    def write_chunk(self, model: str, dataset: str, chunk: int, values: np.ndarray) -> None:
        """Write row-chunk ``chunk`` of an array, then flag it done (the flag is written last)."""
        g = self.root["embeddings"][model][dataset]
        rows = int(g.attrs["chunk_rows"])
        g["X"][chunk * rows: chunk * rows + len(values)] = values.astype(g["X"].dtype, copy=False)
        g["done"][chunk] = True

    def finish_embedding(self, model: str, dataset: str, *, telemetry: Telemetry | None = None, **attrs: Any) -> None:
        """Mark an array complete once every chunk is done (recording the run's ``telemetry``)."""
        g = self.root["embeddings"][model][dataset]
        done = self.done_flags(model, dataset)
        if not done.all():
            raise StoreError(f"{model}/{dataset}: {int((~done).sum())} chunks are not written", "re-run the extraction to resume it")
        if telemetry is not None:
            attrs["telemetry"] = telemetry.to_attrs() if isinstance(telemetry, Telemetry) else telemetry
        g.attrs.update({**jsonable(attrs), "complete": True, "completed": _now()})

    def put_embedding(self, model: str, dataset: str, X: np.ndarray, *, chunk_rows: int = 1024,
                      compressors: Sequence[Any] | None = None, **attrs: Any) -> None:
        """Write a whole in-memory embedding matrix for an existing dataset (API convenience)."""
        ds = self.dataset_attrs(dataset)
        if int(ds["n_cells"]) != X.shape[0]:
            raise StoreError(f"{model}/{dataset}: {X.shape[0]} rows but the dataset has {ds['n_cells']} cells", "pass one row per cell, in the dataset's order")
        self.create_embedding(model, dataset, n_cells=X.shape[0], dim=X.shape[1], chunk_rows=chunk_rows,
                              compressors=compressors, input_hash=ds["input_hash"], **attrs)
        for c, s in enumerate(range(0, X.shape[0], chunk_rows)):
            self.write_chunk(model, dataset, c, np.asarray(X[s:s + chunk_rows]))
        self.finish_embedding(model, dataset)

    def done_flags(self, model: str, dataset: str) -> np.ndarray:
        """The per-chunk done flags of an array (a StoreError naming it when they cannot be read)."""
        g = self.root["embeddings"][model][dataset]
        try:
            return g["done"][:]
        except (ValueError, RuntimeError, OSError, KeyError) as e:
            raise _corrupt(self.path, model, dataset, "done", e) from None

    def delete_embedding(self, model: str, dataset: str) -> None:
        mg = self._group("embeddings", model)
        if mg is not None and dataset in mg:
            del mg[dataset]

    def models(self, *, complete_only: bool = True) -> list[str]:
        return sorted({e.model for e in self.entries() if e.complete and not e.stale or not complete_only})

    def entries(self) -> list[EmbeddingInfo]:
        """Every model x dataset array with completeness, staleness and provenance."""
        out = []
        eg = self._group("embeddings")
        for model in sorted(eg.group_keys()) if eg is not None else []:
            for ds in sorted(eg[model].group_keys()):
                g = self.embedding_group(model, ds)
                a = dict(g.attrs)
                done = self.done_flags(model, ds)
                ds_attrs = dict(self._group("datasets", ds).attrs) if self._group("datasets", ds) is not None else {}
                stale = ds_attrs.get("input_hash") != a.get("input_hash")
                out.append(EmbeddingInfo(model, ds, int(a["n_cells"]), int(a["dim"]), bool(a.get("complete")),
                                         int(done.sum()), len(done), stale, a))
        return out

    def load(
        self,
        model: str,
        *,
        datasets: Sequence[str] | None = None,
        cells: Iterable[str] | None = None,
        allow_incomplete: bool = False,
    ) -> tuple[np.ndarray, pd.DataFrame]:
        """Embeddings + cell table of ``model`` for ``datasets`` (default: all it has).

        ``cells`` (global keys ``"<dataset>/<cell_id>"``) restricts the rows; only the chunks
        holding them are read. Incomplete or stale arrays are refused unless ``allow_incomplete``.
        """
        mg, names = self._model_datasets(model, datasets)
        table = self.cells(names)
        if cells is not None:
            table = table.loc[cells if isinstance(cells, pd.Index) else pd.Index(list(cells))]
        return self._rows(mg, model, names, table, allow_incomplete).read(), table

    def rows(self, model: str, *, datasets: Sequence[str] | None = None, cells: Iterable[str] | None = None,
             allow_incomplete: bool = False) -> EmbeddingRows:
        """``model``'s embeddings of ``cells`` (default: every cell of ``datasets``), read on demand.

        Checked as :meth:`load` checks them, but nothing is read until
        :meth:`EmbeddingRows.read`: row ``i`` is ``cells[i]``, and a read decodes only the chunks
        holding the rows asked for. For work that visits a slice a block at a time (streaming
        it into a quantised matrix, say) without holding it whole; keeps two integers per cell.
        """
        mg, names = self._model_datasets(model, datasets)
        table = self.cells(names)
        if cells is not None:
            keys = cells if isinstance(cells, pd.Index) else pd.Index(list(cells))
            missing = keys[table.index.get_indexer(keys) < 0]
            if len(missing):
                raise StoreError(f"model {model!r}: {len(missing)} of the cells asked for are not in datasets "
                                 f"{names} (e.g. {missing[0]!r})", "re-extract the model for every dataset, or "
                                 "check the cell keys ('<dataset>/<cell_id>')")
            table = table.loc[keys, ["dataset", "row"]]
        return self._rows(mg, model, names, table, allow_incomplete)

    def _model_datasets(self, model: str, datasets: Sequence[str] | None) -> tuple[Any, list[str]]:
        mg = self._element("scdm-model", "embeddings", model)
        if mg is None:
            raise StoreError(f"model {model!r} has no embeddings in {str(self.path)!r} (has: {self.models(complete_only=False)})",
                             f"run `scdm-embed extract INPUT --model {model} --store {self.path}`")
        return mg, list(datasets) if datasets is not None else sorted(mg.group_keys())

    def _rows(self, mg: Any, model: str, names: list[str], table: pd.DataFrame, allow_incomplete: bool) -> EmbeddingRows:
        """The checked arrays of ``model`` (group ``mg``) x ``names`` behind ``table``'s dataset/row columns."""
        ds_code, ds_names = pd.factorize(table["dataset"])  # integer codes: no string compares per dataset
        ds_index = {d: i for i, d in enumerate(ds_names)}
        arrays: dict[int, tuple[str, Any]] = {}
        dim: int | None = None
        for ds in names:
            try:  # the model group is in hand: one metadata read per dataset, not a walk from the root
                g = mg[ds]
            except KeyError:
                raise StoreError(f"model {model!r} has no embeddings for dataset {ds!r}", f"run `scdm-embed extract ... --model {model} --dataset {ds}`") from None
            check_element(g.attrs, "scdm-embedding", f"embeddings/{model}/{ds} in {str(self.path)!r}")
            a = dict(g.attrs)
            if not a.get("complete") and not allow_incomplete:
                raise StoreError(f"embeddings {model}/{ds} are incomplete ({int(self.done_flags(model, ds).sum())}/{g['done'].shape[0]} chunks)",
                                 "re-run the same `scdm-embed extract` command to resume it (or pass allow_incomplete=True)")
            if a.get("input_hash") != self._cell_table_key(ds)[1] and not allow_incomplete:
                raise StaleCacheError(f"embeddings {model}/{ds} were computed from another version of the input",
                                      f"re-extract with `scdm-embed extract ... --model {model} --dataset {ds} --overwrite`")
            x = g["X"]
            check_element(x.attrs, "array", f"embeddings/{model}/{ds}/X in {str(self.path)!r}")
            if dim is None:
                dim, first = int(x.shape[1]), ds
            elif x.shape[1] != dim:
                raise StoreError(f"model {model!r} has {dim}-d embeddings for dataset {first!r} but "
                                 f"{x.shape[1]}-d for {ds!r}: they were not made by the same network or reference",
                                 f"re-extract {ds!r} (or {first!r}) with `scdm-embed extract ... --model {model} "
                                 f"--dataset NAME --overwrite` so that every dataset uses the same one")
            if ds in ds_index:
                arrays[ds_index[ds]] = (ds, x)
        return EmbeddingRows(self.path, model, arrays, ds_code.astype(np.int32), table["row"].to_numpy(np.int64),
                             dim or 0)

    # -- references (fitted gene lists / bases) -------------------------------------------
    def get_reference(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        g = self._element("scdm-reference", "references", name)
        if g is None:
            return None
        return {k: g[k][:] for k in g.array_keys()}, dict(g.attrs)

    def put_reference(self, name: str, arrays: dict[str, np.ndarray], **attrs: Any) -> None:
        """Write a fitted reference atomically (staged, then renamed into place)."""
        _check_name(name, "reference")
        final = self.path / "references" / name
        tmp_name = f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        with _staged(self.path / "references" / tmp_name):
            g = self.root["references"].create_group(tmp_name)
            for k, v in arrays.items():
                v = np.asarray(v)
                if v.dtype == object:
                    v = v.astype(str)
                arr = g.create_array(k, shape=v.shape, dtype=v.dtype if v.dtype.kind != "U" else str)
                arr[...] = v
                arr.attrs.update(stamp("array"))
            _stamp(g, "scdm-reference", created=_now(), **jsonable(attrs))
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.path / "references" / tmp_name, final)

    # -- splits ---------------------------------------------------------------------------
    def splits(self) -> list[str]:
        g = self._group("splits")
        return sorted(g.group_keys()) if g is not None else []

    def put_splits(self, name: str, table: pd.DataFrame, record: SplitRecord) -> None:
        """Save a split table (see store/README.md) and its parameters atomically."""
        _check_name(name, "split")
        final = self.path / "splits" / name
        tmp = f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        attrs = {"created": _now(), **{k: v for k, v in record.to_attrs().items() if k != "created"}}
        with _staged(self.path / "splits" / tmp):
            g = self.root["splits"].create_group(tmp)
            _stamp(g, "scdm-split", **SplitRecord.from_attrs(attrs, f"splits/{name}").to_attrs())
            ad.io.write_elem(g, "table", table)
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.path / "splits" / tmp, final)

    def get_splits(self, name: str) -> tuple[pd.DataFrame, SplitRecord] | None:
        """A saved split table and its typed attributes; None if the store has no split ``name``."""
        g = self._element("scdm-split", "splits", name)
        if g is None:
            return None
        return ad.io.read_elem(g["table"]), SplitRecord.from_attrs(g.attrs, f"splits/{name} in {str(self.path)!r}")


class EmbeddingRows:
    """Rows of one model's embeddings over a list of cells, read on demand (:meth:`EmbeddingStore.rows`).

    Holds each cell's dataset code and row (12 bytes a cell) and the arrays' handles, not values.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, path: Path | str, model: str, arrays: dict[int, tuple[str, Any]], codes: np.ndarray,
                 rows: np.ndarray, dim: int) -> None:
        self._path, self._model, self._arrays, self._codes, self._rows = path, model, arrays, codes, rows
        self.shape = (len(rows), dim)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, at: np.ndarray | None = None, *, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``at`` (positions in the cell list, any order; default all) as a float32 matrix."""
        codes, rows = (self._codes, self._rows) if at is None else (self._codes[at], self._rows[at])
        if out is None:
            out = np.empty((len(rows), self.shape[1]), np.float32)
        elif out.shape != (len(rows), self.shape[1]) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {(len(rows), self.shape[1])} (got {out.dtype} {out.shape})")
        for k, (ds, x) in self._arrays.items():
            where = np.flatnonzero(codes == k)
            try:
                if len(where):
                    _read_into(x, rows[where], out, where)
            except (ValueError, RuntimeError, OSError) as e:  # checksum mismatch, undecodable or unreadable chunk
                raise _corrupt(self._path, self._model, ds, "X", e) from None
        return out


def _read_into(x, rows: np.ndarray, out: np.ndarray, where: np.ndarray) -> None:
    """Write rows ``rows`` of the row-chunked array ``x`` into ``out[where]`` (``where`` ascending).

    Only the chunks holding ``rows`` are read. When ``where`` is one run and ``rows`` ascend,
    zarr decodes the chunks straight into that block of ``out`` (no intermediate array, no
    gather copy); rows in any other order are read once, sorted, then scattered.
    """
    if read_rows(x, rows, out, where):  # the store's own layout on a local disk: read the chunk files directly
        return
    a, b = int(where[0]), int(where[-1]) + 1
    if b - a == len(where) and x.dtype == out.dtype:
        block = NDBuffer.from_numpy_array(out[a:b])
        lo = int(rows[0])
        if int(rows[-1]) - lo + 1 == len(rows) and np.all(np.diff(rows) == 1):
            x.get_basic_selection((slice(lo, lo + len(rows)), slice(None)), out=block)
            return
        if np.all(np.diff(rows) > 0):
            x.get_orthogonal_selection((rows, slice(None)), out=block)
            return
    uniq, inv = np.unique(rows, return_inverse=True)
    buf = np.empty((len(uniq), x.shape[1]), dtype=x.dtype)
    x.get_orthogonal_selection((uniq, slice(None)), out=NDBuffer.from_numpy_array(buf))
    out[where] = buf[inv]


@contextlib.contextmanager
def _staged(tmp: Path) -> Iterator[None]:
    """Remove a staging folder when writing it fails (e.g. the disk is full)."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _corrupt(store: Path, model: str, dataset: str, array: str, e: BaseException) -> StoreError:
    return StoreError(f"embeddings {model}/{dataset} in {str(store)!r} are damaged: a chunk of {array} cannot be read "
                      f"({type(e).__name__}: {e})",
                      f"re-extract them: `scdm-embed extract INPUT --model {model} --dataset {dataset} --store {store} --overwrite`")


def check_name(name: str, what: str) -> None:
    """Refuse a name that cannot be a store key: empty, with '/' or '\\', leading '.' or '__', padded."""
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith((".", "__"))
            or name != name.strip() or not name.isprintable()):
        raise StoreError(f"{what} name {name!r} is not usable as a store key",
                         f"use a {what} name without '/', '\\', a leading '.' or '__', or surrounding spaces")


_check_name = check_name
