"""Small helpers for strict checkpoint loading, shared by the hand-written adapters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .._errors import CheckpointError


def preview(keys: Sequence[str], n: int = 8) -> str:
    """The first ``n`` keys as a list, followed by `` ...`` when there are more."""
    return f"{list(keys[:n])}{' ...' if len(keys) > n else ''}"


def require_keys(missing: Sequence[str], unknown: Sequence[str], *, what: str, fix: str,
                 unknown_word: str = "unexpected") -> None:
    """Raise :class:`CheckpointError` ``"<what>: missing [...], <unknown_word> [...]"`` when
    either list is non-empty."""
    if missing or unknown:
        raise CheckpointError(f"{what}: missing {preview(missing)}, {unknown_word} {preview(unknown)}", fix)


def shape_mismatches(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """``"key: (checkpoint shape) vs (model shape)"`` for every expected key whose tensor differs."""
    return [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
            if k in state and tuple(state[k].shape) != tuple(v.shape)]


__all__ = ["preview", "require_keys", "shape_mismatches"]
