"""The extraction engine: AnnData chunks -> adapter -> store, resumable, with telemetry.

What every model shares lives here: input validation before any write, device and dtype,
chunked streaming, batching (see :mod:`.runner`), stale-cache checks, chunk-level resume,
progress and the provenance written beside each array.
"""

from __future__ import annotations

import errno
import logging
import resource
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import store as stores
from ._shard import Shard, as_shard
from ._version import __version__
from .errors import InputError, ScdmError, StaleCacheError, StoreError
from .genes import DEFAULT_MIN_OVERLAP
from .inputs import InputDataset, LabelSpec, read_input
from .models import get_adapter
from .models.base import Adapter, CellChunk, GeneOverlap
from .runner import Runner, resolve_device, resolve_dtype
from .store import DEFAULT_STORE, EmbeddingStore, Provenance, Telemetry
from .store._core import store_location

log = logging.getLogger(__name__)

#: dtypes an embedding array may be stored in
STORE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ExtractionResult:
    """What :func:`extract` did."""

    model: str
    dataset: str
    store: Path
    status: str  #: "written", "resumed", "metadata-updated" (cell table rewritten, embeddings kept) or "up-to-date"
    n_cells: int
    dim: int
    chunks_computed: int
    seconds: float
    cells_per_s: float
    overlap: dict[str, Any]
    #: whether the array is complete after this run (False: a shard finished, others are still to come)
    complete: bool = True
    #: the shard this run computed ("i/n"), or None for the whole input
    shard: str | None = None


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux VmHWM: not inherited across exec, unlike ru_maxrss)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def extract(
    input: str | Path | InputDataset,
    *,
    model: str,
    store: str | Path = DEFAULT_STORE,
    dataset: str | None = None,
    checkpoint: str | Path | None = None,
    labels: LabelSpec | None = None,
    meta_keys: Mapping[str, str | None] | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
    batch_size: int | None = None,
    token_budget: int | None = None,
    chunk_size: int = 1024,
    device: str = "auto",
    dtype: str = "auto",
    store_dtype: str = "float32",
    min_overlap: float = DEFAULT_MIN_OVERLAP,
    reference: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    model_options: Mapping[str, Any] | None = None,
    trust_checkpoint: bool = False,
    allow_single_class: bool = False,
    shard: Shard | tuple[int, int] | str | None = None,
    qc: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ExtractionResult:
    """Compute ``model``'s embeddings of every cell of ``input`` into ``store`` (once).

    ``token_budget`` caps padded tokens per batch (default: 4,096 on CPU, 65,536 on CUDA;
    0 = no cap). Everything that can be wrong with the input, checkpoint or store is checked before the
    store is touched. An interrupted run resumes at the first unfinished chunk when re-run
    with the same arguments. A store holding embeddings of another input or checkpoint is
    refused unless ``overwrite``. Checkpoint pickles are read with a restricted unpickler
    (torch files with ``weights_only=True``) unless ``trust_checkpoint`` (full unpickling:
    only for a file known to be the authors'). A dataset whose cells are all one class is
    refused unless ``allow_single_class`` (it will be pooled with datasets of the other class).

    ``shard=(i, n)`` (or ``"i/n"``) computes only the chunks ``c`` with ``c % n == i``, into the
    same store as the other shards, concurrently (see :mod:`scdm_embed._shard`); the shard that
    finds every chunk done marks the array complete. With a shard, ``overwrite`` replaces an array
    or dataset of another input or settings but resumes one of the same (shards never delete each
    other's chunks). ``on_progress(done_cells, total_cells)`` is called after each chunk written.
    """
    shard = as_shard(shard)
    where = store_location(store)
    if isinstance(where, str):
        raise StoreError(f"extraction writes a local store (it locks and renames files); {where!r} is a URL",
                         "extract into a local path (or a mounted bucket), then copy the store up, e.g. "
                         "`aws s3 sync STORE s3://BUCKET/STORE` or `gsutil -m rsync -r STORE gs://BUCKET/STORE`")
    store = where  # a file:// URL is a local path
    if store_dtype not in STORE_DTYPES:
        raise ScdmError(f"unknown store dtype {store_dtype!r}", f"use one of: {', '.join(STORE_DTYPES)}")
    # the store path and dataset name are checked before the (possibly long) input read
    stores.check_store_path(store)
    if dataset is not None:
        stores.check_name(dataset, "dataset")
    if not Path(store).exists() and not stores.store_writable(store):
        raise stores.store_os_error(PermissionError(errno.EACCES, "not writable"), store)
    if trust_checkpoint:
        log.warning("--trust-checkpoint: the %s checkpoint files are unpickled in full; any code in them runs", model)
    adapter = get_adapter(model)(checkpoint, trust_checkpoint=trust_checkpoint, **dict(model_options or {}))
    qc_report = None
    if qc is not None and not isinstance(input, InputDataset):  # --qc paper: QC'd cells, recorded (see .qc)
        from .qc import qc_input

        input, qc_report = qc_input(input, preset=qc, labels=labels, meta_keys=meta_keys, gene_key=gene_key, layer=layer,
                                    require_counts=adapter.needs_counts, allow_single_class=allow_single_class,
                                    allow_duplicate_genes=adapter.allows_duplicate_genes)
    data = input if isinstance(input, InputDataset) else read_input(
        input, labels=labels, meta_keys=meta_keys, gene_key=gene_key, layer=layer, require_counts=adapter.needs_counts,
        allow_duplicate_genes=adapter.allows_duplicate_genes, allow_single_class=allow_single_class)
    if adapter.needs_counts and not data.is_integer:
        raise InputError(f"model {model!r} needs raw integer counts but {data.path.name} holds non-integer values",
                         "use the raw counts layer (--layer) or adata.raw")
    try:
        return _run_extraction(data, adapter, model=model, store=store, dataset=dataset, batch_size=batch_size,
                        token_budget=token_budget, chunk_size=chunk_size, device=device, dtype=dtype,
                        store_dtype=store_dtype, min_overlap=min_overlap, reference=reference, overwrite=overwrite,
                        progress=progress, shard=shard, qc=None if qc_report is None else qc_report.to_dict(),
                        on_progress=on_progress)
    finally:
        if data is not input or qc_report is not None:  # we opened it
            data.close()


def _run_extraction(data: InputDataset, adapter: Adapter, *, model: str, store: str | Path, dataset: str | None,
             batch_size: int | None, token_budget: int | None, chunk_size: int, device: str, dtype: str,
             store_dtype: str, min_overlap: float, reference: str | Path | None, overwrite: bool,
             progress: bool, shard: Shard | None = None, qc: dict[str, Any] | None = None,
             on_progress: Callable[[int, int], None] | None = None) -> ExtractionResult:
    """Load the model, decide and write the metadata under the store's lock, then embed the
    chunks still to do (rolling back what this run created when it fails on bad input)."""
    name = dataset or data.path.stem
    stores.check_name(name, "dataset")  # before the name becomes a path
    store_path = Path(store)
    stores.check_store_path(store_path)
    if shard is None:  # shards starting together may see a store being created: they check under the lock only
        st_ro = EmbeddingStore(store_path, mode="r") if (store_path / "zarr.json").exists() else None
        _check_dataset(st_ro, name, data, overwrite)  # early refusal; repeated under the lock

    dev = resolve_device(device)
    tdt = resolve_dtype(dtype, adapter, dev)
    adapter.load(device=dev, dtype=tdt)
    bs = batch_size or adapter.default_batch_size
    runner = Runner(adapter, batch_size=bs, token_budget=token_budget)  # None: the device default, 0: no cap
    token_budget = runner.token_budget
    # Metadata (fitted reference, cell table, array) is decided and written under the store's lock,
    # from the store as it is once the lock is held: concurrent extractions into one store share one
    # reference. Chunk writes below do not take the lock.
    with stores.store_lock(store_path) as lock:
        st_ro = EmbeddingStore(store_path, mode="r") if (store_path / "zarr.json").exists() else None
        _check_dataset(st_ro, name, data, overwrite)
        new_reference = None
        if adapter.requires_reference:
            new_reference = _attach_reference(adapter, st_ro, data, reference, overwrite=overwrite)
        plan = adapter.prepare(data.genes)
        overlap = plan.overlap
        check_overlap(overlap, model=model, dataset=name, min_overlap=min_overlap)

        provenance = _provenance(adapter, model, data, overlap, dev, tdt, chunk_size)
        if not adapter.batch_invariant:
            # cells attend to each other: the batch (capped by the chunk) is part of what an embedding means
            provenance["cell_context"] = min(bs, chunk_size)
        if qc is not None:  # the QC settings the cells passed (--qc); the per-sample table is the dataset's
            provenance["qc"] = qc["settings"]
        status, todo, new_cells = _plan(st_ro, name, model, provenance, overwrite, data, sharded=shard is not None)
        if status == "up-to-date":
            return ExtractionResult(model, name, store_path, status, data.n_cells, adapter.dim, 0, 0.0, float("nan"),
                                    overlap.to_dict(), shard=_label(shard))
        if shard is not None:
            todo = shard.chunks(todo)
        if not lock.writable:
            raise StoreError(f"the store {str(store_path)!r} is not writable, and {model}/{name} needs "
                             f"{'its cell table updated' if status == 'metadata-updated' else 'to be computed'}",
                             "make the store writable, or point --store at a writable path")
        ref_name = adapter.reference_name if adapter.requires_reference else None
        created = _created(store_path, st_ro, name, model, ref_name if new_reference is not None else None, status)
        try:
            st = EmbeddingStore(store_path, mode="a")
            if new_reference is not None:
                st.put_reference(adapter.reference_name, new_reference[0], **new_reference[1])
            if new_cells:
                st.put_dataset(name, data.cells, input_hash=data.content_hash, source=str(data.path), n_genes=data.n_genes,
                               label_convention="label 1 = sensitive (positive class), 0 = resistant",
                               **({"qc": qc} if qc is not None else {}))
            if status == "written":
                st.create_embedding(model, name, n_cells=data.n_cells, dim=adapter.dim, dtype=store_dtype, **provenance)
        except BaseException as e:
            _remove_created(store_path, created, model=model, dataset=name, reference=ref_name)
            if stores.is_write_failure(e):
                raise stores.store_os_error(e, store_path) from None
            raise
        lock.keep()
    if status in ("up-to-date", "metadata-updated"):
        return ExtractionResult(model, name, store_path, status, data.n_cells, adapter.dim, 0, 0.0, float("nan"),
                                overlap.to_dict(), shard=_label(shard))

    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    done_cells = 0
    try:
        with Progress(TextColumn(f"[bold]{model}[/] · {name}"), BarColumn(), MofNCompleteColumn(), TextColumn("cells"),
                      TimeRemainingColumn(), disable=not progress, transient=False) as bar:
            before = data.n_cells - sum(_chunk_len(c, chunk_size, data.n_cells) for c in todo)  # done by earlier runs
            task = bar.add_task("embed", total=data.n_cells, completed=before)
            cell_ids = data.cells.index.to_numpy()
            for c in todo:
                s = c * chunk_size
                X = data.read_rows(s, min(s + chunk_size, data.n_cells))
                chunk = CellChunk(X=X, cell_ids=cell_ids[s:s + X.shape[0]], genes=data.genes, start=s,
                                  n_counts=None if data.n_counts is None else data.n_counts[s:s + X.shape[0]])
                emb = runner.embed(adapter.tokenize(chunk, plan), on_batch=lambda k: bar.advance(task, k))
                if not np.all(np.isfinite(emb)):
                    raise RuntimeError(f"{model} produced non-finite embeddings in chunk {c} (rows {s}..{s + X.shape[0] - 1})")
                st.write_chunk(model, name, c, emb)
                done_cells += X.shape[0]
                if on_progress is not None:
                    on_progress(before + done_cells, data.n_cells)
        seconds = time.perf_counter() - t0
        telemetry = Telemetry(seconds=round(seconds, 3), cells_per_s=round(done_cells / max(seconds, 1e-9), 2),
                              peak_rss_mb=round(_peak_rss_mb(), 1), batch_size=bs, token_budget=token_budget,
                              n_params=_n_params(adapter),
                              peak_gpu_mb=round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
                              if dev.type == "cuda" else None)
        with stores.store_lock(store_path):
            # a shard completes the array only when every shard's chunks are done
            complete = shard is None or bool(st.done_flags(model, name).all())
            if complete:
                st.finish_embedding(model, name, telemetry=telemetry)
    except BaseException as e:
        # bad input discovered while tokenizing, or a full / read-only disk: undo what this run
        # created (resumed runs keep their earlier chunks); interruptions and crashes keep their
        # progress for a resume
        full = stores.is_write_failure(e)
        if isinstance(e, ScdmError) or full:
            with stores.store_lock(store_path):
                if shard is not None and _any_done(store_path, model, name):
                    created = set()  # other shards wrote into it: keep their chunks
                _remove_created(store_path, created, model=model, dataset=name, reference=ref_name)
        if full:
            raise stores.store_os_error(e, store_path) from None
        raise
    return ExtractionResult(model, name, store_path, status, data.n_cells, adapter.dim, len(todo), seconds,
                            telemetry.cells_per_s, overlap.to_dict(), complete=complete, shard=_label(shard))


def check_overlap(overlap: GeneOverlap, *, model: str, dataset: str, min_overlap: float = DEFAULT_MIN_OVERLAP) -> None:
    """Refuse (InputError) a dataset whose genes barely meet the model's (``coverage < min_overlap``)."""
    if overlap.coverage < min_overlap:
        raise InputError(
            f"model {model!r} and dataset {dataset!r} barely share genes: the model uses {overlap.n_data_used} of the "
            f"dataset's {overlap.n_data} genes ({overlap.fraction_used:.1%}) and finds {overlap.n_vocab_in_data} of its "
            f"{overlap.n_vocab} vocabulary genes ({overlap.fraction_vocab:.1%}), both below --min-overlap {min_overlap:.0%}",
            "check the gene identifiers (symbols vs Ensembl ids, species; --gene-key), or lower --min-overlap")


def _n_params(adapter: Adapter) -> int | None:
    """Parameter count of the adapter's network (None without a torch module: pca, hvg)."""
    module = adapter.torch_module()
    return int(sum(p.numel() for p in module.parameters())) if isinstance(module, torch.nn.Module) else None


def _label(shard: Shard | None) -> str | None:
    return None if shard is None else str(shard)


def _any_done(store_path: Path, model: str, dataset: str) -> bool:
    """Whether any chunk of the array is flagged done (False when it cannot be read)."""
    try:
        return bool(EmbeddingStore(store_path, mode="r").done_flags(model, dataset).any())
    except (ScdmError, OSError, KeyError):
        return False


def _created(store_path: Path, st_ro: EmbeddingStore | None, name: str, model: str, reference: str | None,
             status: str) -> set[str]:
    """What the metadata writes about to happen will create (what a failed run rolls back)."""
    out = set()
    if st_ro is None:
        out.add("store")
    if st_ro is None or name not in st_ro.datasets():
        out.add("dataset")
    if status == "written" and not (store_path / "embeddings" / model).exists():
        out.add("model")
    if status == "written" and not (store_path / "embeddings" / model / name).exists():
        out.add("array")
    if reference is not None and not (store_path / "references" / reference).exists():
        out.add("reference")
    return out


def _subgroups(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []


def _remove_created(store_path: Path, created: set[str], *, model: str, dataset: str, reference: str | None) -> None:
    """Delete what a failed run created (see :func:`_created`); call it holding the store lock.

    Leaves what other runs (possibly concurrent ones) added since: a dataset another model's array
    uses, a reference another array was projected with, a store that holds anything else.
    """
    emb = store_path / "embeddings"
    if "array" in created:
        shutil.rmtree(emb / model / dataset, ignore_errors=True)
    if "dataset" in created and not any((m / dataset).is_dir() for m in _subgroups(emb)):
        shutil.rmtree(store_path / "datasets" / dataset, ignore_errors=True)
    model_unused = not _subgroups(emb / model)
    if "reference" in created and reference is not None and not _subgroups(emb / reference):
        shutil.rmtree(store_path / "references" / reference, ignore_errors=True)
    if "model" in created and model_unused:
        shutil.rmtree(emb / model, ignore_errors=True)
    if "store" in created and not any(_subgroups(store_path / g) for g in ("datasets", "embeddings", "references", "splits")):
        shutil.rmtree(store_path, ignore_errors=True)


def _chunk_len(c: int, chunk_size: int, n: int) -> int:
    return min(chunk_size, n - c * chunk_size)


def _provenance(adapter: Adapter, model: str, data: InputDataset, overlap: GeneOverlap, dev: torch.device,
                tdt: torch.dtype, chunk_size: int) -> dict[str, Any]:
    """The :class:`~scdm_embed.store.Provenance` of this extraction, as the array's attributes."""
    return Provenance(
        options={k: v if isinstance(v, (bool, int, float)) or v is None else str(v) for k, v in adapter.options.items()},
        model_version=adapter.version,
        checkpoint=str(adapter.checkpoint) if adapter.checkpoint else None,
        checkpoint_hash=adapter.checkpoint_hash(),
        trust_checkpoint=bool(adapter.trust_checkpoint),
        settings=adapter.settings(),
        input_hash=data.content_hash,
        input_path=str(data.path),
        layer=data.layer,
        gene_key=data.gene_key,
        scdm_version=__version__,
        torch_version=torch.__version__,
        device=str(dev),
        compute_dtype=str(tdt).replace("torch.", ""),
        gene_overlap=overlap.to_dict(),
        chunk_rows=chunk_size,
    ).to_attrs()


_IDENTITY_KEYS = ("model_version", "checkpoint_hash", "settings", "input_hash", "chunk_rows", "cell_context", "qc")


def _check_dataset(st_ro: EmbeddingStore | None, name: str, data: InputDataset, overwrite: bool) -> None:
    """Refuse a dataset name the store holds for another input (unless ``overwrite``)."""
    if st_ro is not None and name in st_ro.datasets():
        held = st_ro.dataset_attrs(name).get("input_hash")
        if held != data.content_hash and not overwrite:
            raise StaleCacheError(f"the store holds dataset {name!r} from a different input (hash {str(held)[:12]} != {data.content_hash[:12]})",
                                  "pass --overwrite to replace it, or --dataset NEW_NAME to keep both")


def _plan(st_ro: EmbeddingStore | None, name: str, model: str, prov: dict[str, Any], overwrite: bool,
          data: InputDataset, *, sharded: bool = False) -> tuple[str, list[int], bool]:
    """Decide without writing: (status, chunks to compute, whether the cell table must be (re)written).

    status: "written" (fresh or ``overwrite``), "resumed", "metadata-updated" (embeddings current,
    the cell table changed: labels, study, ...) or "up-to-date". ``sharded``: ``overwrite``
    replaces only an array of other settings (one of the same is another shard's: resumed).
    """
    held_ds = st_ro.dataset_attrs(name) if st_ro is not None and name in st_ro.datasets() else None
    new_cells = (held_ds is None or held_ds.get("input_hash") != data.content_hash
                 or held_ds.get("cells_hash") != stores.cells_hash(data.cells))
    g = st_ro.embedding_group(model, name) if st_ro is not None else None
    n_chunks = -(-data.n_cells // prov["chunk_rows"])
    if g is not None:
        held = dict(g.attrs)
        diff = [k for k in _IDENTITY_KEYS if _norm(held.get(k)) != _norm(prov.get(k))]
        if diff and not overwrite:
            raise StaleCacheError(
                f"the store holds {model}/{name} computed with a different {', '.join(diff)}",
                "pass --overwrite to recompute it, or --dataset NEW_NAME to keep both")
        if not diff and (not overwrite or sharded):
            done = st_ro.done_flags(model, name)
            if held.get("complete") and done.all():
                return ("metadata-updated" if new_cells else "up-to-date"), [], new_cells
            return "resumed", [int(i) for i in np.flatnonzero(~done)], new_cells
    return "written", list(range(n_chunks)), new_cells


def _norm(v: Any) -> Any:
    import json

    return json.dumps(v, sort_keys=True, default=str)


def _attach_reference(adapter: Adapter, st_ro: EmbeddingStore | None, data: InputDataset,
                      reference: str | Path | None, *, overwrite: bool):
    """Use the store's fitted reference for this model, or fit one; returns a new fit to record."""
    held = st_ro.get_reference(adapter.reference_name) if st_ro is not None else None
    if reference is not None:
        ref_data = reference if isinstance(reference, InputDataset) else read_input(
            reference, require_labels=False, require_counts=adapter.needs_counts)
        try:
            fitted = adapter.fit_reference(ref_data)
        finally:
            if ref_data is not reference:
                ref_data.close()
        if held is not None and held[1].get("fit_hash") != fitted[1].get("fit_hash") and not overwrite:
            raise StaleCacheError(f"the store's {adapter.reference_name} reference was fitted on {held[1].get('fitted_on')!r}",
                                  "omit --reference to reuse it, or pass --overwrite to refit (this makes existing arrays stale)")
        if held is not None and held[1].get("fit_hash") == fitted[1].get("fit_hash"):
            adapter.set_reference(*held)  # the same fit: keep the stored one as it is
            return None
        adapter.set_reference(*fitted)
        return fitted
    if held is not None:
        adapter.set_reference(*held)
        return None
    fitted = adapter.fit_reference(data)
    adapter.set_reference(*fitted)
    return fitted
