"""The LLM prompting stage: ask a chat model, per cell, whether it is drug-sensitive or resistant.

scDrugMap's tenth model is a chat LLM (GPT-4o-mini) given each cell's most expressed genes.
Here any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, ...) is asked through the
official ``openai`` client, on the test cells of the SAME saved splits as ``scdm-eval run``
(the LLM trains on nothing), and scored with the same metrics into the same tables:

* prompt: the cell's top-``genes`` expressed genes by count (symbols; ties broken by symbol,
  then column; genes without a symbol are skipped), highest first, with the cells' tissue,
  cancer type and drug from the cell table when present (``context``); ``cot`` asks for
  reasoning before the answer; ``cells_per_request`` puts several cells (ids ``c1``, ``c2``,
  ...) of one context in a request and the answer must name each id;
* answer: structured output first (``response_format`` ``json_schema``; llama.cpp's
  ``json_object`` + schema; the kind that works is probed once and remembered in the cache),
  plain text otherwise; every reply goes through the strict parser :func:`parse_answer`;
* unparsed answers are never dropped: counted per fold (``n_unparsed``), kept in the
  denominators and scored as wrong (``unparsed="wrong"``: P(sensitive) = 1 - truth, so an
  unanswered cell can only lower a score) or as uninformative (``"neutral"``: 0.5);
* cost: an on-disk SQLite cache keyed by (model name, messages, parameters), so a re-run or a
  crash costs nothing twice (the endpoint URL is not part of the key); a concurrency limit;
  retries with exponential back-off on 429, 5xx, time-outs and lost connections;
  ``max_cells`` (a seeded subset stratified by partition and class); a dry run (:func:`plan_prompting`) that counts requests and tokens first;
  token usage per run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdm_embed.errors import ScdmError, StoreError
from scdm_embed.store import EmbeddingStore

from ._metrics import compute_metrics
from ._run import RESULT_COLUMNS, _check_out, _row, predictions_table
from ._splits import (
    LeakageWarning,
    Partition,
    Splits,
    SplitWarning,
    compute_splits,
    make_splits,
    save_splits,
)

#: The two answers.
LABELS: tuple[str, str] = ("sensitive", "resistant")
#: Cell-table columns put into the prompt as context (as the paper: tissue, cancer type, drug).
CONTEXT_KEYS: tuple[str, ...] = ("tissue", "cancer_type", "drug")
#: Columns of the LLM results: the run's, plus the unparsed answers of each fold.
PROMPT_RESULT_COLUMNS: tuple[str, ...] = (*RESULT_COLUMNS, "n_unparsed")
#: How structured output is asked for: ``auto`` probes json_schema, then json_object, then text.
STRUCTURED = ("auto", "json_schema", "json_object", "text")
UNPARSED = ("wrong", "neutral")
#: Bumped when the prompt wording changes (it is part of every cache key through the messages).
PROMPT_VERSION = 1
SYSTEM = "You are an expert in cancer biology, pharmacology and single-cell transcriptomics."
_NEG = re.compile(r"\b(?:not|non|never|isn't|is not|un)[\s-]*(?:sensitive|resistant)\b")
_WORD = re.compile(r"\b(sensitive|resistant)\b")


# -- prompts --------------------------------------------------------------------------------
def top_genes(X: sp.spmatrix | np.ndarray, symbols: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """Per row of ``X`` (counts), the ``n`` most expressed gene symbols, highest first.

    Ties are broken by symbol, then column; genes without a symbol (``""``) are skipped and a
    symbol seen twice keeps its highest entry. Ranks of raw counts equal those of any per-cell
    normalisation (CP10k, log1p), so raw counts are ranked.
    """
    X = sp.csr_matrix(X)
    sym = np.array([str(s) if s is not None and str(s) not in ("", "nan") else "" for s in symbols], dtype=str)
    keep = sym != ""
    out = []
    for i in range(X.shape[0]):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        cols, vals = X.indices[lo:hi], X.data[lo:hi]
        m = keep[cols] & (vals > 0)
        cols, vals = cols[m], vals[m]
        order = np.lexsort((cols, sym[cols], -vals))
        picked: dict[str, None] = {}
        for c in cols[order]:
            picked.setdefault(sym[c])
            if len(picked) == n:
                break
        out.append(tuple(picked))
    return out


def _context_text(context: Mapping[str, str]) -> str:
    """`` (cancer type: X; tissue: Y)`` from the context columns present ("" when none)."""
    parts = [f"{k.replace('_', ' ')}: {context[k]}" for k in ("cancer_type", "tissue") if context.get(k)]
    return f" ({'; '.join(parts)})" if parts else ""


def build_messages(genes: Sequence[Sequence[str]], context: Mapping[str, str], *, cot: bool = False,
                   ids: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Chat messages asking whether each cell (its top genes) is sensitive or resistant.

    One cell: the answer is ``{"response": ...}`` (with ``cot``: ``{"reasoning": ..., "response": ...}``);
    several (``ids``): ``{"answers": [{"id": ..., "response": ...}, ...]}``.
    """
    drug = context.get("drug") or "the drug"
    where = _context_text(context)
    n = max((len(g) for g in genes), default=0)
    think = ("First reason briefly about what these genes suggest, then answer. " if cot else "")
    if ids is None:
        user = (f"A single cancer cell{where} was profiled by single-cell RNA sequencing. Its {n} most highly "
                f"expressed genes, from highest to lowest: {', '.join(genes[0])}.\n"
                f"Is this cell sensitive or resistant to {drug}? {think}Reply in JSON: "
                + ('{"reasoning": "...", "response": "sensitive" or "resistant"}' if cot
                   else '{"response": "sensitive" or "resistant"}'))
    else:
        rows = "\n".join(f"{i}: {', '.join(g)}" for i, g in zip(ids, genes, strict=True))
        user = (f"{len(genes)} single cancer cells{where} were profiled by single-cell RNA sequencing. For each cell "
                f"(by id), its {n} most highly expressed genes, from highest to lowest:\n{rows}\n"
                f"For each cell, is it sensitive or resistant to {drug}? {think}Reply in JSON with one entry per id: "
                + ('{"reasoning": "...", "answers": [{"id": "c1", "response": "sensitive" or "resistant"}, ...]}'
                   if cot else '{"answers": [{"id": "c1", "response": "sensitive" or "resistant"}, ...]}'))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def answer_schema(ids: Sequence[str] | None, *, cot: bool) -> dict[str, Any]:
    """The JSON schema of the answer (for ``response_format``)."""
    label = {"type": "string", "enum": list(LABELS)}
    if ids is None:
        props: dict[str, Any] = {"response": label}
    else:
        item = {"type": "object", "properties": {"id": {"type": "string", "enum": list(ids)}, "response": label},
                "required": ["id", "response"], "additionalProperties": False}
        props = {"answers": {"type": "array", "items": item, "minItems": len(ids), "maxItems": len(ids)}}
    if cot:
        props = {"reasoning": {"type": "string"}, **props}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


