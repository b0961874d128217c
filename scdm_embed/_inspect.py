"""Describe a store for people (``scdm-embed inspect``) and for code (:func:`store_table`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from ._store import EmbeddingStore


def store_table(store: str | Path) -> pd.DataFrame:
    """One row per model x dataset array with completeness and key provenance."""
    st = EmbeddingStore(store)
    rows = []
    for e in st.entries():
        a = e.attrs
        tel = a.get("telemetry", {}) or {}
        ov = a.get("gene_overlap", {}) or {}
        rows.append({"model": e.model, "dataset": e.dataset, "cells": e.n_cells, "dim": e.dim,
                     "status": "stale" if e.stale else "complete" if e.complete else f"partial {e.chunks_done}/{e.n_chunks}",
                     "checkpoint_hash": str(a.get("checkpoint_hash", ""))[:19], "device": a.get("device"),
                     "cells_per_s": tel.get("cells_per_s"), "peak_rss_mb": tel.get("peak_rss_mb"),
                     "genes_used": ov.get("n_data_used"), "vocab_present": ov.get("n_vocab_in_data"),
                     "scdm_version": a.get("scdm_version"), "created": a.get("created")})
    return pd.DataFrame(rows)


def describe_store(store: str | Path, *, console: Console, provenance: bool = False) -> None:
    st = EmbeddingStore(store)
    console.print(f"[bold]{store}[/] (scdm store format {st.root.attrs.get('encoding-version')})")
    dt = Table("dataset", "cells", "input hash", title="datasets")
    for ds in st.datasets():
        a = st.dataset_attrs(ds)
        dt.add_row(ds, str(a.get("n_cells")), str(a.get("input_hash", ""))[:12])
    console.print(dt)
    df = store_table(store)
    t = Table(*(["model", "dataset", "cells", "dim", "status", "checkpoint", "device", "cells/s", "genes used", "vocab present"]),
              title="embeddings")
    for r in df.itertuples():
        t.add_row(r.model, r.dataset, str(r.cells), str(r.dim), r.status, r.checkpoint_hash, str(r.device),
                  "" if r.cells_per_s is None else f"{r.cells_per_s:.0f}", str(r.genes_used), str(r.vocab_present))
    console.print(t)
    if st.splits():
        console.print("splits: " + ", ".join(st.splits()))
    if provenance:
        for e in st.entries():
            console.print(f"[bold]{e.model}/{e.dataset}[/]")
            console.print_json(json.dumps(e.attrs, default=str))
