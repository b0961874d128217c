"""The checkpoint-hash cache: same hash as uncached, re-hash on change, corrupt cache ignored."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from scdm_embed.models.base import hash_cache_file, hash_path

#: a made-up digest planted in the cache: returned only if the cache is really read
PLANTED = "sha256:" + "ab" * 32


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SCDM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "checkpoint-hashes.json"


def _age(*files: Path) -> None:
    """Date files a minute back, past the racy window (files just written are not cached)."""
    t = time.time_ns() - 60 * 10**9
    for f in files:
        os.utime(f, ns=(t, t))


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "weights.bin").write_bytes(os.urandom(3000))
    (d / "sub" / "config.json").write_text('{"n_layers": 2}')
    _age(d / "weights.bin", d / "sub" / "config.json")
    return d


def _plant(cache: Path, key: Path) -> None:
    doc = json.loads(cache.read_text())
    doc["entries"][str(key.resolve())]["sha256"] = PLANTED
    cache.write_text(json.dumps(doc))


def test_cached_hash_equals_uncached_and_is_recorded(cache: Path, ckpt: Path) -> None:
    assert hash_cache_file() == cache
    plain = hash_path(ckpt, cache=False)
    assert not cache.exists()
    assert hash_path(ckpt) == plain
    entry = json.loads(cache.read_text())["entries"][str(ckpt.resolve())]
    assert entry["sha256"] == plain
    assert [f[0] for f in entry["files"]] == ["sub/config.json", "weights.bin"]
    assert entry["files"][1][1] == 3000  # size
    assert hash_path(ckpt) == plain  # second call, from the cache


def test_the_cache_is_what_answers(cache: Path, ckpt: Path) -> None:
    hash_path(ckpt)
    _plant(cache, ckpt)
    assert hash_path(ckpt) == PLANTED  # no file bytes read: the recorded digest comes back
    assert hash_path(ckpt, cache=False) != PLANTED


def test_single_file_is_cached_too(cache: Path, ckpt: Path) -> None:
    f = ckpt / "weights.bin"
    plain = hash_path(f, cache=False)
    assert hash_path(f) == plain
    _plant(cache, f)
    assert hash_path(f) == PLANTED


def test_touched_file_is_rehashed(cache: Path, ckpt: Path) -> None:
    plain = hash_path(ckpt)
    _plant(cache, ckpt)
    t = time.time_ns() - 30 * 10**9  # same bytes, another mtime
    os.utime(ckpt / "weights.bin", ns=(t, t))
    assert hash_path(ckpt) == plain


def test_modified_file_gives_a_new_hash(cache: Path, ckpt: Path) -> None:
    before = hash_path(ckpt)
    w = ckpt / "weights.bin"
    data = bytearray(w.read_bytes())
    data[0] ^= 0xFF  # same size
    w.write_bytes(bytes(data))
    st = (ckpt / "sub" / "config.json").stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    after = hash_path(ckpt)
    assert after != before
    assert after == hash_path(ckpt, cache=False)


def test_added_or_removed_file_gives_a_new_hash(cache: Path, ckpt: Path) -> None:
    before = hash_path(ckpt)
    extra = ckpt / "extra.txt"
    extra.write_text("x")
    _age(extra)
    added = hash_path(ckpt)
    assert added != before and added == hash_path(ckpt, cache=False)
    extra.unlink()
    assert hash_path(ckpt) == before


def test_recently_written_files_are_not_cached(cache: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "w.bin").write_bytes(b"new")
    assert hash_path(fresh) == hash_path(fresh, cache=False)
    assert not cache.exists() or str(fresh.resolve()) not in json.loads(cache.read_text())["entries"]


@pytest.mark.parametrize("garbage", ["{not json", "[]", '{"format": 1, "entries": []}', '{"format": 99, "entries": {}}'])
def test_corrupt_cache_is_ignored_and_replaced(cache: Path, ckpt: Path, garbage: str) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_text(garbage)
    plain = hash_path(ckpt, cache=False)
    assert hash_path(ckpt) == plain
    assert json.loads(cache.read_text())["entries"][str(ckpt.resolve())]["sha256"] == plain


def test_unwritable_cache_location_still_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                ckpt: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SCDM_CACHE_DIR", str(blocker / "cache"))
    assert hash_path(ckpt) == hash_path(ckpt, cache=False)


def test_cache_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCDM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hash_cache_file() == tmp_path / "xdg" / "scdm" / "checkpoint-hashes.json"
