"""The dataset registry: cache seeded from shared/, download over HTTP, hash checks."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading

import pytest

from scdm_embed import InputError, datasets


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCDM_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SCDM_DATA_URL", raising=False)
    return tmp_path / "cache"


def test_seeded_from_shared(cache, shared_dir):
    p = datasets.fetch("gse149214_pc9", mirrors=[shared_dir / "data"])
    assert p.is_relative_to(cache) and p.exists()
    assert hashlib.sha256(p.read_bytes()).hexdigest() == datasets.REGISTRY["gse149214_pc9"].sha256


@pytest.fixture
def http_mirror(tmp_path, pc9_path):
    root = tmp_path / "www"
    dest = root / datasets.REGISTRY["gse149214_pc9"].path
    dest.parent.mkdir(parents=True)
    shutil.copyfile(pc9_path, dest)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", dest
    srv.shutdown()


def test_download_from_local_http_server(cache, http_mirror):
    url, _ = http_mirror
    p = datasets.fetch("gse149214_pc9", base_url=url, mirrors=[])
    assert p.exists() and p.is_relative_to(cache)
    assert hashlib.sha256(p.read_bytes()).hexdigest() == datasets.REGISTRY["gse149214_pc9"].sha256


def test_download_with_wrong_hash_is_refused(cache, http_mirror):
    url, dest = http_mirror
    dest.write_bytes(b"not the dataset")
    with pytest.raises(InputError, match="could not fetch"):
        datasets.fetch("gse149214_pc9", base_url=url, mirrors=[])
    assert not (cache / datasets.REGISTRY["gse149214_pc9"].path).exists()


def test_unknown_and_unconfigured(cache):
    with pytest.raises(InputError, match="unknown dataset"):
        datasets.fetch("nope")
    with pytest.raises(InputError, match="no download location"):
        datasets.fetch("gse149214_pc9", mirrors=[])
