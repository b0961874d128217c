"""A real local chat server for the LLM-stage tests: SmolLM2-135M-Instruct on llama.cpp, 127.0.0.1.

Skips (with the reason) only when ``llama_cpp`` cannot be imported; everything else is real:
``python -m llama_cpp.server`` on a free port, waited for on ``/v1/models``, stopped after.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from scdm_eval._llm_server import LocalLLMServer


def llama_server() -> Iterator[LocalLLMServer]:
    """Start the server (one thread), yield it, stop it; a test may stop and restart it."""
    if importlib.util.find_spec("llama_cpp") is None:
        # a test dependency (the `test` extra, in requirements.lock): missing is a broken install, not a skip
        pytest.fail("llama-cpp-python is not installed (make install, or pip install 'llama-cpp-python[server]' "
                    "--find-links ../shared/wheels): the LLM stage is tested against a real local model only")
    srv = LocalLLMServer(threads=1).start()
    try:
        yield srv
    finally:
        srv.stop()