# -- parsing --------------------------------------------------------------------------------
def _label(text: str) -> str | None:
    """The one label a short text states, or None (none, both, or negated)."""
    t = text.lower()
    if _NEG.search(t):
        return None
    found = set(_WORD.findall(t))
    return found.pop() if len(found) == 1 else None


def _json_obj(text: str) -> Any:
    t = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", t, re.S)
    if fence:
        t = fence.group(1).strip()
    for cand in (t, t[t.find("{"):t.rfind("}") + 1] if "{" in t else ""):
        if cand:
            with contextlib.suppress(ValueError):
                return json.loads(cand)
    return None


def parse_answer(text: str | None, ids: Sequence[str] | None = None, *, cot: bool = False) -> dict[str, str | None]:
    """The label per cell id (``None``: unparsed) of a reply; ``ids=None`` is one cell, key ``""``.

    Strict: JSON (also inside a code fence) with ``response`` in {sensitive, resistant} (several
    cells: ``answers`` of ``{id, response}``; an id answered twice differently, or not at all, is
    unparsed); otherwise text: one cell needs exactly one of the two words, not negated (with
    ``cot``: in what follows the last ``answer``); several cells need a line ``ID: label`` each.
    """
    keys = [""] if ids is None else list(ids)
    out: dict[str, str | None] = dict.fromkeys(keys)
    if not text:
        return out
    obj = _json_obj(text)
    if isinstance(obj, dict):
        if ids is None:
            r = obj.get("response")
            out[""] = r.strip().lower() if isinstance(r, str) and r.strip().lower() in LABELS else None
            return out
        seen: dict[str, set[str]] = {}
        for a in obj.get("answers") or []:
            if isinstance(a, dict) and isinstance(a.get("id"), str) and isinstance(a.get("response"), str):
                seen.setdefault(a["id"].strip(), set()).add(a["response"].strip().lower())
        for k in keys:
            got = seen.get(k, set())
            out[k] = got.pop() if len(got) == 1 and next(iter(got)) in LABELS else None
        return out
    low = text.lower()
    if ids is None:
        m = re.search(r'"response"\s*:\s*"(sensitive|resistant)"', low)
        if m:
            out[""] = m.group(1)
            return out
        seg = low
        if cot:
            at = low.rfind("answer")
            seg = low[at + len("answer"):] if at >= 0 else ""
        out[""] = _label(seg)
        return out
    for k in keys:
        m = re.findall(rf'"id"\s*:\s*"{re.escape(k)}"\s*,\s*"response"\s*:\s*"(sensitive|resistant)"', low)
        if not m:
            m = [lab for line in low.splitlines() for lab in [_label(line)]
                 if re.match(rf"^\W*{re.escape(k.lower())}\b", line.strip()) and lab]
        out[k] = m[0] if len(set(m)) == 1 else None
    return out


