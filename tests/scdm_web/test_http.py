"""scdm-web over HTTP: bad uploads, path traversal in every name and parameter, size limit, token, concurrency."""

from __future__ import annotations

import csv
import http.client
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import anndata as ad
import h5py
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from scdm_web.app import Settings, create_app
from tests._cli import assert_refused

from .conftest import N_UPLOAD, start_server, stop_server, wait_job

BUNDLE = "bundles/pca_logreg"


def _post(client: httpx.Client, base: str, content: bytes, *, name: str = "cells.h5ad", bundle: str = BUNDLE,
          **form: str) -> httpx.Response:
    return client.post(f"{base}/predict", files={"file": (name, content, "application/octet-stream")},
                       data={"bundle": bundle, **form}, follow_redirects=False)


def _job_id(r: httpx.Response) -> int:
    assert r.status_code == 303, r.text[:500]
    return int(re.fullmatch(r"/jobs/(\d+)", r.headers["location"]).group(1))


def _error_text(r: httpx.Response) -> str:
    m = re.search(r'id="error">(.*?)</div>', r.text, re.S)
    assert m, r.text[:800]
    return re.sub(r"<[^>]+>", " ", m.group(1))


def _stored(server) -> set[str]:
    return {p.name for p in (server.work / "uploads").iterdir()}


@pytest.fixture(scope="module")
def client() -> httpx.Client:
    with httpx.Client(timeout=120) as c:
        yield c


def _h5ad(tmp_path, a: ad.AnnData, name: str = "x.h5ad") -> bytes:
    p = tmp_path / name
    a.write_h5ad(p)
    return p.read_bytes()


@pytest.fixture(scope="module")
def sample(web_data) -> ad.AnnData:
    return ad.read_h5ad(web_data.upload)


@pytest.mark.parametrize("case", ["text", "hdf5-not-anndata", "empty", "no-genes", "normalised"])
def test_bad_uploads_are_refused_on_the_page(server, client, sample, tmp_path, case):
    before = _stored(server)
    if case == "text":
        content, word = b"this is not an h5ad file\n" * 10, "AnnData"
    elif case == "hdf5-not-anndata":
        with h5py.File(tmp_path / "plain.h5", "w") as f:
            f["data"] = np.arange(10)
        content, word = (tmp_path / "plain.h5").read_bytes(), "AnnData"
    elif case == "empty":
        content, word = b"", "empty"
    elif case == "no-genes":
        content, word = _h5ad(tmp_path, sample[:, :0].copy()), "empty"
    else:
        a = sample.copy()
        a.X = a.X.astype(np.float32) / 7.3
        content, word = _h5ad(tmp_path, a), "count"
    r = _post(client, server.url, content)
    assert r.status_code == 400, r.text[:500]
    text = _error_text(r)
    assert word in text and "fix:" in text, text
    assert _stored(server) == before  # nothing kept


@pytest.mark.parametrize("bundle", ["bundles/pca_logreg", "bundles/hvg_logreg"])
def test_no_gene_overlap_is_refused_at_upload(server, client, sample, tmp_path, bundle):
    """Renamed genes: refused on the page before any job (the extractor's overlap check), nothing kept."""
    a = sample.copy()
    a.var_names = [f"NOTAGENE{i}" for i in range(a.n_vars)]
    before = _stored(server)
    n_jobs = len(client.get(f"{server.url}/jobs").text.split("<tr")) - 1
    r = _post(client, server.url, _h5ad(tmp_path, a), bundle=bundle)
    assert r.status_code == 400, r.text[:500]
    text = _error_text(r)
    assert "barely share genes" in text and "fix:" in text, text
    assert _stored(server) == before
    assert len(client.get(f"{server.url}/jobs").text.split("<tr")) - 1 == n_jobs  # no job made


def test_partial_gene_overlap_is_accepted(server, client, sample, tmp_path):
    """Half the genes renamed: above the minimum overlap, so the job runs and predicts every cell."""
    a = sample.copy()
    a.var_names = [f"NOTAGENE{i}" if i % 2 else g for i, g in enumerate(a.var_names)]
    j = wait_job(client, server.url, _job_id(_post(client, server.url, _h5ad(tmp_path, a))))
    assert j["status"] == "done" and j["n_cells"] == N_UPLOAD, j


def test_job_progress_moves_per_chunk(web_data, tmp_path, client):
    """`scdm-web --chunk-size 4`: a 60-cell job's recorded progress passes through the chunks, in order."""
    srv = start_server(web_data, tmp_path / "work", "--chunk-size", "4")
    try:
        job_id = _job_id(_post(client, srv.url, web_data.upload.read_bytes()))
        seen: list[tuple[float, str]] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            j = client.get(f"{srv.url}/api/jobs/{job_id}").json()
            seen.append((j["progress"], j["stage"]))
            if j["status"] in ("done", "failed"):
                break
            time.sleep(0.005)
        assert j["status"] == "done", j
        values = [p for p, _ in seen]
        assert values == sorted(values), values  # never goes back
        chunks = {st for p, st in seen if re.search(r": [1-9]\d* of 60$", st)}
        assert len(chunks) >= 2, seen  # at least two distinct chunk counts observed between 0 and 1
        mid = {p for p in values if 0.05 < p < 0.9}
        assert mid, seen
    finally:
        stop_server(srv)


