"""An extraction killed with SIGKILL resumes without recomputing finished chunks and ends
with a store equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

from scdm_embed import EmbeddingStore, StoreError, extract
from scdm_embed.models import register_adapter
from scdm_embed.models._reference import PCAAdapter

CHUNK = 24

SLOW = textwrap.dedent(
    """
    import sys, time
    from scdm_embed import extract
    from scdm_embed.models import register_adapter
    from scdm_embed.models._reference import PCAAdapter

    class SlowPCA(PCAAdapter):
        name = "pca"
        def tokenize(self, chunk, plan):
            time.sleep(0.4)
            return super().tokenize(chunk, plan)

    register_adapter("pca", SlowPCA)
    extract(sys.argv[1], model="pca", store=sys.argv[2], dataset="pc9", chunk_size=int(sys.argv[3]), progress=False)
    """
)


class CountingPCA(PCAAdapter):
    name = "pca"
    tokenized: list[int] = []

    def tokenize(self, chunk, plan):
        CountingPCA.tokenized.append(chunk.start // CHUNK)
        return super().tokenize(chunk, plan)


def _done(store):
    try:
        return zarr.open_group(str(store), mode="r")["embeddings/pca/pc9/done"][:]
    except (OSError, LookupError, ValueError):  # not created yet, or being written (zarr's errors are these)
        return None


def test_sigkill_then_resume_equals_uninterrupted(pc9_small, tmp_path):
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-c", SLOW, str(pc9_small), str(killed), str(CHUNK)],
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.time() + 120
    while time.time() < deadline:
        d = _done(killed)
        if d is not None and d.sum() >= 3:
            break
        assert proc.poll() is None, "the slow extraction ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _done(killed).copy()
    n_chunks = len(done_before)
    assert 3 <= done_before.sum() < n_chunks, "killed mid-way"

    # a reader refuses the partial array
    st = EmbeddingStore(killed)
    with pytest.raises(StoreError, match="incomplete"):
        st.load("pca")

    register_adapter("pca", CountingPCA)
    try:
        CountingPCA.tokenized.clear()
        r = extract(pc9_small, model="pca", store=killed, dataset="pc9", chunk_size=CHUNK, progress=False)
        assert r.status == "resumed"
        assert sorted(CountingPCA.tokenized) == sorted(np.flatnonzero(~done_before).tolist()), "finished chunks were recomputed"
        assert r.chunks_computed == int((~done_before).sum())
    finally:
        from scdm_embed.models import _EXTRA

        _EXTRA.pop("pca", None)

    clean = tmp_path / "clean.zarr"
    extract(pc9_small, model="pca", store=clean, dataset="pc9", chunk_size=CHUNK, progress=False)
    Xk, ck = EmbeddingStore(killed).load("pca")
    Xc, cc = EmbeddingStore(clean).load("pca")
    assert np.array_equal(Xk, Xc)
    assert ck.equals(cc)
    ga, gb = zarr.open_group(str(killed), mode="r"), zarr.open_group(str(clean), mode="r")
    assert ga["references/pca/components"][:].tobytes() == gb["references/pca/components"][:].tobytes()

    # re-running a finished extraction does nothing
    r = extract(pc9_small, model="pca", store=killed, dataset="pc9", chunk_size=CHUNK, progress=False)
    assert r.status == "up-to-date" and r.chunks_computed == 0