# -- the response cache ---------------------------------------------------------------------
class ResponseCache:
    """Replies on disk (SQLite), keyed by sha256 of (model, messages, parameters); thread-safe."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ScdmError(f"--cache {str(self.folder)!r} is a file, not a folder", "pass --cache with a folder")
        self.path = self.folder / "responses.sqlite3"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT, request TEXT, "
                       "content TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS modes (model TEXT, base_url TEXT, mode TEXT, "
                       "PRIMARY KEY (model, base_url))")
            db.commit()
            self._db = db
        return self._db

    @staticmethod
    def key(model: str, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> str:
        blob = json.dumps({"model": model, "messages": list(messages), "params": dict(params)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[str, int, int]]:
        """``key -> (content, prompt_tokens, completion_tokens)`` of the cached ones (no file: none)."""
        if self._db is None and not self.path.exists():
            return {}
        with self._lock:
            db, out = self._conn(), {}
            for i in range(0, len(keys), 500):
                part = list(keys[i:i + 500])
                q = f"SELECT key, content, prompt_tokens, completion_tokens FROM responses WHERE key IN ({','.join('?' * len(part))})"
                out.update({k: (c, int(p or 0), int(t or 0)) for k, c, p, t in db.execute(q, part)})
            return out

    def put(self, key: str, model: str, request: Mapping[str, Any], content: str, usage: tuple[int, int]) -> None:
        with self._lock:
            db = self._conn()
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (key, model, json.dumps(request, sort_keys=True), content, usage[0], usage[1], time.time()))
            db.commit()

    def mode(self, model: str, base_url: str) -> str | None:
        if self._db is None and not self.path.exists():
            return None
        with self._lock:
            row = self._conn().execute("SELECT mode FROM modes WHERE model=? AND base_url=?", (model, base_url)).fetchone()
        return row[0] if row else None

    def set_mode(self, model: str, base_url: str, mode: str) -> None:
        with self._lock:
            db = self._conn()
            db.execute("INSERT OR REPLACE INTO modes VALUES (?, ?, ?)", (model, base_url, mode))
            db.commit()

    def __len__(self) -> int:
        if self._db is None and not self.path.exists():
            return 0
        with self._lock:
            return int(self._conn().execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def default_cache() -> Path:
    """The response cache folder: ``<user cache>/llm`` (``$SCDM_CACHE_DIR``, ``~/.cache/scdm``)."""
    from scdm_embed.locations import cache_dir

    return cache_dir() / "llm"


# -- the plan ---------------------------------------------------------------------------------
@dataclass
class Request:
    """One chat request: its cells (split-table positions), messages and cache key."""

    cells: list[int]
    ids: list[str] | None
    messages: list[dict[str, str]]
    key: str = ""


@dataclass
class PromptPlan:
    """What a prompting run will send (no network used to make it)."""

    llm: str
    classifier: str
    splits: Splits
    cells: pd.DataFrame
    partitions: list[Partition]
    requests: list[Request]
    params: dict[str, Any]
    mode: str
    cached: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    store: EmbeddingStore | None = None

    @property
    def n_cells(self) -> int:
        return sum(len(r.cells) for r in self.requests)

    def estimate(self) -> dict[str, int]:
        """Requests, cached ones, and estimated tokens (4 characters per token) of the rest."""
        todo = [r for r in self.requests if r.key not in self.cached]
        prompt = sum(sum(len(m["content"]) for m in r.messages) // 4 + 8 for r in todo)
        return {"cells": self.n_cells, "requests": len(self.requests), "cached": len(self.requests) - len(todo),
                "to_send": len(todo), "est_prompt_tokens": prompt,
                "max_completion_tokens": len(todo) * int(self.params["max_tokens"])}


def describe_plan(plan: PromptPlan, *, show: int = 2) -> str:
    """The dry-run report: counts, estimated tokens and the first ``show`` requests in full."""
    e = plan.estimate()
    lines = [f"dry run: {e['cells']} test cells of split {plan.splits.name} in {len(plan.partitions)} partitions, "
             f"{e['requests']} requests to {plan.llm} ({plan.classifier}; {plan.params['cells_per_request']} cell(s) "
             f"per request)",
             f"cached: {e['cached']}" + (" (structured-output kind not probed yet: cache looked up after the probe)"
                                          if plan.mode == "auto" else "") + f"; to send: {e['to_send']}",
             f"estimated tokens: ~{e['est_prompt_tokens']} prompt (4 characters per token) + at most "
             f"{e['max_completion_tokens']} completion (max_tokens {plan.params['max_tokens']} per request)",
             f"cache: {plan.params['cache']}"]
    y = plan.splits.table["label"].to_numpy()
    per = [f"{p.name} {int((y[p.test] == 1).sum())}/{int((y[p.test] == 0).sum())}" for p in plan.partitions]
    lines.append("test cells per partition (sensitive/resistant): " + ", ".join(per[:24])
                 + (f", ... ({len(per) - 24} more)" if len(per) > 24 else ""))
    for i, r in enumerate(plan.requests[:show]):
        lines += ["", f"--- request {i + 1} of {len(plan.requests)} ---"]
        lines += [f"[{m['role']}] {m['content']}" for m in r.messages]
    return "\n".join(lines)


def _classifier(genes: int, cot: bool) -> str:
    return f"prompt-top{genes}" + ("-cot" if cot else "")


def _check_int(name: str, value: Any, low: int, high: int | None = None, fix: str = "") -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low \
            or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in {low}..{high}"
        raise ScdmError(f"{name} must be an integer {rng} (got {value!r})", fix or f"pass e.g. --{name.replace('_', '-')} {low}")
    return int(value)


def _expression(store: EmbeddingStore | None, cells: pd.DataFrame, keys: np.ndarray,
                input: str | Path | Mapping[str, str | Path] | None, data_by_ds: dict[str, Any]) -> None:
    """Open each dataset's raw input (``data_by_ds``: dataset -> InputDataset), checked against the store."""
    if store is None:
        return
    from ._finetune import _inputs, _read

    dsets = sorted(pd.unique(cells.loc[keys, "dataset"]).tolist())
    paths = _inputs(store, dsets, input)
    entries = store.entries()
    for ds in dsets:
        prov = next((store.embedding_record(e.model, ds).provenance for e in entries if e.dataset == ds), None)
        data_by_ds[ds] = _read(store, ds, paths[ds], _AnyValues, prov)


class _AnyValues:
    """Reading raw cells for prompts: ranks need no integer counts; duplicated gene ids allowed."""

    needs_counts = False
    allows_duplicate_genes = True


