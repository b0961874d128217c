"""`scdm-embed download` against a REAL HTTP server on 127.0.0.1 serving the fixture checkpoints
(a mirror with Range support; a Hugging Face-style endpoint for HF_ENDPOINT): resume after a
dropped connection, a truncated file and a wrong checksum refused and never used."""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from scdm_embed.cli import app
from scdm_embed.models import get_adapter
from tests._cli import assert_refused

runner = CliRunner()
FILES = ("best_model.pt", "vocab.json", "args.json")


class Mirror(ThreadingHTTPServer):
    """Serves ``root/<model>/<path>`` (+ ``SHA256SUMS``) with byte ranges; faults on demand."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.root = root
        self.drop: dict[str, int] = {}      # path -> bytes sent before the connection is cut
        self.truncate: dict[str, int] = {}  # path -> served as a complete, shorter file
        self.corrupt: set[str] = set()      # path -> one byte flipped
        self.ranges: list[tuple[str, str]] = []
        self.hf_commit = "0" * 40

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Mirror

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _file(self) -> tuple[str, bytes] | None:
        path = self.path.split("?")[0].lstrip("/")
        if "/resolve/" in path:  # Hugging Face: <org>/<repo>/resolve/<rev>/<file>, served from the folder of <repo>
            repo, _, rest = path.partition("/resolve/")
            path = f"{repo.split('/')[-1]}/{rest.split('/', 1)[1]}"
        p = self.server.root / path
        if path.endswith("SHA256SUMS"):
            folder = p.parent
            if not folder.is_dir():
                return None
            lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(folder)}"
                     for f in sorted(folder.rglob("*")) if f.is_file()]
            return path, ("\n".join(lines) + "\n").encode()
        if not p.is_file():
            return None
        data = p.read_bytes()
        if path in self.server.truncate:
            data = data[: self.server.truncate[path]]
        if path in self.server.corrupt:
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        return path, data

    def _headers(self, path: str, data: bytes, start: int, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", self.server.hf_commit)
        self.end_headers()

    def _serve(self, body: bool) -> None:
        got = self._file()
        if got is None:
            self.send_error(404)
            return
        path, data = got
        start, code = 0, 200
        rng = self.headers.get("Range")
        if rng:
            self.server.ranges.append((path, rng))
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            code = 206
        self._headers(path, data, start, code)
        if not body:
            return
        end = len(data)
        if path in self.server.drop:
            end = min(end, start + self.server.drop[path])
        self.wfile.write(data[start:end])
        if end < len(data):
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(False)


@pytest.fixture
def mirror(tmp_path, fixtures_dir) -> Iterator[Mirror]:
    root = tmp_path / "mirror"
    shutil.copytree(fixtures_dir / "scgpt" / "checkpoint", root / "scgpt")
    srv = Mirror(root)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _same(dst: Path, fixtures_dir: Path) -> bool:
    return all((dst / f).read_bytes() == (fixtures_dir / "scgpt" / "checkpoint" / f).read_bytes() for f in FILES)


def _download(dst: Path, *extra: str):
    return runner.invoke(app, ["download", "scgpt", "--to", str(dst), *extra])


def test_download_from_mirror_lays_out_a_loadable_checkpoint(mirror, tmp_path, fixtures_dir, monkeypatch):
    dst = tmp_path / "ckpt"
    monkeypatch.setenv("SCDM_CHECKPOINT_MIRROR", mirror.url)  # the same as --mirror
    r = _download(dst)
    assert r.exit_code == 0, r.output
    assert f"--checkpoint {dst}" in r.output.replace("\n", "")
    assert _same(dst, fixtures_dir) and not list(dst.rglob("*.part"))
    a = get_adapter("scgpt")(dst)
    a.load(device=torch.device("cpu"), dtype=torch.float32)
    r = _download(dst)  # again: verified in place, nothing fetched
    assert r.exit_code == 0 and "already there" in r.output


def test_dropped_connection_is_refused_then_resumed(mirror, tmp_path, fixtures_dir):
    dst = tmp_path / "ckpt"
    mirror.drop["scgpt/best_model.pt"] = 3_000_000
    r = _download(dst, "--mirror", mirror.url)
    assert_refused(r, "re-run")
    assert "--checkpoint" not in r.output
    assert not (dst / "best_model.pt").exists()
    part = dst / "best_model.pt.part"
    assert part.stat().st_size == 3_000_000
    mirror.drop.clear()
    r = _download(dst, "--mirror", mirror.url)
    assert r.exit_code == 0, r.output
    assert ("scgpt/best_model.pt", "bytes=3000000-") in mirror.ranges  # resumed, not restarted
    assert _same(dst, fixtures_dir) and not part.exists()


@pytest.mark.parametrize("fault", ["truncate", "corrupt"])
def test_truncated_or_corrupt_file_is_refused_deleted_and_fetched_again(mirror, tmp_path, fixtures_dir, fault):
    dst = tmp_path / "ckpt"
    if fault == "truncate":
        mirror.truncate["scgpt/best_model.pt"] = 1000  # a complete response of the wrong file
    else:
        mirror.corrupt.add("scgpt/best_model.pt")
    r = _download(dst, "--mirror", mirror.url)
    assert_refused(r, "sha256")
    assert "--checkpoint" not in r.output and not (dst / "best_model.pt").exists()
    assert not (dst / "best_model.pt.part").exists()
    mirror.truncate.clear()
    mirror.corrupt.clear()
    r = _download(dst, "--mirror", mirror.url)
    assert r.exit_code == 0, r.output
    assert _same(dst, fixtures_dir)


def test_a_damaged_file_already_in_place_is_not_used(mirror, tmp_path, fixtures_dir):
    dst = tmp_path / "ckpt"
    assert _download(dst, "--mirror", mirror.url).exit_code == 0
    with (dst / "vocab.json").open("r+b") as fh:
        fh.write(b"X")
    r = _download(dst, "--mirror", mirror.url)
    assert_refused(r, "sha256")
    assert not (dst / "vocab.json").exists()
    assert _download(dst, "--mirror", mirror.url).exit_code == 0 and _same(dst, fixtures_dir)


def test_hugging_face_files_through_hf_endpoint(mirror, tmp_path, fixtures_dir, monkeypatch):
    """tGPT is on the Hub: hf_hub_download against HF_ENDPOINT = the local server."""
    shutil.copytree(fixtures_dir / "tgpt" / "checkpoint", mirror.root / "transcriptome-gpt-1024-8-16-64")
    weights = mirror.root / "transcriptome-gpt-1024-8-16-64" / "model.safetensors"
    weights.rename(weights.with_name("pytorch_model.bin"))  # the name the Hub repository uses
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SCDM_CHECKPOINT_MIRROR", raising=False)
    dst = tmp_path / "tgpt"
    r = runner.invoke(app, ["download", "tgpt", "--to", str(dst)])
    assert r.exit_code == 0, r.output
    assert (dst / "pytorch_model.bin").read_bytes() == weights.with_name("pytorch_model.bin").read_bytes()
    assert (dst / "tokenizer.json").is_file() and not (dst / "generation_config.json").exists()  # optional


@pytest.mark.parametrize(("args", "word"), [
    (["nope", "--to", "d"], "nope"),
    (["pca", "--to", "d"], "no checkpoint"),
    (["scgpt", "--to", "d"], "drive.google.com"),
    (["scgpt", "--to", "d", "--mirror", "ftp://x"], "http"),
    (["scgpt", "--to", "d", "--mirror", "http://127.0.0.1:9"], "mirror"),
])
def test_bad_download_refused(tmp_path, monkeypatch, args, word):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCDM_CHECKPOINT_MIRROR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert_refused(runner.invoke(app, ["download", *args]), word)
    assert not (tmp_path / "d").exists()


def test_users_offline_setting_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SCDM_CHECKPOINT_MIRROR", raising=False)
    assert_refused(runner.invoke(app, ["download", "tgpt", "--to", str(tmp_path / "d")]), "HF_HUB_OFFLINE")
    assert not (tmp_path / "d").exists()


def test_mirror_without_the_file_is_refused(mirror, tmp_path):
    (mirror.root / "scgpt" / "args.json").unlink()
    r = _download(tmp_path / "ckpt", "--mirror", mirror.url)
    assert_refused(r, "args.json")
