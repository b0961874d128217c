"""Background prediction jobs: one worker thread runs ``scdm_eval.predict`` on each upload in turn.

Each job embeds its upload into a scratch store of its own (the served store's fitted
references copied in, so pca/hvg reuse the training fit) and never writes the served store.
"""

from __future__ import annotations

import shutil
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from scdm_embed.errors import ScdmError

from .db import Database, Job, Upload, now


class JobRunner:
    """Queue of prediction jobs (``workers`` threads, 1 by default) recorded in the database."""

    def __init__(self, db: Database, *, store: Path, uploads: Path, outputs: Path, scratch: Path,
                 bundles: dict[str, Path], workers: int = 1) -> None:
        self.db, self.store, self.uploads, self.outputs, self.scratch = db, store, uploads, outputs, scratch
        self.bundles = bundles
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

    def _run(self, job_id: int) -> None:
        from scdm_eval._bundle import predict

        with self.db.session() as s:
            job = s.get(Job, job_id)
            bundle_key = job.bundle
            upload_name = s.get(Upload, job.upload_id).stored_name
        scratch = None
        try:
            self._update(job_id, status="running", progress=0.1, stage="preparing the embedding store")
            bundle = self.bundles.get(bundle_key)
            if bundle is None:
                raise ScdmError(f"bundle {bundle_key!r} is no longer available", "pick another bundle")
            scratch = self._scratch_store(job_id)
            self._update(job_id, progress=0.3, stage="embedding the cells and predicting")
            out = self.outputs / f"job-{job_id}.csv"
            res = predict(bundle, scratch, input=self.uploads / upload_name, dataset=f"upload-{job_id}", out=out)
            n1 = int((res["predicted"] == "sensitive").sum())
            self._update(job_id, status="done", progress=1.0, stage="done", result_name=out.name, n_cells=len(res),
                         n_sensitive=n1, finished=now())
        except ScdmError as e:
            self._update(job_id, status="failed", stage="failed", message=e.problem, hint=e.fix or "", finished=now())
        except Exception as e:  # a bug: keep the server alive, show it on the job page
            traceback.print_exc()
            self._update(job_id, status="failed", stage="failed", message=f"{type(e).__name__}: {e}",
                         hint="this is a bug in scdm: please report it with the file", finished=now())
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def wait(self, job_id: int, timeout: float | None = None) -> None:
        """Block until job ``job_id`` has run (API / tests)."""
        fut = self.futures.get(job_id)
        if fut is not None:
            fut.result(timeout=timeout)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["JobRunner"]
