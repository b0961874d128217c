"""``make bench``: run every benchmark; each prints its own table.

``python bench/run_all.py [--quick] [--full] [NAME ...]``: only the benches whose file name contains
a NAME; ``--quick``/``--full`` are passed to the benches that take them (store read, eval).
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("bench_store_read.py", "bench_eval.py", "bench_extract.py", "bench_memory.py")
#: the benches that take --quick / --full
FLAGS = {"bench_store_read.py": ("--quick",), "bench_eval.py": ("--quick", "--full")}

if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    only = [a for a in sys.argv[1:] if not a.startswith("--")]
    for name in BENCHES:
        if only and not any(o in name for o in only):
            continue
        print(f"\n=== {name}")
        t = time.perf_counter()
        sys.argv = [str(HERE / name), *(f for f in flags if f in FLAGS.get(name, ()))]
        runpy.run_path(str(HERE / name), run_name="__main__")
        print(f"({time.perf_counter() - t:.0f}s)")