def test_path_traversal_in_names_and_parameters(server, client, web_data, tmp_path):
    content = web_data.upload.read_bytes()
    # a client file name is never a path: stored under a generated name in uploads/
    jid = _job_id(_post(client, server.url, content, name="../../../../evil.h5ad"))
    assert wait_job(client, server.url, jid)["status"] == "done"
    assert not (server.work / "scratch" / f"job-{jid}.zarr").exists()  # a finished job left no scratch store
    assert all(re.fullmatch(r"[0-9a-f]{32}\.h5ad", n) for n in _stored(server))
    assert not list(server.work.parent.rglob("evil.h5ad")) and not list(web_data.root.rglob("evil.h5ad"))
    # bundle and model names: only the listed ones
    for bundle in ("../../etc/passwd", "bundles/../../s.zarr", "/etc", str(web_data.results / "bundles" / "pca_logreg"),
                   "bundles/pca_logreg/../hvg_logreg/.."):
        r = _post(client, server.url, content, bundle=bundle)
        assert r.status_code == 400 and "bundle" in _error_text(r), bundle
    r = _post(client, server.url, content, model="../hvg")
    assert r.status_code == 400
    # URL parameters
    for path in ("/figures/umap/..%2F..%2Fetc%2Fpasswd", "/figures/umap/%2e%2e", "/jobs/..%2F1/predictions.csv",
                 f"/jobs/{jid}/..%2F..%2Fscdm-web.db", "/jobs/%2e%2e/predictions.csv", "/api/jobs/..%2F..",
                 f"/jobs/{jid}/predictions.csv/..%2F..%2F..%2Fscdm-web.db"):
        r = client.get(server.url + path)
        assert r.status_code in (404, 422), (path, r.status_code)
        assert "SQLite" not in r.text and "root:" not in r.text
    assert client.get(f"{server.url}/leaderboard", params={"scheme": "../../etc"}).status_code == 200
    assert client.get(f"{server.url}/leaderboard", params={"metric": "../../etc/passwd"}).status_code == 400
    # raw, un-normalised paths straight on the socket
    u = urlsplit(server.url)
    for raw in ("/../../../etc/passwd", f"/jobs/{jid}/../../scdm-web.db", "/jobs/../uploads/"):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("GET", raw)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status in (404, 422), (raw, resp.status)
        assert b"root:" not in body and b"SQLite format" not in body


def test_concurrent_uploads_none_lost(server, client, web_data):
    content = web_data.upload.read_bytes()
    before = _stored(server)
    n = 6
    with ThreadPoolExecutor(n) as pool:
        ids = list(pool.map(lambda i: _job_id(_post(client, server.url, content, name=f"sample{i}.h5ad",
                                                    bundle=BUNDLE if i % 2 else "bundles/hvg_logreg")), range(n)))
    assert len(set(ids)) == n
    assert len(_stored(server) - before) == n
    for jid in ids:
        j = wait_job(client, server.url, jid)
        assert j["status"] == "done", j
        rows = list(csv.DictReader(io.StringIO(client.get(f"{server.url}/jobs/{jid}/predictions.csv").text)))
        assert len(rows) == N_UPLOAD and {r["model"] for r in rows} == {j["model"]}
    listing = client.get(f"{server.url}/jobs").text
    for i in range(n):
        assert f"sample{i}.h5ad" in listing


def test_size_limit_and_token(web_data, tmp_path):
    """The app with a 0.05 MB limit, a token and its own --db URL (Python API of scdm-web, FastAPI's TestClient)."""
    app = create_app(Settings(store=web_data.store, results=web_data.results, work=tmp_path / "w", token="s3cret-token",
                              max_upload_mb=0.05, db=f"sqlite:///{tmp_path / 'jobs.sqlite'}"))
    assert (tmp_path / "jobs.sqlite").is_file() and not (tmp_path / "w" / "scdm-web.db").exists()  # --db URL used
    content = web_data.upload.read_bytes()
    assert len(content) > 0.05 * 2**20
    with TestClient(app) as c:
        r = c.post("/predict", files={"file": ("a.h5ad", content)}, data={"bundle": BUNDLE}, follow_redirects=False)
        assert r.status_code == 401  # no token
        r = c.post("/predict", files={"file": ("a.h5ad", content)}, data={"bundle": BUNDLE, "token": "wrong-token"},
                   follow_redirects=False)
        assert r.status_code == 401
        assert c.get("/jobs").status_code == 401
        r = c.post("/predict", files={"file": ("a.h5ad", content)}, data={"bundle": BUNDLE, "token": "s3cret-token"},
                   follow_redirects=False)
        assert r.status_code == 413 and "limit" in r.text
        assert not [p for p in (tmp_path / "w" / "uploads").iterdir()]
        assert c.get("/leaderboard").status_code == 200  # browsing needs no token


def test_cli_refuses_bad_options(web_data, tmp_path):
    from scdm_web.cli import app

    runner = CliRunner()
    cases = [(["--store", str(tmp_path / "none.zarr"), "--results", str(web_data.results)], "store"),
             (["--store", str(web_data.store), "--results", str(tmp_path)], "results.parquet"),
             (["--store", str(web_data.store), "--results", str(web_data.results), "--port", "70000"], "port"),
             (["--store", str(web_data.store), "--results", str(web_data.results), "--token", "abc"], "token"),
             (["--store", str(web_data.store), "--results", str(web_data.results), "--db", "nosuchdb://x"], "db"),
             (["--store", str(web_data.store), "--results", str(web_data.results), "--bundles", str(tmp_path / "n")],
              "bundles"),
             (["--store", str(web_data.store), "--results", str(web_data.results), "--chunk-size", "0"], "chunk-size")]
    for args, word in cases:
        assert_refused(runner.invoke(app, [*args, "--work", str(tmp_path / "w")]), word)
