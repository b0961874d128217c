"""The FastAPI app: datasets and models, leaderboard, figures, upload -> background prediction -> CSV.

Files live in three folders under ``work``: ``uploads/`` (generated names only), ``outputs/``
(``job-<id>.csv``) and ``scratch/`` (a job's temporary embedding store). Nothing is served from
anywhere else, and no client-supplied name becomes a path.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from scdm_embed.errors import ScdmError
from scdm_embed.store import EmbeddingStore
from scdm_eval._figures import (
    UMAP_MAX_CELLS,
    category_bars,
    label,
    radar,
    svg_text,
    umap_coordinates,
    umap_figure,
)
from scdm_eval._html import compute_table, html_table, load_results, summary_table
from scdm_eval._metrics import LOWER_IS_BETTER, METRICS
from scdm_eval._report import summarize

from .db import Database, Job, Upload
from .jobs import CHUNK_SIZE, JobRunner, check_gene_overlap, read_upload
from .templates import environment

#: default upload limit (MB)
MAX_UPLOAD_MB = 500
_COOKIE = "scdm_token"
_render_lock = threading.Lock()  # matplotlib's font and text caches are not thread-safe


@dataclass
class Settings:
    """What ``scdm-web`` serves and where it keeps its files."""

    store: Path
    results: Path
    work: Path
    db: str | None = None
    bundles: Path | None = None
    token: str | None = None
    max_upload_mb: float = MAX_UPLOAD_MB
    max_umap_cells: int = UMAP_MAX_CELLS
    #: cells per extraction chunk of a job (its progress moves per chunk), as ``scdm-embed extract --chunk-size``
    chunk_size: int = CHUNK_SIZE
    extra: dict[str, Any] = field(default_factory=dict)


def find_bundles(folder: Path, *, skip: Path | None = None, max_depth: int = 4) -> dict[str, dict[str, Any]]:
    """Classifier bundles (folders with a ``bundle.json``) under ``folder``: key (relative path) -> info."""
    out: dict[str, dict[str, Any]] = {}
    folder = folder.resolve()
    for meta in sorted(folder.rglob("bundle.json")):
        rel = meta.parent.relative_to(folder)
        if len(rel.parts) > max_depth or (skip is not None and meta.resolve().is_relative_to(skip.resolve())):
            continue
        try:
            m = json.loads(meta.read_text(encoding="utf-8"))
            info = {"path": meta.parent, "model": str(m["provenance"]["model"]), "classifier": str(m["classifier"]),
                    "n_cells": int(m.get("training", {}).get("n_cells", 0))}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out[rel.as_posix() or meta.parent.name] = info
    return out


class _State:
    """Loaded results, store and bundles, refreshed when their files change."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self._res_key: tuple = ()
        self._results: pd.DataFrame | None = None
        self._summary: pd.DataFrame | None = None
        self._figs: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def results(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        from scdm_eval._html import RESULT_FILES

        key = tuple((n, (self.s.results / n).stat().st_mtime_ns) for n in RESULT_FILES if (self.s.results / n).is_file())
        with self._lock:
            if key != self._res_key or self._results is None:
                self._results = load_results(self.s.results)
                self._summary = summarize(self._results)
                self._res_key, self._figs = key, {}
            return self._results, self._summary

    def store(self) -> EmbeddingStore:
        return EmbeddingStore(self.s.store)

    def bundles(self) -> dict[str, dict[str, Any]]:
        return find_bundles(self.s.bundles or self.s.results, skip=self.s.work)

    def figure(self, key: tuple, make) -> str:
        with self._lock:
            if key in self._figs:
                return self._figs[key]
        with _render_lock:
            svg = svg_text(make())
        with self._lock:
            self._figs[key] = svg
        return svg


def create_app(settings: Settings) -> FastAPI:
    """The web app for ``settings`` (folders under ``settings.work`` are created; the DB tables too)."""
    s = settings
    s.store, s.results, s.work = Path(s.store), Path(s.results), Path(s.work)
    EmbeddingStore(s.store)  # a StoreError now rather than on the first page
    load_results(s.results)
    dirs = {k: s.work / k for k in ("uploads", "outputs", "scratch")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    db = Database(s.db or f"sqlite:///{(s.work / 'scdm-web.db').resolve()}")
    state = _State(s)
    env = environment()
    runner = JobRunner(db, store=s.store, uploads=dirs["uploads"], outputs=dirs["outputs"], scratch=dirs["scratch"],
                       bundles={}, chunk_size=s.chunk_size)
    runner.recover()
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        runner.shutdown()
        db.dispose()

    app = FastAPI(title="scdm-web", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.settings, app.state.db, app.state.runner = s, db, runner

    def page(name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        ctx.setdefault("title", name.split(".")[0])
        body = env.get_template(name).render(store=str(s.store), results=str(s.results), **ctx)
        return HTMLResponse(body, status_code=status)

    def error(status: int, heading: str, msg: str, hint: str = "") -> HTMLResponse:
        return page("error.html", status, title=heading, heading=heading, error=msg, hint=hint)

    def authorised(request: Request, form_token: str | None = None) -> bool:
        if not s.token:
            return True
        given = [form_token, request.cookies.get(_COOKIE), request.headers.get("x-scdm-token")]
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given.append(auth[7:].strip())
        return any(g and hmac.compare_digest(g.encode(), s.token.encode()) for g in given)

    def denied() -> HTMLResponse:
        return error(401, "Token needed", "this server needs an access token for uploads and predictions",
                     "enter the token given to scdm-web --token (or send Authorization: Bearer TOKEN)")

    # -- browse ------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        st = state.store()
        rows = []
        for d in st.datasets():
            rec, cells = st.dataset_record(d), st.cells([d])
            lab = cells["label"] if "label" in cells else pd.Series([], dtype=int)
            studies = sorted(cells["study"].astype(str).unique()) if "study" in cells else []
            rows.append({"name": d, "cells": rec.n_cells, "genes": rec.n_genes or "", "sensitive": int((lab == 1).sum()),
                         "resistant": int((lab == 0).sum()), "unlabelled": int(len(cells) - (lab == 1).sum() - (lab == 0).sum()),
                         "studies": ", ".join(studies[:8]) + (" ..." if len(studies) > 8 else ""),
                         "source": rec.source or "", "input_hash": str(rec.input_hash)[:12], "created": rec.created or ""})
        ct = compute_table(st)
        compute = html_table(ct, headers={"cells_per_s": "cells/s", "peak_rss_mb": "peak RSS (MB)",
                                          "peak_gpu_mb": "peak GPU (MB)", "wall_s": "wall (s)"})
        return page("index.html", title="datasets and models", datasets=rows, compute=compute)

    def _filters(summary: pd.DataFrame, scheme: str, category: str, classifier: str, metric: str):
        opts = [("scheme", sorted(summary["scheme"].astype(str).unique()), scheme),
                ("category", sorted(summary["category"].astype(str).unique()), category),
                ("classifier", sorted(summary["classifier"].astype(str).unique()), classifier),
                ("metric", list(METRICS), metric)]
        sel = summary
        for col, val in (("scheme", scheme), ("category", category), ("classifier", classifier)):
            if val:
                sel = sel[sel[col].astype(str) == val]
        return opts, sel

    @app.get("/leaderboard", response_class=HTMLResponse)
    def leaderboard(scheme: str = "", category: str = "", classifier: str = "", metric: str = "auroc") -> HTMLResponse:
        if metric not in METRICS:
            return error(400, "Unknown metric", f"metric {metric!r} is not one of {', '.join(METRICS)}", "pick one in the list")
        _, summary = state.results()
        opts, sel = _filters(summary, scheme, category, classifier, metric)
        low = metric in LOWER_IS_BETTER
        sel = sel.sort_values(f"{metric}_mean", ascending=low, na_position="last", kind="stable")
        metrics = list(dict.fromkeys([metric, "f1", "auroc", "auprc", "accuracy"]))
        tab = summary_table(sel, metrics=metrics)
        tab.insert(0, "rank", range(1, len(tab) + 1))
        return page("leaderboard.html", title="leaderboard", filters=opts, table=html_table(tab), rows=len(tab),
                    metric_label=label(metric), direction="lower is better" if low else "higher is better")

    @app.get("/figures", response_class=HTMLResponse)
    def figures(scheme: str = "", category: str = "", classifier: str = "", metric: str = "auroc") -> HTMLResponse:
        if metric not in METRICS:
            return error(400, "Unknown metric", f"metric {metric!r} is not one of {', '.join(METRICS)}", "pick one in the list")
        _, summary = state.results()
        opts, sel = _filters(summary, scheme, category, classifier, metric)
        figs = []
        for sch, g in sel.groupby("scheme", sort=False):
            k = (str(sch), category, classifier, metric)
            figs.append((f"{sch}: F1 and AUROC per model and category (95% CI)",
                         state.figure(("bars", *k), lambda g=g: category_bars(g, metrics=list(dict.fromkeys(["f1", "auroc", metric]))))))
            figs.append((f"{sch}: {label(metric)} per category, one radar per model",
                         state.figure(("radar", *k), lambda g=g: radar(g, metric=metric))))
        models = [m for m in dict.fromkeys(summary["model"].astype(str)) if m in state.store().models()]
        return page("figures.html", title="figures", filters=opts, figures=figs, models=models,
                    max_cells=f"{s.max_umap_cells:,}")

    @app.get("/figures/umap/{model}", response_class=HTMLResponse)
    def umap_page(model: str) -> HTMLResponse:
        st = state.store()
        if model not in st.models():
            return error(404, "Unknown model", f"the store has no complete embeddings of model {model!r}",
                         f"pick one of: {', '.join(st.models())}")

        def make():
            coords, cells, n_total = umap_coordinates(st, model, max_cells=s.max_umap_cells)
            return umap_figure(coords, cells, model=model, n_total=n_total)

        svg = state.figure(("umap", model), make)
        return page("umap.html", title=f"UMAP {model}", model=model, svg=svg,
                    note="by response and by study; coordinates cached in the store")

    # -- predict -----------------------------------------------------------------------------
    def _models_and_bundles():
        bundles = state.bundles()
        models = list(dict.fromkeys(b["model"] for b in bundles.values()))
        return models, sorted(bundles.items())

    @app.get("/predict", response_class=HTMLResponse)
    def predict_form() -> HTMLResponse:
        models, bundles = _models_and_bundles()
        return page("predict.html", title="predict", models=models, bundles=bundles, max_mb=f"{s.max_upload_mb:g}",
                    token_required=bool(s.token), error=None)

    def _form_error(status: int, msg: str, hint: str) -> HTMLResponse:
        models, bundles = _models_and_bundles()
        return page("predict.html", status, title="predict", models=models, bundles=bundles,
                    max_mb=f"{s.max_upload_mb:g}", token_required=bool(s.token), error=msg, hint=hint)

    limit = int(s.max_upload_mb * 1024 * 1024)

    @app.post("/predict")
    async def predict_post(request: Request, file: UploadFile = File(...), bundle: str = Form(...),
                           model: str = Form(""), token: str = Form("")) -> Response:
        if not authorised(request, token):
            return denied()
        clen = request.headers.get("content-length", "")
        if clen.isdigit() and int(clen) > limit + 1024 * 1024:
            return _form_error(413, f"the upload is {int(clen) / 2**20:.1f} MB, above this server's limit of "
                               f"{s.max_upload_mb:g} MB", "upload a smaller file (subset the cells), or start "
                               "scdm-web with a larger --max-upload-mb")
        bundles = state.bundles()
        if bundle not in bundles:
            return _form_error(400, f"unknown classifier bundle {bundle[:80]!r}", "pick one of the bundles in the list")
        b = bundles[bundle]
        if model and model != b["model"]:
            return _form_error(400, f"bundle {bundle!r} classifies {b['model']} embeddings, not {model[:40]!r}",
                               f"pick model {b['model']}, or a bundle of model {model[:40]!r}")
        stored = f"{uuid.uuid4().hex}.h5ad"
        part = s.work / "uploads" / f".{stored}.part"
        size, h = 0, hashlib.sha256()
        try:
            with open(part, "wb") as fh:
                while chunk := await file.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise ScdmError(f"the file is larger than this server's limit of {s.max_upload_mb:g} MB",
                                        "upload a smaller file (subset the cells), or start scdm-web with a larger "
                                        "--max-upload-mb")
                    h.update(chunk)
                    fh.write(chunk)
            if size == 0:
                raise ScdmError("the uploaded file is empty", "choose an .h5ad file with cells")
            info = await run_in_threadpool(_validate, part, b["model"], b["path"], s.store)
        except ScdmError as e:
            part.unlink(missing_ok=True)
            return _form_error(413 if "limit" in e.problem else 400, e.problem, e.fix or "")
        finally:
            await file.close()
        final = s.work / "uploads" / stored
        part.rename(final)
        original = Path((file.filename or "upload.h5ad").replace("\\", "/")).name[:200]
        with db.session() as sess:
            up = Upload(stored_name=stored, original_name=original, size_bytes=size, n_cells=info[0], n_genes=info[1],
                        sha256=h.hexdigest())
            sess.add(up)
            sess.flush()
            job = Job(upload_id=up.id, model=b["model"], bundle=bundle)
            sess.add(job)
            sess.flush()
            job_id = job.id
        runner.bundles[bundle] = b["path"]
        runner.submit(job_id)
        resp = RedirectResponse(f"/jobs/{job_id}", status_code=303)
        if s.token and token:
            resp.set_cookie(_COOKIE, token, httponly=True, samesite="strict")
        return resp

    def _job(job_id: int) -> tuple[Job, Upload] | None:
        with db.session() as sess:
            job = sess.get(Job, job_id)
            if job is None:
                return None
            return job, sess.get(Upload, job.upload_id)

    @app.get("/jobs", response_class=HTMLResponse)
    def jobs_page(request: Request) -> HTMLResponse:
        if not authorised(request):
            return denied()
        with db.session() as sess:
            rows = [(j, sess.get(Upload, j.upload_id)) for j in sess.query(Job).order_by(Job.id.desc()).limit(200)]
        return page("jobs.html", title="jobs", jobs=rows)

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: int) -> HTMLResponse:
        if not authorised(request):
            return denied()
        got = _job(job_id)
        if got is None:
            return error(404, "No such job", f"there is no job {job_id}", "see the list of jobs")
        return page("job.html", title=f"job {job_id}", job=got[0], upload=got[1])

    @app.get("/api/jobs/{job_id}")
    def job_api(request: Request, job_id: int) -> JSONResponse:
        if not authorised(request):
            return JSONResponse({"error": "token needed"}, status_code=401)
        got = _job(job_id)
        if got is None:
            return JSONResponse({"error": f"no job {job_id}"}, status_code=404)
        return JSONResponse(got[0].as_dict())

    @app.get("/jobs/{job_id}/predictions.csv")
    def job_csv(request: Request, job_id: int) -> Response:
        if not authorised(request):
            return denied()
        got = _job(job_id)
        if got is None or got[0].status != "done":
            return error(404, "No predictions", f"job {job_id} has no predictions (yet)", "wait for the job to finish")
        folder = dirs["outputs"].resolve()
        path = (folder / got[0].result_name).resolve()
        if path.parent != folder or not path.is_file():
            return error(404, "No predictions", f"the predictions of job {job_id} are gone", "run the job again")
        return FileResponse(path, media_type="text/csv", filename=f"scdm-job-{job_id}-predictions.csv")

    return app


def _validate(path: Path, model: str, bundle: Path, store: Path) -> tuple[int, int]:
    """Open the upload like ``scdm-embed extract`` does: an AnnData with cells, genes and usable values,
    whose genes meet what the bundle's model needs (the extractor's overlap check)."""
    import h5py

    if not h5py.is_hdf5(path):
        raise ScdmError("the uploaded file is not an AnnData .h5ad (not an HDF5 file)",
                        "save the cells with adata.write_h5ad('cells.h5ad') and upload that file")
    try:
        data = read_upload(path, model)
    except ScdmError as e:
        raise ScdmError(e.problem.replace(path.name, "the upload"), e.fix) from None
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ScdmError(f"the uploaded file is not a readable AnnData .h5ad ({type(e).__name__})",
                        "save the cells with adata.write_h5ad('cells.h5ad') and upload that file") from None
    try:
        check_gene_overlap(data, bundle, store)
        return data.n_cells, data.n_genes
    finally:
        data.close()


__all__ = ["MAX_UPLOAD_MB", "Settings", "create_app", "find_bundles"]
