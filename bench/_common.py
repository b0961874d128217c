"""Small helpers shared by the bench scripts (timing, tables). Benches print ratios; they never assert."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

from scdm_embed.locations import shared_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_dir()
PC9 = SHARED / "data" / "gse149214_pc9_erlotinib" / "pc9_d11_erlotinib_qc200.h5ad"
OUT = ROOT / "bench" / "_out"


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(title: str, rows: list[tuple], header: tuple) -> None:
    print(f"\n## {title}", flush=True)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for r in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)), flush=True)
