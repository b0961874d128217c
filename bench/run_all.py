"""``make bench``: run every benchmark; each prints its own table of ratios."""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("bench_store_read.py", "bench_eval.py", "bench_extract.py", "bench_memory.py")

if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    only = sys.argv[1:]
    for name in BENCHES:
        if only and not any(o in name for o in only):
            continue
        print(f"\n=== {name}")
        t = time.perf_counter()
        runpy.run_path(str(HERE / name), run_name="__main__")
        print(f"({time.perf_counter() - t:.0f}s)")
