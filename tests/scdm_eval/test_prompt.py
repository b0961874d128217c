"""`scdm-eval prompt`: real PC9 cells, a real local chat model (llama.cpp, SmolLM2-135M), real SQLite cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from scdm_embed.cli import app as embed_app
from scdm_eval._llm_server import free_port
from scdm_eval._metrics import METRICS, compute_metrics
from scdm_eval._prompt import PROMPT_RESULT_COLUMNS, parse_answer, top_genes
from scdm_eval._run import PREDICTION_COLUMNS
from scdm_eval._splits import list_splits, load_splits
from scdm_eval.cli import app
from tests._cli import assert_refused
from tests.conftest import store_snapshot

from .llm_server import llama_server

runner = CliRunner()


@pytest.fixture(scope="module")
def llm():
    """SmolLM2-135M-Instruct served by llama.cpp on 127.0.0.1 (module scope: started once)."""
    yield from llama_server()


@pytest.fixture(scope="module")
def pc9_store(tmp_path_factory, pc9_small) -> Path:
    """240 real PC9 cells embedded with pca through `scdm-embed extract` (records the input path)."""
    store = tmp_path_factory.mktemp("llmstore") / "s.zarr"
    r = runner.invoke(embed_app, ["extract", str(pc9_small), "--model", "pca", "--store", str(store), "-q"])
    assert r.exit_code == 0, r.output
    return store


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCDM_CACHE_DIR", str(tmp_path / "user-cache"))  # the default cache lives here


def _prompt(*args, code: int = 0):
    r = runner.invoke(app, ["prompt", *[str(a) for a in args]])
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    return r


def _read(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    return (pd.read_parquet(out / "llm_results.parquet"), pd.read_parquet(out / "llm_predictions.parquet"),
            json.loads((out / "llm_usage.json").read_text()))


def _recompute(res: pd.DataFrame, pred: pd.DataFrame) -> None:
    """Every metric of every fold recomputes from the per-cell predictions (same cells, nothing dropped)."""
    for row in res.itertuples(index=False):
        p = pred[pred["partition"] == row.partition]
        assert len(p) == row.n_test
        assert int((p["answer"] == "unparsed").sum()) == row.n_unparsed
        m = compute_metrics(p["y_true"].to_numpy(), p["p_sensitive"].to_numpy())
        for k in METRICS:
            assert np.isclose(m[k], getattr(row, k), atol=1e-12, equal_nan=True), (k, m[k], getattr(row, k))


# -- pure parts ----------------------------------------------------------------------------
def test_top_genes_ranks_counts_with_deterministic_ties():
    X = sp.csr_matrix(np.array([[5, 0, 5, 1, 9, 5], [0, 2, 0, 0, 0, 0]], dtype=np.float32))
    sym = ["GENEB", "X", "GENEA", "LOW", "TOP", ""]  # the last gene has no symbol: never used
    assert top_genes(X, sym, 3) == [("TOP", "GENEA", "GENEB"), ("X",)]
    assert top_genes(X[:, ::-1], sym[::-1], 3) == [("TOP", "GENEA", "GENEB"), ("X",)]  # column order is irrelevant


@pytest.mark.parametrize(("text", "ids", "cot", "want"), [
    ('{"response": "sensitive"}', None, False, {"": "sensitive"}),
    ("```json\n{\"response\": \"Resistant\"}\n```", None, False, {"": "resistant"}),
    ("The cell is resistant.", None, False, {"": "resistant"}),
    ("It could be sensitive or resistant.", None, False, {"": None}),
    ("This cell is not sensitive.", None, False, {"": None}),
    ("insensitive", None, False, {"": None}),
    ('{"response": "maybe"}', None, False, {"": None}),
    ("Sensitive genes are high, but resistant markers too. Answer: resistant", None, True, {"": "resistant"}),
    ("Sensitive genes are high", None, True, {"": None}),
    ('{"answers": [{"id": "c1", "response": "sensitive"}, {"id": "c2", "response": "resistant"}]}', ["c1", "c2"],
     False, {"c1": "sensitive", "c2": "resistant"}),
    ('{"answers": [{"id": "c1", "response": "sensitive"}, {"id": "c1", "response": "resistant"}]}', ["c1", "c2"],
     False, {"c1": None, "c2": None}),
    ("c1: sensitive\nc2: resistant\nc3: unsure", ["c1", "c2", "c3"], False,
     {"c1": "sensitive", "c2": "resistant", "c3": None}),
    ("", None, False, {"": None}),
])
def test_parser_is_strict(text, ids, cot, want):
    assert parse_answer(text, ids, cot=cot) == want


# -- against the real local model -------------------------------------------------------------
def test_store_cells_on_the_saved_splits_then_all_from_the_cache(llm, pc9_store, tmp_path):
    r = runner.invoke(app, ["splits", "make", "--store", str(pc9_store), "--folds", "3"])
    assert r.exit_code == 0, r.output
    saved = list_splits(pc9_store)["name"].tolist()
    out = tmp_path / "out"
    args = ["--store", pc9_store, "--llm", llm.alias, "--base-url", llm.base_url, "--folds", 3, "--max-cells", 6,
            "--out", out, "-q"]
    r = _prompt(*args)
    assert "prompt-top10" in r.output and "6 sent" in r.output
    res, pred, info = _read(out)
    assert list(res.columns) == list(PROMPT_RESULT_COLUMNS) and list(pred.columns) == [*PREDICTION_COLUMNS, "answer"]
    assert set(res["model"]) == {"llm:smollm2"} and set(res["classifier"]) == {"prompt-top10"}
    assert res["n_test"].sum() == 6 and info["usage"]["sent"] == 6 and info["usage"]["completion_tokens"] > 0
    assert info["structured"] == "json_object"  # llama.cpp refuses json_schema; json_object + schema works
    assert (pred["answer"] != "unparsed").sum() >= 1  # the model's answers were parsed
    # the same partitions as `scdm-eval run`: the split saved in the store, each cell in its own test fold
    assert list_splits(pc9_store)["name"].tolist() == saved == [res["split"].iloc[0]]
    table = load_splits(pc9_store, saved[0]).table
    keys = pred["dataset"].astype(str) + "/" + pred["cell_id"].astype(str)
    assert (table.loc[keys, "fold"].to_numpy() == pred["fold"].to_numpy()).all()
    _recompute(res, pred)

    r = _prompt(*args)  # a re-run costs nothing: every answer from the cache
    res2, _, info2 = _read(out)
    assert info2["usage"]["sent"] == 0 and info2["usage"]["cached"] == 6 and "0 sent" in r.output
    pd.testing.assert_frame_equal(res, res2)


def test_unparsed_answers_are_counted_and_scored_never_dropped(llm, pc9_small, tmp_path):
    out = tmp_path / "out"
    # 3 tokens cannot hold {"response": "..."}: every structured answer is cut short and unparsable
    args = ["--input", pc9_small, "--llm", llm.alias, "--base-url", llm.base_url, "--folds", 2, "--max-cells", 4,
            "--structured", "json_object", "--max-tokens", 3, "--out", out, "-q"]
    _prompt(*args)
    res, pred, info = _read(out)
    assert res["n_test"].sum() == 4 and (res["n_unparsed"] == res["n_test"]).all()
    assert info["usage"]["unparsed"] == 4 and info["unparsed"] == "wrong"
    assert np.allclose(res["accuracy"], 0.0, atol=1e-12)  # wrong: an unanswered cell can only lower a score
    _recompute(res, pred)
    assert "scored as wrong" in (out / "llm_summary.md").read_text()
    _prompt(*args, "--unparsed", "neutral")  # same requests: from the cache; P(sensitive) = 0.5
    res, pred, info = _read(out)
    assert info["usage"]["sent"] == 0 and np.allclose(pred["p_sensitive"], 0.5, atol=1e-12)
    _recompute(res, pred)


def test_cot_and_several_cells_per_request(llm, pc9_small, tmp_path):
    out = tmp_path / "cot"
    _prompt("--input", pc9_small, "--llm", llm.alias, "--base-url", llm.base_url, "--folds", 2, "--max-cells", 2,
            "--cot", "--max-tokens", 40, "--out", out, "-q")
    res, pred, info = _read(out)
    assert set(res["classifier"]) == {"prompt-top10-cot"} and res["n_test"].sum() == 2 and info["usage"]["sent"] == 2
    _recompute(res, pred)
    with sqlite3.connect(tmp_path / "user-cache" / "llm" / "responses.sqlite3") as c:  # the default cache
        asked = [json.loads(r[0]) for r in c.execute("SELECT request FROM responses")]
    assert len(asked) == 2 and all("reason" in q["messages"][-1]["content"] for q in asked)
    out = tmp_path / "multi"
    _prompt("--input", pc9_small, "--llm", llm.alias, "--base-url", llm.base_url, "--folds", 2, "--max-cells", 4,
            "--cells-per-request", 2, "--out", out, "-q")
    res, pred, info = _read(out)
    assert info["usage"]["requests"] == 2 and info["usage"]["cells"] == 4 and res["n_test"].sum() == 4
    _recompute(res, pred)


def _per_class(pred: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """(sensitive, resistant) test cells per partition of a predictions table."""
    return {str(k): (int((g["y_true"] == 1).sum()), int((g["y_true"] == 0).sum()))
            for k, g in pred.groupby("partition", observed=True)}


def test_a_moved_input_is_given_as_dataset_path_and_still_hash_checked(llm, pc9_small, tmp_path):
    import anndata as ad

    first = tmp_path / "first" / "pc9_small.h5ad"
    first.parent.mkdir()
    shutil.copy(pc9_small, first)
    store = tmp_path / "s.zarr"
    r = runner.invoke(embed_app, ["extract", str(first), "--model", "pca", "--store", str(store), "-q"])
    assert r.exit_code == 0, r.output
    moved = tmp_path / "elsewhere" / "cells.h5ad"
    moved.parent.mkdir()
    shutil.move(first, moved)  # the recorded input is gone
    wrong = tmp_path / "wrong.h5ad"  # the same cells and genes, other counts: not the extracted file
    a = ad.read_h5ad(moved)
    a.X = a.X * 2
    a.write_h5ad(wrong)
    before = store_snapshot(store)
    base = ["prompt", "--store", str(store), "--llm", llm.alias, "--base-url", llm.base_url, "--folds", "2",
            "--max-cells", "4", "-q"]
    assert_refused(runner.invoke(app, [*base, "--out", str(tmp_path / "o1")]), "no longer")
    assert_refused(runner.invoke(app, [*base, "--input", f"pc9_small={wrong}", "--out", str(tmp_path / "o2")]),
                   "hash")
    assert store_snapshot(store) == before and not (tmp_path / "o2").exists()

    out = tmp_path / "out"
    _prompt(*base[1:], "--input", f"pc9_small={moved}", "--out", out)
    res, pred, info = _read(out)
    assert res["n_test"].sum() == 4 and info["usage"]["sent"] == 4 and (pred["answer"] != "unparsed").sum() >= 1
    assert _per_class(pred) == {"fold0": (1, 1), "fold1": (1, 1)}  # --max-cells: stratified by fold and class
    _recompute(res, pred)
    assert list_splits(store)["name"].tolist() == [res["split"].iloc[0]]  # the split the answers were scored on


class _Flaky(BaseHTTPRequestHandler):
    """A real HTTP front of the llama.cpp server that answers 429, then 503, before it forwards."""

    upstream = ""
    refusals = [(429, "1"), (503, None)]

    def _forward(self, body: bytes | None) -> None:
        req = urllib.request.Request(self.upstream + self.path[len("/v1"):], data=body, method=self.command,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            data, code = r.read(), r.status
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._forward(None)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.refusals:
            code, after = self.refusals.pop(0)
            self.send_response(code)
            if after:
                self.send_header("Retry-After", after)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        self._forward(body)

    def log_message(self, *args) -> None:
        pass


def test_429_and_5xx_are_retried_with_back_off(llm, pc9_small, tmp_path):
    _Flaky.upstream, _Flaky.refusals = llm.base_url, [(429, "1"), (503, None)]
    front = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "out"
        t = time.monotonic()
        _prompt("--input", pc9_small, "--llm", llm.alias, "--base-url", f"http://127.0.0.1:{front.server_port}/v1",
                "--structured", "json_object", "--folds", 2, "--max-cells", 2, "--concurrency", 1, "--backoff", 0.5,
                "--out", out, "-q")
        _, _, info = _read(out)
        assert info["usage"]["retries"] == 2 and info["usage"]["sent"] == 2
        assert time.monotonic() - t >= 1.5  # waited Retry-After (1 s), then the back-off (0.5 s)
    finally:
        front.shutdown()
        front.server_close()


def test_a_server_that_goes_away_mid_run_resumes_from_the_cache(llm, pc9_small, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "scdm-eval"), "prompt", "--input", str(pc9_small), "--llm", llm.alias,
           "--folds", "2", "--max-cells", "6", "--concurrency", "1", "--retries", "1", "--backoff", "0.1",
           "--cache", str(cache), "--out", str(out), "-q", "--base-url"]
    proc = subprocess.Popen([*cmd, llm.base_url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    db = cache / "responses.sqlite3"

    def answered() -> int:
        if not db.exists():
            return 0
        with sqlite3.connect(db) as c:  # the table appears a moment after the file
            if not c.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'responses'").fetchone()[0]:
                return 0
            return int(c.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    deadline = time.monotonic() + 90
    while answered() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    llm.stop()  # the server goes away mid-run
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2, text
    assert "stopped answering" in text and "Traceback" not in text
    cached = answered()
    assert 2 <= cached < 6
    assert not (out / "llm_results.parquet").exists()
    llm.start()  # back, on another port: the cache is keyed by model, prompt and parameters, not by URL
    _prompt(*cmd[2:], llm.base_url)  # the same command again (in this process)
    _, _, info = _read(out)
    assert info["usage"]["sent"] == 6 - cached and info["usage"]["cached"] == cached and answered() == 6


# -- no server needed ---------------------------------------------------------------------
def test_dry_run_prints_requests_and_tokens_and_sends_nothing(pc9_small, tmp_path):
    r = _prompt("--input", pc9_small, "--llm", "gpt-4o-mini", "--base-url", f"http://127.0.0.1:{free_port()}/v1",
                "--genes", 100, "--folds", 2, "--max-cells", 5, "--out", tmp_path / "o", "--dry-run")
    text = " ".join(r.output.split())
    assert "5 requests" in text and "estimated tokens" in text and "100 most highly expressed genes" in text
    assert "erlotinib" in text  # the drug from the cell table is in the prompt
    assert not (tmp_path / "o").exists() and not (tmp_path / "user-cache").exists()


def _dry_counts(*args) -> tuple[str, dict[str, tuple[int, int]]]:
    """A dry run's output and its test cells per partition (sensitive, resistant)."""
    text = " ".join(_prompt(*args, "--dry-run").output.split())
    line = text.split("(sensitive/resistant):", 1)[1].split(" --- ", 1)[0]
    return text, {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"(\S+) (\d+)/(\d+)", line)}