def _top_by_cell(cells: pd.DataFrame, keys: np.ndarray, data_by_ds: Mapping[str, Any], n: int) -> list[tuple[str, ...]]:
    """Top-``n`` gene symbols of the cells ``keys`` (store cell keys), in that order."""
    out: list[tuple[str, ...] | None] = [None] * len(keys)
    sub = cells.loc[keys]
    for ds, data in data_by_ds.items():
        at = np.flatnonzero(sub["dataset"].to_numpy() == ds)
        if not len(at):
            continue
        ids = np.array([k[len(ds) + 1:] for k in keys[at]], dtype=object)
        pos = data.cells.index.get_indexer(ids)
        if (pos < 0).any():
            raise StoreError(f"{int((pos < 0).sum())} cells of dataset {ds!r} (e.g. {ids[pos < 0][0]!r}) are not in "
                             f"{str(data.path)!r}", "pass the file the dataset was extracted from (--input)")
        order = np.argsort(pos, kind="stable")
        for s in range(0, len(order), 2048):
            block = order[s:s + 2048]
            rows = pos[block]
            # read the span of rows once, then pick (cells are mostly contiguous in store order)
            X = data.read_rows(int(rows.min()), int(rows.max()) + 1)[rows - rows.min()]
            for j, g in zip(block, top_genes(X, data.genes.symbols, n), strict=True):
                out[at[j]] = g
    empty = [keys[i] for i, g in enumerate(out) if not g]
    if empty:
        raise ScdmError(f"{len(empty)} cells have no expressed gene with a symbol (e.g. {empty[0]!r})",
                        "check the input's gene names (var_names or the extraction's --gene-key)")
    return out  # type: ignore[return-value]


