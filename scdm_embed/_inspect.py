"""Describe a store for people (``scdm-embed inspect``) and for code (:func:`store_table`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from .store import EmbeddingStore
from .store.schema import FORMAT_VERSION, is_older


def store_table(store: str | Path) -> pd.DataFrame:
    """One row per model x dataset array with completeness and key provenance."""
    st = EmbeddingStore(store)
    rows = []
    for e in st.entries():
        r = e.record
        tel = r.telemetry
        ov = r.gene_overlap or {}
        rows.append({"model": e.model, "dataset": e.dataset, "cells": e.n_cells, "dim": e.dim,
                     "status": "stale" if e.stale else "complete" if e.complete else f"partial {e.chunks_done}/{e.n_chunks}",
                     "checkpoint_hash": str(r.checkpoint_hash or "")[:19], "device": r.device,
                     "cells_per_s": tel.cells_per_s if tel else None, "peak_rss_mb": tel.peak_rss_mb if tel else None,
                     "genes_used": ov.get("n_data_used"), "vocab_present": ov.get("n_vocab_in_data"),
                     "scdm_version": r.scdm_version, "created": r.created})
    return pd.DataFrame(rows)


def describe_store(store: str | Path, *, console: Console, provenance: bool = False) -> None:
    st = EmbeddingStore(store)
    version = st.root.attrs.get("encoding-version")
    console.print(f"[bold]{store}[/] (scdm store format {version})")
    if is_older(st.root.attrs, "scdm-store"):
        console.print(f"[yellow]format {version} predates {FORMAT_VERSION}: it reads as it is; before writing into it, "
                      f"run `scdm-embed migrate {store}`[/]")
    dt = Table("dataset", "cells", "input hash", title="datasets")
    for ds in st.datasets():
        d = st.dataset_record(ds)
        dt.add_row(ds, str(d.n_cells), str(d.input_hash)[:12])
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
