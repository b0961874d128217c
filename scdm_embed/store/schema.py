"""The store's schema: element kinds, their versions, typed attribute records, JSON form.

Every group and array of a store carries ``encoding-type`` / ``encoding-version`` (anndata's
IO-spec idea); each element kind has its **own** version, and this module is the one place
those versions live (:data:`VERSIONS`, with the history in :data:`CHANGES`). A reader accepts
an element of a known kind whose major version is its own (a newer minor only adds fields);
an unknown kind or a newer major is refused with a :class:`~scdm_embed.errors.StoreError`.

The typed records (:class:`DatasetRecord`, :class:`Provenance`, :class:`EmbeddingRecord`,
:class:`Telemetry`, :class:`SplitRecord`, :class:`StoreRecord`) are frozen dataclasses with
``to_attrs()`` / ``from_attrs()``: a reader gets typed fields; a field the element lacks (it
was written by an older version) reads as its default and is listed in ``missing``; a field
this version does not know is kept in ``extra`` (and written back unchanged). The format is
documented in ``store/README.md``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

from ..errors import StoreError

#: version of the store layout as a whole (the root group's ``encoding-version``); a store
#: whose root is older is read as it is, and written only after ``scdm-embed migrate``
FORMAT_VERSION = "0.2.0"

#: the current ``encoding-version`` of every element kind
VERSIONS: Mapping[str, str] = MappingProxyType({
    "scdm-store": FORMAT_VERSION,
    "scdm-datasets": "0.1.0",
    "scdm-dataset": "0.2.0",
    "scdm-embeddings": "0.1.0",
    "scdm-model": "0.1.0",
    "scdm-embedding": "0.2.0",
    "scdm-references": "0.1.0",
    "scdm-reference": "0.1.0",
    "scdm-splits": "0.1.0",
    "scdm-split": "0.1.0",
    #: anndata's IO-spec dense array, at anndata's version, so ``anndata.io.read_elem`` reads every
    #: array of a store; codecs (crc32c; blosc in older arrays) are Zarr metadata and need no version of their own
    "array": "0.2.0",
})

#: what each version of a kind changed (``store/README.md`` mirrors this)
CHANGES: Mapping[str, tuple[tuple[str, str], ...]] = MappingProxyType({
    "scdm-store": (("0.1.0", "first format: one version for every group"),
                   ("0.2.0", "every element kind versioned on its own; `migrations` records upgrades")),
    "scdm-dataset": (("0.1.0", "input_hash, n_cells, n_genes, source, label_convention, created"),
                     ("0.2.0", "cells_hash (the cell table is part of a dataset's identity)")),
    "scdm-embedding": (("0.1.0", "layout, provenance and telemetry"),
                       ("0.2.0", "trust_checkpoint recorded; X and done end with a crc32c codec")),
    "array": (("0.2.0", "anndata's dense array encoding (Zarr v3)"),),
})

#: the store's top-level groups and their kinds
TOP_GROUPS: Mapping[str, str] = MappingProxyType({
    "datasets": "scdm-datasets", "embeddings": "scdm-embeddings",
    "references": "scdm-references", "splits": "scdm-splits",
})

_ENCODING_KEYS = ("encoding-type", "encoding-version")


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with numpy scalars as Python numbers and anything else unknown as ``str``."""
    return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def parse_version(version: Any, where: str = "an element") -> tuple[int, int, int]:
    """``"0.2.0"`` -> ``(0, 2, 0)``; a StoreError for anything that is not ``MAJOR.MINOR.PATCH``."""
    try:
        major, minor, patch = (int(p) for p in str(version).split("."))
    except ValueError:
        raise StoreError(f"{where} has encoding-version {version!r}, which is not MAJOR.MINOR.PATCH",
                         "the store is damaged or was not written by scdm: re-extract into a new store") from None
    return major, minor, patch


def stamp(kind: str) -> dict[str, str]:
    """The ``encoding-type`` / ``encoding-version`` attributes a writer puts on a new ``kind`` element."""
    return {"encoding-type": kind, "encoding-version": VERSIONS[kind]}


