"""docs/tutorial.md runs as written: every ```bash and ```python block, in order, in a fresh folder
(``shared/`` linked in, a real HTTP mirror on 127.0.0.1 serving the scGPT fixture checkpoint)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest

from tests.conftest import ROOT, SHARED

TUTORIAL = ROOT / "docs" / "tutorial.md"
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    """The tutorial's code blocks as (language, code), in order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(TUTORIAL.read_text())]


def test_tutorial_blocks_are_found():
    langs = [lang for lang, _ in blocks()]
    assert langs.count("bash") >= 6 and "python" in langs
    every = "\n".join(code for _, code in blocks())
    for cmd in ("scdm-embed download", "scdm-embed extract", "scdm-eval run", "scdm-eval fit", "scdm-eval predict",
                "scdm-embed export", "scdm-embed import", "scdm-eval report"):
        assert cmd in every, cmd


@pytest.mark.slow
def test_tutorial_runs_as_written(tmp_path, fixtures_dir):
    import shutil
    import threading

    from tests.scdm_embed.test_download import Mirror

    root = tmp_path / "mirror"
    shutil.copytree(fixtures_dir / "scgpt" / "checkpoint", root / "scgpt")
    srv = Mirror(root)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    work = tmp_path / "work"
    work.mkdir()
    (work / "shared").symlink_to(SHARED)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SCDM_CHECKPOINT_MIRROR": srv.url, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    try:
        for i, (lang, code) in enumerate(blocks()):
            cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            print(f"block {i} ({lang}): {time.perf_counter() - t0:.1f}s")
            assert r.returncode == 0, f"block {i} ({lang}) failed:\n{code}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    finally:
        srv.shutdown()
        srv.server_close()
    assert (work / "models" / "scgpt" / "best_model.pt").is_file()
    assert (work / "report" / "report.html").is_file()
    a = ad.read_h5ad(work / "my_cells_scdm.h5ad")
    assert a.n_obs == 2121 and {"X_pca", "X_hvg"} <= set(a.obsm)
    assert a.obs["p_sensitive_pca_logreg"].notna().all()
    mine = ad.read_h5ad(work / "my_cells.h5ad")
    assert mine.n_vars > 20000 and "X_hvg" in mine.obsm  # the user's own file, arrays added by cell id
    res = pd.read_parquet(work / "results_external" / "results.parquet")
    assert set(res["model"]) == {"pca", "external:scanpy_pca"}
    assert len(pd.read_parquet(work / "preds.parquet")) == 2121
