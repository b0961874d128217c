"""LLM stage throughput: requests/s and cells/s against the local llama.cpp server, 1 vs 4 in flight.

Real PC9 cells (``--cells``, default 24; ``--quick``: 8), SmolLM2-135M-Instruct served by
``python -m llama_cpp.server`` on 127.0.0.1 (``scdm_eval._llm_server``; ``--threads`` server
threads, default 2), through the public ``run_prompting`` with a fresh response cache per row (so
every request is sent). Rows: concurrency 1 and 4 with one cell per request, then concurrency 4
with 4 cells per request. llama-cpp-python's server evaluates one request at a time, so extra
concurrency only overlaps the client's and HTTP's share; several cells per request amortise the
prompt. Benches never assert.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PC9, table  # noqa: E402

from scdm_eval._llm_server import LocalLLMServer  # noqa: E402
from scdm_eval._prompt import run_prompting  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    cells = 8 if a.quick else a.cells
    rows = []
    with LocalLLMServer(threads=a.threads) as srv, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for conc, per in ((1, 1), (4, 1), (4, 4)):
            with tempfile.TemporaryDirectory() as cache:
                res = run_prompting(input=PC9, llm=srv.alias, base_url=srv.base_url, max_cells=cells, folds=2,
                                    concurrency=conc, cells_per_request=per, cache=cache)
            u = res.attrs["llm"]["usage"]
            s = u["seconds"]
            rows.append((conc, per, u["requests"], u["cells"], f"{s:.1f}", f"{u['requests'] / s:.2f}",
                         f"{u['cells'] / s:.2f}", u["unparsed"],
                         f"{(u['spent_prompt_tokens'] + u['spent_completion_tokens']) / s:.0f}"))
    table(f"LLM stage on {cells} real PC9 cells, SmolLM2-135M on llama.cpp ({a.threads} threads), top-10 genes",
          rows, ("in flight", "cells/request", "requests", "cells", "seconds", "requests/s", "cells/s", "unparsed",
                 "tokens/s"))


if __name__ == "__main__":
    main()
