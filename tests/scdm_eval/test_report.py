"""`scdm-eval report`: one self-contained HTML file + PNG/SVG figures, tables, UMAPs cached in the store."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from scdm_embed.store import EmbeddingStore
from scdm_eval.cli import app
from tests._cli import assert_refused

from .conftest import run_quiet

runner = CliRunner()


@pytest.fixture(scope="module")
def results_dir(_cohort_store, tmp_path_factory) -> tuple[Path, Path]:
    """A store copy + the results folder of a 2-model x 2-classifier run by tissue, plus LoRA rows."""
    import shutil

    root = tmp_path_factory.mktemp("report")
    store = root / "s.zarr"
    shutil.copytree(_cohort_store, store)
    out = root / "results"
    res = run_quiet(store, by="tissue", classifiers=("logreg", "majority"), folds=3, group_key="sample", out=out)
    # LoRA rows as `scdm-eval lora` writes them: same split, classifier lora-r8
    lora = res[res["classifier"] == "logreg"].copy()
    lora.attrs = {}
    lora["classifier"] = "lora-r8"
    lora.to_parquet(out / "lora_results.parquet", index=False)
    return store, out


def test_report_writes_self_contained_html_and_figures(results_dir, tmp_path):
    store, results = results_dir
    out = tmp_path / "report"
    r = runner.invoke(app, ["report", "--results", str(results), "--store", str(store), "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    html = (out / "report.html").read_text(encoding="utf-8")
    # offline: no external src/href (inline SVG, inline CSS, no CDN)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<link" not in html and "<script src" not in html
    assert html.count("<svg") >= 4  # bars, radar, 2 UMAPs
    for stem in ("fig-bars-pooled", "fig-radar-pooled", "fig-umap-pca", "fig-umap-sig"):
        for ext in (".png", ".svg"):
            f = out / f"{stem}{ext}"
            assert f.is_file() and f.stat().st_size > 1000, f
    for section in ('id="results"', 'id="compute"', 'id="recommend"', 'id="provenance"'):
        assert section in html
    assert "lora-r8" in html and "logreg" in html  # frozen and LoRA side by side
    assert "tissue" in html and "breast" in html and "lung" in html
    rec = pd.read_csv(out / "recommendations.csv")
    assert set(rec["category"]) == {"breast", "lung"}
    assert ((rec["p_ttest"] >= 0) & (rec["p_ttest"] <= 1)).all()
    assert (rec["margin"] >= 0).all()
    # the compute table reads the store's telemetry rows: one per model x dataset
    assert html.count("cohortA") >= 2 and "cells/s" in html
    # the UMAPs were cached in the store; a second report reuses them (same coordinates)
    st = EmbeddingStore(store)
    held = st.get_reference("umap-pca")
    assert held is not None and held[0]["coords"].shape == (len(st.cells()), 2)
    r2 = runner.invoke(app, ["report", "--results", str(results), "--store", str(store), "--out", str(tmp_path / "r2"),
                             "-q"])
    assert r2.exit_code == 0, r2.output
    again = EmbeddingStore(store).get_reference("umap-pca")
    assert again[1]["created"] == held[1]["created"]


def test_report_without_store_and_python_api(results_dir, tmp_path):
    import scdm_eval

    _, results = results_dir
    paths = scdm_eval.write_html_report(results, out=tmp_path / "r")
    html = paths["html"].read_text(encoding="utf-8")
    assert "no store given" in html and html.count("<svg") >= 2
    assert paths["bars-pooled_png"].is_file() and "umap-pca_png" not in paths


def test_report_subsamples_large_umaps(results_dir, tmp_path):
    store, results = results_dir
    out = tmp_path / "r"
    r = runner.invoke(app, ["report", "--results", str(results), "--store", str(store), "--out", str(out),
                            "--max-cells", "100", "-q"])
    assert r.exit_code == 0, r.output
    n = len(EmbeddingStore(store).cells())
    assert f"subsample of 100 of {n:,} cells" in (out / "report.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("case", ["missing", "empty", "metric", "store", "out-file"])
def test_report_refuses_bad_input(results_dir, tmp_path, case):
    store, results = results_dir
    args = {"results": str(results), "store": str(store), "out": str(tmp_path / "o")}
    extra: list[str] = []
    if case == "missing":
        args["results"], word = str(tmp_path / "nope"), "folder"
    elif case == "empty":
        (tmp_path / "e").mkdir()
        args["results"], word = str(tmp_path / "e"), "results.parquet"
    elif case == "metric":
        extra, word = ["--metric", "aucc"], "metric"
    elif case == "store":
        args["store"], word = str(tmp_path / "nostore.zarr"), "store"
    else:
        (tmp_path / "f").write_text("x")
        args["out"], word = str(tmp_path / "f"), "file"
    r = runner.invoke(app, ["report", *[x for k, v in args.items() for x in (f"--{k}", v)], *extra, "-q"])
    assert_refused(r, word)
    if case != "out-file":
        assert not (tmp_path / "o").exists()


def test_report_compute_table_shows_the_network_parameters(results_dir, tmp_path):
    """`scdm-embed extract` of the tGPT fixture records the network's parameter count in the store
    telemetry (None for hvg); the report's compute table shows it (n/a for pca, hvg)."""
    import shutil

    import torch

    from scdm_embed.cli import app as embed
    from scdm_embed.models import get_adapter
    from scdm_eval._html import compute_table
    from tests.conftest import FIXTURES

    src, results = results_dir
    store = tmp_path / "s.zarr"
    shutil.copytree(src, store)
    ckpt = FIXTURES / "tgpt" / "checkpoint"
    r = runner.invoke(embed, ["extract", str(FIXTURES / "tgpt" / "cells.h5ad"), "--model", "tgpt", "--checkpoint",
                              str(ckpt), "--dataset", "fx", "--store", str(store), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(embed, ["extract", str(FIXTURES / "tgpt" / "cells.h5ad"), "--model", "hvg", "--dataset", "fx",
                              "--store", str(store), "-q"])
    assert r.exit_code == 0, r.output
    adapter = get_adapter("tgpt")(ckpt)
    adapter.load(device=torch.device("cpu"), dtype=torch.float32)
    want = sum(p.numel() for p in adapter.torch_module().parameters())
    assert want > 1000
    st = EmbeddingStore(store)
    assert st.embedding_group("tgpt", "fx").attrs["telemetry"]["n_params"] == want
    assert "n_params" not in st.embedding_group("hvg", "fx").attrs["telemetry"]  # no network
    ct = compute_table(store).set_index(["model", "dataset"])
    assert ct.loc[("tgpt", "fx"), "parameters"] == want
    assert ct.loc[("hvg", "fx"), "parameters"] is None and ct.loc[("pca", "cohortA"), "parameters"] is None
    out = tmp_path / "report"
    r = runner.invoke(app, ["report", "--results", str(results), "--store", str(store), "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    html = (out / "report.html").read_text(encoding="utf-8")
    compute = html[html.index('id="compute"'):html.index('id="recommend"')]
    assert f"{want:,}" in compute and "n/a" in compute
