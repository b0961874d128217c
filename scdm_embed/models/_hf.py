"""Hugging Face helpers shared by the transformers-based adapters (tGPT, language models,
Geneformer): offline, quiet, strict loading of local checkpoint folders.

Weights are read with ``weights_only=True`` (a ``pytorch_model*.bin`` is scanned first), and every
missing, unexpected or shape-mismatched tensor is reported by name (:func:`check_loading_info`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ._safe_load import check_torch_file


def hf_offline() -> None:
    """Keep the Hugging Face libraries off the network (checkpoints are local folders)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for the duration (restored after)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def read_hf_config(config_cls: Any, checkpoint: Path, *, fix: str) -> Any:
    """``config_cls.from_pretrained`` on the local folder; any failure -> :class:`CheckpointError`."""
    try:
        return config_cls.from_pretrained(str(checkpoint), local_files_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {checkpoint}/config.json: {err}", fix) from err


def load_hf_weights(model_cls: Any, checkpoint: Path, *, what: str, fix: str, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``model_cls.from_pretrained`` on the local folder, quietly, with its loading info
    (check it with :func:`check_loading_info`); any failure -> :class:`CheckpointError`.

    ``model.safetensors`` is preferred (as transformers does); a ``pytorch_model*.bin`` is never
    fully unpickled: it is scanned for globals ``weights_only`` refuses first, then loaded with
    ``weights_only=True`` (forced, whatever ``kwargs`` say)."""
    folder = Path(checkpoint)
    if folder.is_dir() and not any(folder.glob("model*.safetensors*")):
        for bin_file in sorted(folder.glob("pytorch_model*.bin")):
            check_torch_file(bin_file, fix="re-download it from the official source (prefer its "
                             "model.safetensors, which cannot hold code)")
    kwargs["weights_only"] = True
    # shape mismatches come back in the loading info, where check_loading_info names each tensor
    # with both shapes; without this transformers raises "look at the above report", a report
    # that quiet_hf keeps from being printed
    kwargs.setdefault("ignore_mismatched_sizes", True)
    try:
        with quiet_hf():
            return model_cls.from_pretrained(str(checkpoint), output_loading_info=True, local_files_only=True,
                                             **kwargs)
    except Exception as err:  # noqa: BLE001 - unreadable or shape-mismatched weights
        raise CheckpointError(f"cannot load {what} in {str(checkpoint)!r}: {err}", fix) from err


def check_loading_info(
    info: dict[str, Any],
    checkpoint: Path,
    *,
    allow_unexpected: Any = None,
    fix: str,
) -> list[str]:
    """Raise :class:`CheckpointError` on missing / mismatched / unexpected weights.

    ``allow_unexpected(key) -> bool`` may accept unexpected keys (e.g. an unused LM head);
    the accepted ones are returned, sorted.
    """
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(_mismatch(k) for k in info.get("mismatched_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    allowed = [k for k in unexpected if allow_unexpected is not None and allow_unexpected(k)]
    rejected = [k for k in unexpected if k not in allowed]
    errors = list(info.get("error_msgs") or [])
    problems = []
    for what, keys in (("missing", missing), ("shape-mismatched", mismatched), ("unexpected", rejected),
                       ("load errors", errors)):
        if keys:
            shown = ", ".join(map(str, keys[:5])) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {what}: {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} does not match its config ("
                              + "; ".join(problems) + ")", fix)
    return allowed


def _mismatch(entry: Any) -> str:
    """A ``(key, checkpoint shape, config shape)`` entry of transformers' loading info, readable."""
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        key, ckpt, model = entry
        return f"{key} (checkpoint {tuple(ckpt)} vs config {tuple(model)})"
    return str(entry)


__all__ = ["check_loading_info", "hf_offline", "load_hf_weights", "quiet_hf", "read_hf_config"]