def stratified_subset(partitions: Sequence[Partition], y: np.ndarray, max_cells: int, *, seed: int = 0
                      ) -> np.ndarray:
    """At most ``max_cells`` test cells (sorted split-table positions), stratified by (partition, class).

    Every (partition, class) stratum with test cells first gets one cell, as far as the cap allows
    (one stratum of each partition, in a seeded order, before a second one of any); the rest of the
    cap is shared in proportion to the strata's sizes (largest remainder, never above a stratum's
    size); each stratum's cells are a seeded random draw. The same inputs and ``seed`` give the
    same cells.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    strata: list[np.ndarray] = []  # test positions of one (partition, class)
    rounds: list[list[int]] = []   # rounds[r]: the r-th stratum of each partition (seeded class order)
    for p in [partitions[i] for i in rng.permutation(len(partitions))]:
        test = np.unique(np.asarray(p.test, dtype=np.int64))
        classes = np.unique(y[test])
        for r, c in enumerate(classes[rng.permutation(len(classes))]):
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(len(strata))
            strata.append(test[y[test] == c])
    size = np.array([len(s) for s in strata], dtype=np.int64)
    quota = np.zeros(len(strata), dtype=np.int64)
    budget = min(int(max_cells), int(size.sum()))
    for s in (s for rnd in rounds for s in rnd):
        if budget == 0:
            break
        quota[s], budget = 1, budget - 1
    if budget > 0:  # the rest in proportion to size (Hamilton's largest remainder), capped by size
        while budget > 0:
            room = size - quota
            share = budget * np.where(room > 0, size, 0) / size[room > 0].sum()
            add = np.minimum(np.floor(share).astype(np.int64), room)
            if add.sum() == 0:  # fewer cells left than strata with room: the largest remainders
                order = np.lexsort((np.arange(len(strata)), -(share - np.floor(share))))
                add = np.zeros_like(quota)
                add[[s for s in order if room[s] > 0][:budget]] = 1
            quota += add
            budget -= int(add.sum())
    picked = [rng.choice(s, size=q, replace=False) for s, q in zip(strata, quota, strict=True) if q]
    return np.unique(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)


def _input_only(input: str | Path, scheme: str, by: str, folds: int, group_key: str | None, seed: int,
                strict: bool) -> tuple[pd.DataFrame, Splits, dict[str, Any]]:
    """Cells, in-memory splits and the opened input of a prompt run on one file (no store)."""
    from scdm_embed.datasets import REGISTRY, resolve
    from scdm_embed.inputs import read_input

    path = resolve(input)
    if not path.exists():
        raise ScdmError(f"--input {str(input)!r} does not exist", "pass an .h5ad file (or a registry name: scdm-embed datasets)")
    name = str(input) if str(input) in REGISTRY else path.stem
    data = read_input(path, require_counts=False, allow_duplicate_genes=True)
    cells = data.cells.copy()
    cells.insert(0, "row", np.arange(len(cells)))
    cells.insert(0, "dataset", name)
    cells.index = pd.Index([f"{name}/{c}" for c in cells.index], name="cell")
    splits = compute_splits(cells, scheme=scheme, by=by, folds=folds, group_key=group_key, seed=seed, strict=strict)
    return cells, splits, {name: data}


def plan_prompting(
    store: str | Path | EmbeddingStore | None = None,
    *,
    llm: str,
    input: str | Path | Mapping[str, str | Path] | None = None,
    genes: int = 10,
    cot: bool = False,
    context: bool = True,
    cells_per_request: int = 1,
    max_cells: int | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    scheme: Literal["pooled", "cross"] = "pooled",
    by: str = "all",
    folds: int = 10,
    group_key: str | None = None,
    seed: int = 0,
    strict: bool = False,
    structured: str = "auto",
    base_url: str = "",
    cache: str | Path | None = None,
) -> PromptPlan:
    """Build every request of a prompting run (see :func:`run_prompting`); sends nothing."""
    if not isinstance(llm, str) or not llm.strip():
        raise ScdmError(f"--llm must name the endpoint's model (got {llm!r})", "pass e.g. --llm gpt-4o-mini")
    genes = _check_int("genes", genes, 1, 1000, "pass --genes 10 or --genes 100 (the paper's), or another count >= 1")
    k = _check_int("cells_per_request", cells_per_request, 1, 100, "pass e.g. --cells-per-request 1 (or up to 100)")
    if max_cells is not None:
        max_cells = _check_int("max_cells", max_cells, 1, fix="pass e.g. --max-cells 50, or leave it out for every test cell")
    if max_tokens is None:
        max_tokens = (384 if cot else 24) + 16 * (k if k > 1 else 0)
    max_tokens = _check_int("max_tokens", max_tokens, 1, fix="pass e.g. --max-tokens 64")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise ScdmError(f"temperature must be a number in [0, 2] (got {temperature!r})", "pass e.g. --temperature 0")
    if scheme not in ("pooled", "cross"):
        raise ScdmError(f"the LLM stage scores the pooled or cross splits (got scheme {scheme!r})",
                        "pass --scheme pooled or --scheme cross")
    if structured not in STRUCTURED:
        raise ScdmError(f"structured must be one of {list(STRUCTURED)} (got {structured!r})", "pass --structured auto")
    if store is None and input is None:
        raise ScdmError("no cells given", "pass --store STORE (the cells of `scdm-eval run`) or --input cells.h5ad")
    data_by_ds: dict[str, Any] = {}
    st = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LeakageWarning)
        warnings.simplefilter("always", SplitWarning)
        if store is None:
            if isinstance(input, Mapping):
                raise ScdmError("--input DATASET=PATH needs --store", "pass --input cells.h5ad alone, or add --store")
            cells, splits, data_by_ds = _input_only(input, scheme, by, folds, group_key, seed, strict)
        else:
            from ._splits import open_store

            st = open_store(store)
            splits = make_splits(st, save=False, scheme=scheme, by=by, folds=folds, group_key=group_key, seed=seed,
                                 strict=strict)
            cells = st.cells(splits.params["datasets"]).reindex(splits.table.index)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = [str(w.message) for w in caught if issubclass(w.category, (LeakageWarning, SplitWarning))]
    parts = list(splits)
    tested = np.concatenate([p.test for p in parts]) if parts else np.empty(0, dtype=np.int64)
    if max_cells is not None and max_cells < len(tested):
        pick = stratified_subset(parts, splits.table["label"].to_numpy(), max_cells, seed=seed)
        kept = [replace(p, test=p.test[np.isin(p.test, pick)]) for p in parts]
        dropped = [p.name for p, q in zip(parts, kept, strict=True) if not len(q.test)]
        if dropped:
            msg = (f"--max-cells {max_cells} is fewer than the {len(parts)} partitions: {len(dropped)} partitions "
                   f"(e.g. {dropped[0]!r}) get no test cell and are not scored; pass --max-cells {2 * len(parts)} "
                   "or more for every partition with both classes")
            warnings.warn(msg, UserWarning, stacklevel=2)
            notes.append(msg)
        parts = [q for q in kept if len(q.test)]
        tested = np.concatenate([p.test for p in parts])
    keys = splits.table.index.to_numpy(dtype=object)[tested]
    _expression(st, cells, keys, input, data_by_ds)
    try:
        tops = _top_by_cell(cells, keys, data_by_ds, genes)
    finally:
        for d in data_by_ds.values():
            d.close()
    ctx_cols = [c for c in CONTEXT_KEYS if context and c in cells.columns]
    ctx = cells.loc[keys, ctx_cols].astype(str) if ctx_cols else pd.DataFrame(index=keys)
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(ctx.itertuples(index=False)):
        groups.setdefault(tuple(row), []).append(i)
    params = {"temperature": float(temperature), "max_tokens": int(max_tokens), "seed": int(seed),
              "prompt_version": PROMPT_VERSION}
    cache_obj = ResponseCache(default_cache() if cache is None else cache)
    mode = structured if structured != "auto" else (cache_obj.mode(llm, base_url) or "auto")
    requests = []
    for values, members in groups.items():
        c = {k2: v for k2, v in zip(ctx_cols, values, strict=True) if v not in ("", "nan", "None")}
        for s in range(0, len(members), k):
            chunk = members[s:s + k]
            ids = None if k == 1 else [f"c{j + 1}" for j in range(len(chunk))]
            requests.append(Request([int(tested[j]) for j in chunk], ids,
                                    build_messages([tops[j] for j in chunk], c, cot=cot, ids=ids)))
    plan = PromptPlan(llm=llm, classifier=_classifier(genes, cot), splits=splits, cells=cells, partitions=parts,
                      requests=requests, params=params, mode=mode, notes=notes, store=st)
    plan.params.update({"genes": genes, "cot": bool(cot), "context": ctx_cols, "cells_per_request": k})
    _rekey(plan, cache_obj)
    cache_obj.close()
    plan.params["cache"] = str(cache_obj.folder)
    return plan


def _request_params(plan: PromptPlan, mode: str) -> dict[str, Any]:
    p = {k: plan.params[k] for k in ("temperature", "max_tokens", "seed", "prompt_version")}
    return {**p, "structured": mode}


def _rekey(plan: PromptPlan, cache: ResponseCache) -> None:
    """Cache keys for the plan's mode, and which of them are cached (``auto``: none known yet)."""
    p = _request_params(plan, plan.mode)
    for r in plan.requests:
        r.key = ResponseCache.key(plan.llm, r.messages, p) if plan.mode != "auto" else ""
    plan.cached = cache.get_many([r.key for r in plan.requests]) if plan.mode != "auto" else {}


# -- sending --------------------------------------------------------------------------------
class _Unsupported(Exception):
    """The endpoint refused the response_format."""


class _EndpointDown(Exception):
    """Retries exhausted."""


