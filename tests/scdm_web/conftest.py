"""Fixtures for scdm-web: a small real store (300 PC9 cells, pca + hvg, a run, two bundles) and a live server.

The store is built with the commands a user types (`scdm-embed extract`, `scdm-eval run`, `scdm-eval fit`);
the server is the `scdm-web` command in a subprocess on a free 127.0.0.1 port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import PC9

BIN = Path(sys.executable).parent
N_TRAIN, N_UPLOAD = 300, 60


@dataclass(frozen=True)
class WebData:
    store: Path
    results: Path
    upload: Path  # 60 real PC9 cells the store has not seen
    root: Path


def _ok(app, args: list[str]) -> None:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="session")
def web_data(tmp_path_factory) -> WebData:
    from scdm_embed.cli import app as embed
    from scdm_eval.cli import app as evaluate

    root = tmp_path_factory.mktemp("web")
    a = ad.read_h5ad(PC9)
    idx = np.random.default_rng(0).permutation(a.n_obs)
    a[np.sort(idx[:N_TRAIN])].copy().write_h5ad(root / "pc9_train.h5ad")
    up = a[np.sort(idx[N_TRAIN:N_TRAIN + N_UPLOAD])].copy()
    del up.obs["response"]  # a user's new sample: unlabelled
    up.write_h5ad(root / "new_sample.h5ad")
    store, results = root / "s.zarr", root / "results"
    for model in ("pca", "hvg"):
        _ok(embed, ["extract", root / "pc9_train.h5ad", "--dataset", "pc9", "--model", model, "--store", store, "-q"])
    _ok(evaluate, ["run", "--store", store, "--classifier", "logreg", "--classifier", "majority", "--folds", "3",
                   "--out", results, "-q"])
    for model in ("pca", "hvg"):
        _ok(evaluate, ["fit", "--store", store, "--model", model, "--out", results / "bundles" / f"{model}_logreg"])
    return WebData(store, results, root / "new_sample.h5ad", root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    url: str
    work: Path
    proc: subprocess.Popen


def start_server(data: WebData, work: Path, *extra: str) -> Server:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(work.parent / f"{work.name}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([str(BIN / "scdm-web"), "--store", str(data.store), "--results", str(data.results),
                             "--work", str(work), "--port", str(port), *extra], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"scdm-web exited {proc.returncode}: {(work.parent / f'{work.name}.log').read_text()}")
        try:
            if httpx.get(url + "/leaderboard", timeout=5).status_code == 200:
                return Server(url, work, proc)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("scdm-web did not answer within 120 s")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def server(web_data, tmp_path_factory) -> Iterator[Server]:
    """`scdm-web` (defaults but --work and --port) serving the store and results."""
    srv = start_server(web_data, tmp_path_factory.mktemp("srv") / "work")
    yield srv
    stop_server(srv)


def wait_job(client: httpx.Client, base: str, job_id: int, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = client.get(f"{base}/api/jobs/{job_id}").json()
        if j["status"] in ("done", "failed"):
            return j
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")