def check_element(attrs: Mapping[str, Any], kind: str, where: str) -> tuple[int, int, int]:
    """The version of an element that must be of ``kind``; refuse an unknown kind or a newer major."""
    got = attrs.get("encoding-type")
    if got != kind:
        known = got in VERSIONS
        what = "no encoding-type" if got is None else f"encoding-type {got!r}"
        raise StoreError(
            f"{where} has {what}, {'but ' + repr(kind) + ' belongs there' if known else 'which this scdm does not know'}"
            f" (expected {kind!r})",
            "upgrade scdm (`pip install -U scdm`) if a newer scdm wrote it; otherwise the store is damaged: "
            "re-extract into a new store")
    version = parse_version(attrs.get("encoding-version"), where)
    ours = parse_version(VERSIONS[kind])
    if version[0] != ours[0]:
        newer = version[0] > ours[0]
        raise StoreError(
            f"{where} is {kind} version {attrs.get('encoding-version')}, {'newer' if newer else 'older'} than this scdm "
            f"reads (major {ours[0]}, writes {VERSIONS[kind]})",
            "upgrade scdm (`pip install -U scdm`) to read it" if newer else
            "re-extract into a new store (this format predates the readable ones)")
    return version


def is_older(attrs: Mapping[str, Any], kind: str) -> bool:
    """Whether an element of ``kind`` was written by an older version than this scdm writes."""
    return parse_version(attrs.get("encoding-version")) < parse_version(VERSIONS[kind])


R = TypeVar("R", bound="Record")


@dataclass(frozen=True, kw_only=True)
class Record:
    """Base of the typed attribute records: ``to_attrs()`` / ``from_attrs()`` with visible gaps.

    ``extra`` holds attributes this version does not know (kept and written back);
    ``missing`` names the fields the attributes lacked (read as their defaults, and left
    out again by ``to_attrs``, so a read-modify-write keeps an element as it was).
    """

    KIND: ClassVar[str] = ""
    #: optional fields not written while they are None (writers never wrote nulls for them)
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset()
    #: fields holding a nested record
    NESTED: ClassVar[Mapping[str, type[Record]]] = MappingProxyType({})

    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    missing: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The record's attribute fields (without ``extra`` / ``missing``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "missing"))

    def to_attrs(self) -> dict[str, Any]:
        """The JSON attributes (without ``encoding-type`` / ``encoding-version``)."""
        out: dict[str, Any] = {}
        for name in self.field_names():
            v = getattr(self, name)
            if name in self.missing or (v is None and name in self.OMIT_NONE):
                continue
            out[name] = v.to_attrs() if isinstance(v, Record) else v
        return jsonable({**out, **self.extra})

    @classmethod
    def from_attrs(cls: type[R], attrs: Mapping[str, Any], where: str = "") -> R:
        """A record from an element's attributes; a StoreError when a required field is absent."""
        names = cls.field_names()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        missing, required = [], []
        for name in names:
            if name in attrs:
                v = attrs[name]
                nested = cls.NESTED.get(name)
                values[name] = nested.from_attrs(v, where) if nested is not None and isinstance(v, Mapping) else v
            elif fields[name].default is dataclasses.MISSING and fields[name].default_factory is dataclasses.MISSING:
                required.append(name)
            else:
                missing.append(name)
        if required:
            raise StoreError(f"{where or 'an element'} ({cls.KIND}) lacks the attribute(s) {', '.join(required)}",
                             "the store is damaged or was not written by scdm: re-extract it")
        extra = {k: v for k, v in attrs.items() if k not in names and k not in _ENCODING_KEYS}
        return cls(**values, extra=extra, missing=tuple(missing))


@dataclass(frozen=True, kw_only=True)
class StoreRecord(Record):
    """The root group (``scdm-store``)."""

    KIND: ClassVar[str] = "scdm-store"
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"migrations"})

    scdm_version: str | None = None
    created: str | None = None
    #: one entry per ``scdm-embed migrate`` that changed the store: from, to, at, scdm_version
    migrations: list[dict[str, Any]] | None = None


@dataclass(frozen=True, kw_only=True)
class DatasetRecord(Record):
    """A dataset group (``scdm-dataset``): where its cells came from and their identity."""

    KIND: ClassVar[str] = "scdm-dataset"

    input_hash: str
    n_cells: int
    #: since 0.2.0 (``scdm-embed migrate`` computes it from the stored cell table)
    cells_hash: str | None = None
    n_genes: int | None = None
    source: str | None = None
    label_convention: str | None = None
    created: str | None = None


