"""Background prediction jobs: one worker thread runs ``scdm_eval.predict`` on each upload in turn.

Each job embeds its upload into a scratch store of its own (the served store's fitted
references copied in, so pca/hvg reuse the training fit) and never writes the served store.
"""

from __future__ import annotations

import json
import shutil
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from scdm_embed.errors import InputError, ScdmError

from .db import Database, Job, Upload, now

#: cells per extraction chunk (the unit of the job's progress), as ``scdm-embed extract --chunk-size``
CHUNK_SIZE = 1024
#: job progress at the end of each stage: scratch store ready, cells embedded (per chunk in between)
_READY, _EMBEDDED = 0.05, 0.9
_adapters: dict[tuple, Any] = {}  # loaded adapters (gene vocabularies) of the bundles last validated against
_adapters_lock = threading.Lock()


def bundle_embedding(bundle: Path) -> tuple[str, Path | None, dict[str, Any]]:
    """The (model, checkpoint, options) a bundle's embeddings were computed with (its provenance)."""
    try:
        prov = json.loads((Path(bundle) / "bundle.json").read_text(encoding="utf-8"))["provenance"]
        model = str(prov["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ScdmError(f"the classifier bundle {Path(bundle).name!r} cannot be read ({type(e).__name__})",
                        "pick another bundle, or re-fit it with `scdm-eval fit`") from None
    ckpt = prov.get("checkpoint")
    opts = {k: v for k, v in (prov.get("options") or {}).items() if v is not None}
    return model, None if not ckpt else Path(ckpt), opts


def read_upload(path: Path, model: str):
    """The upload as an InputDataset, read as ``scdm-eval predict --input`` reads it (labels optional)."""
    from scdm_embed.inputs import read_input
    from scdm_embed.models import get_adapter

    adapter = get_adapter(model)
    return read_input(path, require_labels=False, require_counts=bool(getattr(adapter, "needs_counts", True)),
                      allow_single_class=True)


def check_gene_overlap(data: Any, bundle: Path, store: Path) -> None:
    """Refuse (InputError) cells whose genes barely meet what the bundle's model needs, as extraction would.

    pca/hvg are checked against the served store's fitted reference (none yet: the job fits one on
    the upload, nothing to check); a network's vocabulary is read once per bundle and kept.
    """
    import torch

    from scdm_embed._engine import check_overlap
    from scdm_embed.models import get_adapter
    from scdm_embed.store import EmbeddingStore
    from scdm_eval._lora_bundle import is_lora_bundle

    if is_lora_bundle(bundle):  # its base model's genes are checked when the job embeds the cells
        return
    model, ckpt, opts = bundle_embedding(bundle)
    cls = get_adapter(model)
    if cls.requires_reference:
        adapter = cls(ckpt, **opts)
        held = EmbeddingStore(store, mode="r").get_reference(adapter.reference_name)
        if held is None:
            return
        adapter.set_reference(*held)
    else:
        key = (model, str(ckpt), json.dumps(opts, sort_keys=True, default=str))
        with _adapters_lock:
            adapter = _adapters.get(key)
            if adapter is None:
                adapter = cls(ckpt, **opts)
                adapter.load(device=torch.device("cpu"), dtype=torch.float32)
                _adapters.clear()  # keep one network in memory
                _adapters[key] = adapter
    try:
        check_overlap(adapter.prepare(data.genes).overlap, model=model, dataset="the upload")
    except InputError as e:  # the same check and numbers; the fix a web user can apply
        raise InputError(e.problem.replace("--min-overlap", "the minimum overlap"),
                         f"give the upload the gene identifiers the {model} bundle was trained on (var_names: "
                         "gene symbols vs Ensembl ids, same species), or pick a bundle of another model") from None


class JobRunner:
    """Queue of prediction jobs (``workers`` threads, 1 by default) recorded in the database."""

    def __init__(self, db: Database, *, store: Path, uploads: Path, outputs: Path, scratch: Path,
                 bundles: dict[str, Path], workers: int = 1, chunk_size: int = CHUNK_SIZE) -> None:
        self.db, self.store, self.uploads, self.outputs, self.scratch = db, store, uploads, outputs, scratch
        self.bundles, self.chunk_size = bundles, chunk_size
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scdm-job")
        self.futures: dict[int, Future] = {}
        self._lock = threading.Lock()

    def recover(self) -> None:
        """Mark jobs left queued/running by a previous server as failed (their thread is gone)."""
        with self.db.session() as s:
            for job in s.query(Job).filter(Job.status.in_(("queued", "running"))):
                job.status, job.stage, job.finished = "failed", "interrupted", now()
                job.message = "the server stopped before this job finished"
                job.hint = "upload the file again"

    def submit(self, job_id: int) -> None:
        with self._lock:
            self.futures[job_id] = self.pool.submit(self._run, job_id)

    def _update(self, job_id: int, **fields: Any) -> None:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            for k, v in fields.items():
                setattr(job, k, v)

    def _scratch_store(self, job_id: int) -> Path:
        """A new store holding only the served store's root attributes and fitted references."""
        path = self.scratch / f"job-{job_id}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        shutil.copy2(self.store / "zarr.json", path / "zarr.json")
        refs = self.store / "references"
        if refs.is_dir():
            shutil.copytree(refs, path / "references", ignore=shutil.ignore_patterns(".tmp-*", "umap-*"))
        return path

    def _embed(self, job_id: int, bundle: Path, upload: Path, scratch: Path, dataset: str) -> None:
        """Embed the upload into the scratch store with the bundle's model, recording progress per chunk."""
        from scdm_embed import extract

        model, ckpt, opts = bundle_embedding(bundle)

        def on_progress(done: int, total: int) -> None:
            self._update(job_id, progress=_READY + (_EMBEDDED - _READY) * done / max(total, 1),
                         stage=f"embedding the cells with {model}: {done:,} of {total:,}")

        data = read_upload(upload, model)
        try:
            self._update(job_id, stage=f"embedding the cells with {model}: 0 of {data.n_cells:,}")
            extract(data, model=model, store=scratch, dataset=dataset, checkpoint=ckpt, model_options=opts,
                    chunk_size=self.chunk_size, progress=False, on_progress=on_progress)
        finally:
            data.close()

    def _run(self, job_id: int) -> None:
        from scdm_eval._bundle import predict
        from scdm_eval._lora_bundle import is_lora_bundle

        with self.db.session() as s:
            job = s.get(Job, job_id)
            bundle_key = job.bundle
            upload_name = s.get(Upload, job.upload_id).stored_name
        scratch = None
        final: dict = {}
        try:
            self._update(job_id, status="running", progress=0.0, stage="preparing the embedding store")
            bundle = self.bundles.get(bundle_key)
            if bundle is None:
                raise ScdmError(f"bundle {bundle_key!r} is no longer available", "pick another bundle")
            scratch = self._scratch_store(job_id)
            self._update(job_id, progress=_READY)
            name, out = f"upload-{job_id}", self.outputs / f"job-{job_id}.csv"
            if is_lora_bundle(bundle):  # base model + adapter embed the cells inside predict
                self._update(job_id, stage="embedding the cells (LoRA) and predicting")
                res = predict(bundle, input=self.uploads / upload_name, dataset=name, out=out)
            else:
                self._embed(job_id, bundle, self.uploads / upload_name, scratch, name)
                self._update(job_id, progress=_EMBEDDED, stage="predicting")
                res = predict(bundle, scratch, dataset=name, out=out)
            n1 = int((res["predicted"] == "sensitive").sum())
            final = dict(status="done", progress=1.0, stage="done", result_name=out.name, n_cells=len(res),
                         n_sensitive=n1)
        except ScdmError as e:
            final = dict(status="failed", stage="failed", message=e.problem, hint=e.fix or "")
        except Exception as e:  # a bug: keep the server alive, show it on the job page
            traceback.print_exc()
            final = dict(status="failed", stage="failed", message=f"{type(e).__name__}: {e}",
                         hint="this is a bug in scdm: please report it with the file")
        finally:
            # the scratch store goes BEFORE the job is reported finished: a finished job leaves nothing behind
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            if final:
                self._update(job_id, **final, finished=now())

    def wait(self, job_id: int, timeout: float | None = None) -> None:
        """Block until job ``job_id`` has run (API / tests)."""
        fut = self.futures.get(job_id)
        if fut is not None:
            fut.result(timeout=timeout)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["CHUNK_SIZE", "JobRunner", "bundle_embedding", "check_gene_overlap", "read_upload"]