def test_max_cells_is_stratified_by_partition_and_class(pc9_small, tmp_path):
    args = ["--input", pc9_small, "--llm", "gpt-4o-mini", "--base-url", f"http://127.0.0.1:{free_port()}/v1",
            "--folds", 5, "--out", tmp_path / "o"]
    text, per = _dry_counts(*args, "--max-cells", 10)
    assert "10 test cells" in text and per == {f"fold{f}": (1, 1) for f in range(5)}  # each fold keeps both classes
    assert _dry_counts(*args, "--max-cells", 10)[0] == text  # deterministic for a seed
    assert _dry_counts(*args, "--max-cells", 10, "--seed", 1)[0] != text
    _, per = _dry_counts(*args, "--max-cells", 23)  # the rest in proportion (120 + 120 cells: balanced)
    assert sum(map(sum, per.values())) == 23 and len(per) == 5
    assert all(min(c) >= 2 and max(c) <= 3 for c in per.values()), per
    text, per = _dry_counts(*args, "--max-cells", 3)  # fewer cells than folds: said, the rest unscored
    assert len(per) == 3 and all(sum(c) == 1 for c in per.values()) and "scored" in text
    assert not (tmp_path / "o").exists() and not (tmp_path / "user-cache").exists()


def test_bad_inputs_are_refused_cleanly(pc9_store, pc9_small, tmp_path, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    before = store_snapshot(pc9_store)
    base = ["prompt", "--llm", "smollm2", "--out", str(tmp_path / "o"), "--max-cells", "2", "--folds", "2"]

    def refused(*args, words=()):
        return assert_refused(runner.invoke(app, [*base, *[str(a) for a in args]]), *words)

    refused("--store", pc9_store, "--base-url", dead, words=("cannot reach",))
    assert store_snapshot(pc9_store) == before  # no split saved by a run that failed
    refused("--store", pc9_store, "--base-url", dead, "--genes", 0, words=("genes",))
    refused("--store", pc9_store, "--base-url", dead, "--cells-per-request", 0, words=("cells_per_request",))
    refused("--store", pc9_store, "--base-url", "localhost:8000", words=("base-url",))
    monkeypatch.delenv("SCDM_TEST_NO_SUCH_KEY", raising=False)
    refused("--store", pc9_store, "--base-url", dead, "--api-key-env", "SCDM_TEST_NO_SUCH_KEY",
            words=("SCDM_TEST_NO_SUCH_KEY",))
    refused("--store", tmp_path / "nowhere.zarr", "--base-url", dead)
    refused("--input", tmp_path / "missing.h5ad", "--base-url", dead, words=("missing.h5ad",))
    refused("--store", pc9_store, "--input", f"pc9_small={tmp_path / 'moved.h5ad'}", "--base-url", dead,
            words=("moved.h5ad",))
    refused("--input", pc9_small, "--base-url", dead, "--cache", pc9_small, words=("cache",))
    assert store_snapshot(pc9_store) == before