@dataclass(frozen=True, kw_only=True)
class Telemetry(Record):
    """What the engine measured over an extraction (``telemetry`` of an embedding group)."""

    KIND: ClassVar[str] = "telemetry"
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"peak_gpu_mb", "n_params"})

    seconds: float
    cells_per_s: float
    peak_rss_mb: float | None = None
    batch_size: int | None = None
    token_budget: int | None = None
    #: only on CUDA
    peak_gpu_mb: float | None = None
    #: parameters of the adapter's network (None: no torch module, e.g. pca/hvg; absent in older stores)
    n_params: int | None = None


@dataclass(frozen=True, kw_only=True)
class Provenance(Record):
    """What an embedding was computed from and with (built by the engine before the array exists).

    Every field but ``input_hash`` may be absent from arrays written through the API
    (:meth:`~scdm_embed.store.EmbeddingStore.put_embedding`), so they default to None.
    """

    KIND: ClassVar[str] = "scdm-embedding"
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"cell_context"})

    input_hash: str
    #: the adapter's typed options as given/resolved (not in the earliest 0.1.0 stores)
    options: dict[str, Any] | None = None
    model_version: str | None = None
    checkpoint: str | None = None
    checkpoint_hash: str | None = None
    #: since 0.2.0; None = not recorded (an 0.1.0 array)
    trust_checkpoint: bool | None = None
    settings: dict[str, Any] | None = None
    input_path: str | None = None
    layer: str | None = None
    gene_key: str | None = None
    scdm_version: str | None = None
    torch_version: str | None = None
    device: str | None = None
    compute_dtype: str | None = None
    gene_overlap: dict[str, Any] | None = None
    chunk_rows: int | None = None
    #: only for models whose cells attend to each other (CellPLM): cells per forward
    cell_context: int | None = None


@dataclass(frozen=True, kw_only=True)
class EmbeddingRecord(Provenance):
    """An embedding group (``scdm-embedding``): layout, completeness, provenance and telemetry."""

    KIND: ClassVar[str] = "scdm-embedding"
    OMIT_NONE: ClassVar[frozenset[str]] = Provenance.OMIT_NONE | {"completed", "telemetry"}
    NESTED: ClassVar[Mapping[str, type[Record]]] = MappingProxyType({"telemetry": Telemetry})

    model: str
    dataset: str
    n_cells: int
    dim: int
    chunk_rows: int
    dtype: str = "float32"
    complete: bool = False
    created: str | None = None
    completed: str | None = None
    telemetry: Telemetry | None = None

    @property
    def provenance(self) -> Provenance:
        """The provenance part alone."""
        names = Provenance.field_names()
        return Provenance(**{n: getattr(self, n) for n in names}, missing=tuple(m for m in self.missing if m in names))


@dataclass(frozen=True, kw_only=True)
class SplitRecord(Record):
    """A split group (``scdm-split``): the parameters, what they were computed on, the partitions."""

    KIND: ClassVar[str] = "scdm-split"

    scheme: str
    by: str
    folds: int | None = None
    group_key: str | None = None
    seed: int | None = None
    study_key: str | None = None
    cell_hash: str | None = None
    n_cells: int | None = None
    datasets: list[str] | None = None
    #: one dict per partition: category, fold, name, sizes and class counts, skipped (reason or "")
    partitions: list[dict[str, Any]] = field(default_factory=list)
    created: str | None = None

    def params(self) -> dict[str, Any]:
        """The split's parameters (everything but the partitions and the timestamp; extras kept, absent ones left out)."""
        return {**{n: getattr(self, n) for n in self.field_names()
                   if n not in ("partitions", "created") and n not in self.missing}, **self.extra}


__all__ = ["CHANGES", "FORMAT_VERSION", "TOP_GROUPS", "VERSIONS", "DatasetRecord", "EmbeddingRecord", "Provenance",
           "Record", "SplitRecord", "StoreRecord", "Telemetry", "check_element", "is_older", "jsonable",
           "parse_version", "stamp"]