@dataclass
class _Endpoint:
    client: Any
    model: str
    retries: int
    backoff: float
    retried: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, messages: list[dict[str, str]], params: Mapping[str, Any], mode: str,
             schema: dict[str, Any]) -> tuple[str, tuple[int, int]]:
        import openai

        kw: dict[str, Any] = {"temperature": params["temperature"], "max_tokens": params["max_tokens"],
                              "seed": params["seed"]}
        if mode == "json_schema":  # OpenAI's strict mode: no array-length keywords (ids are checked on parsing)
            strict = {**schema, "properties": {k: {kk: vv for kk, vv in v.items() if kk not in ("minItems", "maxItems")}
                                               for k, v in schema["properties"].items()}}
            kw["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "drug_response", "strict": True, "schema": strict}}
        elif mode == "json_object":
            kw["response_format"] = {"type": "json_object", "schema": schema}
        for attempt in range(self.retries + 1):
            try:
                r = self.client.chat.completions.create(model=self.model, messages=messages, **kw)
                u = r.usage
                content = r.choices[0].message.content if r.choices else ""
                return content or "", (int(getattr(u, "prompt_tokens", 0) or 0), int(getattr(u, "completion_tokens", 0) or 0))
            except openai.AuthenticationError as e:
                raise ScdmError(f"the endpoint refused the API key ({_msg(e)})",
                                "set OPENAI_API_KEY (or the variable named by --api-key-env) to a valid key") from None
            except openai.NotFoundError as e:
                raise ScdmError(f"the endpoint does not know model {self.model!r} or the chat API ({_msg(e)})",
                                "pass --llm with a model the endpoint serves, and --base-url ending in /v1") from None
            except openai.APIStatusError as e:
                body = _msg(e).lower()
                if "response_format" in kw and ("response_format" in body or "json_schema" in body
                                                or e.status_code in (400, 415, 422)):
                    raise _Unsupported(body) from None
                if e.status_code not in (408, 409, 429) and e.status_code < 500:
                    raise ScdmError(f"the endpoint rejected a request: HTTP {e.status_code} ({_msg(e)})",
                                    "check --llm, --max-tokens and the prompt size (--genes, --cells-per-request) "
                                    "against the endpoint's limits") from None
                err: Exception = e
                wait_s = _retry_after(e)
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                err, wait_s = e, None
            if attempt == self.retries:
                raise _EndpointDown(f"{type(err).__name__}: {_msg(err)}")
            with self._lock:
                self.retried += 1
            time.sleep(wait_s if wait_s is not None else min(self.backoff * 2 ** attempt, 60.0))
        raise AssertionError("unreachable")


def _msg(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def _retry_after(e: Any) -> float | None:
    with contextlib.suppress(Exception):
        v = e.response.headers.get("retry-after")
        if v is not None:
            return min(float(v), 60.0)
    return None


def _api_key(api_key_env: str | None, base_url: str) -> str:
    if api_key_env is not None:
        if not api_key_env.strip() or api_key_env not in os.environ or not os.environ[api_key_env]:
            raise ScdmError(f"--api-key-env {api_key_env!r}: no such environment variable is set",
                            f"export {api_key_env}=YOUR_KEY first, or drop --api-key-env (OPENAI_API_KEY is read "
                            "when set; local servers need no key)")
        return os.environ[api_key_env]
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if "api.openai.com" in base_url:
        raise ScdmError("OPENAI_API_KEY is not set, and api.openai.com needs a key",
                        "export OPENAI_API_KEY=sk-... (or name another variable with --api-key-env)")
    return "no-key"  # local servers (llama.cpp, vLLM without --api-key) accept any


def _check_url(base_url: str) -> str:
    from urllib.parse import urlparse

    u = urlparse(str(base_url))
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ScdmError(f"--base-url {base_url!r} is not an http(s) URL",
                        "pass e.g. --base-url http://127.0.0.1:8000/v1 (vLLM / llama.cpp) or https://api.openai.com/v1")
    return str(base_url).rstrip("/")


def _reachable(client: Any, base_url: str, llm: str) -> None:
    """Fail fast when nothing answers at ``base_url`` (a wrong port, a stopped server)."""
    import openai

    try:
        listed = [m.id for m in client.models.list(timeout=15.0).data]
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        raise ScdmError(f"cannot reach the endpoint at {base_url} ({type(e).__name__})",
                        "start the server (e.g. `python -m llama_cpp.server --model M.gguf --host 127.0.0.1`, "
                        "`vllm serve MODEL`) or fix --base-url; cached answers are kept") from None
    except openai.AuthenticationError as e:
        raise ScdmError(f"the endpoint refused the API key ({_msg(e)})",
                        "set OPENAI_API_KEY (or the variable named by --api-key-env) to a valid key") from None
    except openai.APIError:
        return  # some servers have no /models: the chat requests will tell
    if listed and llm not in listed:
        warnings.warn(f"the endpoint lists models {listed[:5]}, not {llm!r}; asking for {llm!r} anyway", UserWarning,
                      stacklevel=3)


def run_prompting(
    store: str | Path | EmbeddingStore | None = None,
    *,
    llm: str,
    base_url: str,
    input: str | Path | Mapping[str, str | Path] | None = None,
    genes: int = 10,
    cot: bool = False,
    context: bool = True,
    cells_per_request: int = 1,
    max_cells: int | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    scheme: Literal["pooled", "cross"] = "pooled",
    by: str = "all",
    folds: int = 10,
    group_key: str | None = None,
    seed: int = 0,
    strict: bool = False,
    structured: str = "auto",
    unparsed: Literal["wrong", "neutral"] = "wrong",
    api_key_env: str | None = None,
    concurrency: int = 4,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 120.0,
    cache: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Ask the chat model ``llm`` at ``base_url`` about every test cell of the saved splits; score it.

    Cells: the store's (``store``: the splits of ``scdm-eval run`` with the same ``scheme``/
    ``by``/``folds``/``group_key``/``seed``; their counts from each dataset's recorded input, or
    ``input`` = a path or ``{dataset: path}``) or one file's (``input`` alone; splits made in memory).
    ``max_cells`` keeps a seeded subset of the test cells stratified by (partition, class), see
    :func:`stratified_subset`. The key is read from
    ``$OPENAI_API_KEY`` or the variable ``api_key_env`` names. ``concurrency`` requests at a
    time; ``retries`` with back-off ``backoff * 2**attempt`` s (or the server's Retry-After) on
    429/5xx/time-outs/lost connections; answers are cached in ``cache`` (default
    :func:`default_cache`) as they come, so a failed run resumes where it stopped.

    Returns one row per partition (columns :data:`PROMPT_RESULT_COLUMNS`, ``model="llm:<llm>"``,
    ``classifier="prompt-top<genes>[-cot]"``); ``.attrs["llm"]`` holds the settings and token usage.
    With ``out``: ``llm_results.parquet/.csv``, ``llm_summary.csv/.md``, ``llm_predictions.parquet``
    (columns ``PREDICTION_COLUMNS`` + ``answer``) and ``llm_usage.json``.
    """
    import openai

    if unparsed not in UNPARSED:
        raise ScdmError(f"unparsed must be one of {list(UNPARSED)} (got {unparsed!r})", "pass --unparsed wrong")
    concurrency = _check_int("concurrency", concurrency, 1, 256, "pass e.g. --concurrency 4")
    retries = _check_int("retries", retries, 0, 20, "pass e.g. --retries 5")
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ScdmError(f"timeout must be a positive number of seconds (got {timeout!r})", "pass e.g. --timeout 120")
    base_url = _check_url(base_url)
    key = _api_key(api_key_env, base_url)
    if out is not None:
        _check_out(out)
    plan = plan_prompting(store, llm=llm, input=input, genes=genes, cot=cot, context=context,
                          cells_per_request=cells_per_request, max_cells=max_cells, max_tokens=max_tokens,
                          temperature=temperature, scheme=scheme, by=by, folds=folds, group_key=group_key, seed=seed,
                          strict=strict, structured=structured, base_url=base_url, cache=cache)
    t0 = time.perf_counter()
    db = ResponseCache(plan.params["cache"])
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=float(timeout))
    ep = _Endpoint(client, llm, retries, float(backoff))
    replies: dict[str, tuple[str, int, int]] = dict(plan.cached)
    sent: list[str] = []
    try:
        todo = [r for r in plan.requests if r.key not in replies]
        if todo:
            _reachable(client, base_url, llm)
        with contextlib.ExitStack() as stack:
            tick = lambda: None  # noqa: E731
            if progress and todo:
                from rich.progress import Progress

                bar = stack.enter_context(Progress(transient=True))
                task = bar.add_task(f"asking {llm} ({concurrency} at a time)", total=len(todo))
                tick = lambda: bar.advance(task)  # noqa: E731

            def one(r: Request) -> None:
                schema = answer_schema(r.ids, cot=plan.params["cot"])
                content, usage = ep.send(r.messages, plan.params, plan.mode, schema)
                db.put(r.key, llm, {"messages": r.messages, **_request_params(plan, plan.mode)}, content, usage)
                replies[r.key] = (content, *usage)
                sent.append(r.key)
                tick()

            if todo and plan.mode == "auto":
                todo = _probe(plan, ep, db, base_url, replies, one)
            _send_all(todo, one, concurrency)
    except _EndpointDown as e:
        total = len(plan.requests)
        raise ScdmError(f"the endpoint at {base_url} stopped answering after {retries} retries ({e}); "
                        f"{len(replies)} of {total} requests are answered and cached ({len(sent)} in this run)",
                        "check the server, then re-run the same command: cached answers are not requested again") from None
    finally:
        db.close()
    return _score(plan, replies, unparsed=unparsed, sent=sent, retried=ep.retried, seconds=time.perf_counter() - t0,
                  base_url=base_url, concurrency=concurrency, out=out)


def _probe(plan: PromptPlan, ep: _Endpoint, db: ResponseCache, base_url: str,
           replies: dict[str, tuple[str, int, int]], one) -> list[Request]:
    """``auto``: find the structured-output kind the endpoint takes with the first request; the
    remaining requests (rekeyed for it, cached ones dropped)."""
    for mode in STRUCTURED[1:]:
        plan.mode = mode
        _rekey(plan, db)
        replies.update(plan.cached)
        todo = [r for r in plan.requests if r.key not in replies]
        if not todo:
            break
        try:
            one(todo[0])
        except _Unsupported:
            continue
        break
    db.set_mode(plan.llm, base_url, plan.mode)
    return [r for r in plan.requests if r.key not in replies]


def _send_all(todo: list[Request], one, concurrency: int) -> None:
    if not todo:
        return
    if concurrency == 1:
        for r in todo:
            one(r)
        return
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futs = [pool.submit(one, r) for r in todo]
        done, pending = wait(futs, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in futs:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]


def _score(plan: PromptPlan, replies: Mapping[str, tuple[str, int, int]], *, unparsed: str, sent: Sequence[str],
           retried: int, seconds: float, base_url: str, concurrency: int, out: str | Path | None) -> pd.DataFrame:
    splits = plan.splits
    y = splits.table["label"].to_numpy().astype(np.int64)
    label = np.full(len(y), -1, dtype=np.int8)  # 1 sensitive, 0 resistant, -1 unparsed
    for r in plan.requests:
        got = parse_answer(replies[r.key][0], r.ids, cot=plan.params["cot"])
        for pos, k in zip(r.cells, r.ids or [""], strict=True):
            label[pos] = {"sensitive": 1, "resistant": 0}.get(got[k] or "", -1)
    p = np.where(label == 1, 1.0, 0.0)
    miss = label < 0
    p[miss] = (1.0 - y[miss]) if unparsed == "wrong" else 0.5
    model = f"llm:{plan.llm}"
    rows, blocks = [], []
    for part in plan.partitions:
        row = _row(model, splits, part, plan.classifier, compute_metrics(y[part.test], p[part.test]), y,
                   plan.params["seed"])
        row["n_unparsed"] = int(miss[part.test].sum())
        rows.append(row)
        blocks.append((model, part, plan.classifier, p[part.test]))
    res = pd.DataFrame(rows, columns=list(PROMPT_RESULT_COLUMNS)).astype(
        {"fold": np.int64, "seed": np.int64, "leak_prone": bool, "n_unparsed": np.int64})
    used = [replies[r.key] for r in plan.requests]
    spent = [replies[k] for k in sent]
    usage = {"requests": len(plan.requests), "sent": len(sent), "cached": len(plan.requests) - len(sent),
             "retries": retried,
             "cells": plan.n_cells, "unparsed": int(miss[np.concatenate([q.test for q in plan.partitions])].sum())
             if plan.partitions else 0,
             "prompt_tokens": sum(u[1] for u in used), "completion_tokens": sum(u[2] for u in used),
             "spent_prompt_tokens": sum(u[1] for u in spent), "spent_completion_tokens": sum(u[2] for u in spent),
             "seconds": round(seconds, 3)}
    treatment = ("unparsed answers are kept in every denominator and scored as wrong (P(sensitive) = 1 - truth), so "
                 "an unanswered cell can only lower a score" if unparsed == "wrong" else
                 "unparsed answers are kept in every denominator and scored P(sensitive) = 0.5 (no information; "
                 "predicted sensitive at the 0.5 threshold)")
    res.attrs.update({
        "split": splits.name, "skipped": splits.skipped.to_dict("records"), "warnings": plan.notes,
        "params": {**splits.params, "models": [model], "classifiers": [plan.classifier],
                   "store": str(plan.store.path) if plan.store is not None else None},
        "llm": {"model": plan.llm, "base_url": base_url, "structured": plan.mode, "unparsed": unparsed,
                "unparsed_treatment": treatment, "concurrency": concurrency, **plan.params, "usage": usage,
                "cells_tested": plan.n_cells, "cells_in_partitions": int(sum(len(q.test) for q in plan.partitions))},
    })
    if out is not None:
        answers = np.array(["resistant", "sensitive", "unparsed"], dtype=object)[np.where(miss, 2, label)]
        preds = predictions_table(plan.cells, splits, blocks)
        at = np.concatenate([q.test for q in plan.partitions]) if plan.partitions else np.empty(0, dtype=np.int64)
        preds["answer"] = pd.Categorical(answers[at], categories=["sensitive", "resistant", "unparsed"])
        write_prompt_report(res, out, predictions=preds)
    if plan.store is not None and not splits.saved:
        save_splits(plan.store, splits)
    return res


def write_prompt_report(results: pd.DataFrame, out: str | Path, *, predictions: pd.DataFrame | None = None
                        ) -> dict[str, Path]:
    """``llm_results.parquet/.csv``, ``llm_summary.csv/.md``, ``llm_usage.json`` (and ``llm_predictions.parquet``)."""
    from ._report import write_stage_tables

    info = results.attrs.get("llm", {})
    u = info.get("usage", {})
    extra = ["", "## LLM", "",
             f"- endpoint: {info.get('base_url')}, model `{info.get('model')}`, structured output: {info.get('structured')}",
             f"- prompt: top {info.get('genes')} genes, context {info.get('context')}, chain of thought: "
             f"{info.get('cot')}, {info.get('cells_per_request')} cell(s) per request; temperature "
             f"{info.get('temperature')}, max_tokens {info.get('max_tokens')}",
             f"- unparsed answers: {int(results['n_unparsed'].sum())} of {int(results['n_test'].sum())} test cells "
             f"(per fold: column n_unparsed); {info.get('unparsed_treatment')}",
             f"- requests: {u.get('requests')} ({u.get('sent')} sent, {u.get('cached')} from the cache, "
             f"{u.get('retries')} retries); tokens of these answers: {u.get('prompt_tokens')} prompt + "
             f"{u.get('completion_tokens')} completion, spent in this run: {u.get('spent_prompt_tokens')} + "
             f"{u.get('spent_completion_tokens')}",
             "- the LLM is trained on nothing: n_train and the train counts describe the partition only", ""]
    paths, _ = write_stage_tables(results, out, "llm", extra_md="\n".join(extra), predictions=predictions)
    paths["usage"] = Path(out) / "llm_usage.json"
    paths["usage"].write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    return paths


__all__ = ["CONTEXT_KEYS", "LABELS", "PROMPT_RESULT_COLUMNS", "PromptPlan", "ResponseCache", "answer_schema",
           "build_messages", "default_cache", "describe_plan", "parse_answer", "plan_prompting", "run_prompting",
           "stratified_subset", "top_genes", "write_prompt_report"]
