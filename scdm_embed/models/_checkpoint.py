"""The one strict checkpoint loader, shared by every adapter that loads a state dict by hand."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import CheckpointError


def preview(keys: Sequence[str], n: int = 8) -> str:
    """The first ``n`` keys as a list, followed by `` ...`` when there are more."""
    return f"{list(keys[:n])}{' ...' if len(keys) > n else ''}"


def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
    return key.startswith(ignore)


def check_strict(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *, what: str, fix: str,
                 ignore: Iterable[str] = (), extra_missing: Sequence[str] = (),
                 extra_unexpected: Sequence[str] = (), extra_shapes: Sequence[str] = ()) -> None:
    """Raise :class:`CheckpointError` unless ``state`` fits ``expected`` exactly.

    Keys starting with one of the ``ignore`` prefixes are left out on both sides (recognised
    and intentionally not loaded). The message reads ``"<what>: missing N key(s) [...];
    N unexpected key(s) [...]; shape mismatch (checkpoint vs model): [...]"`` (only the parts
    that apply); ``extra_*`` add findings the caller made itself (e.g. a task head's layout).
    """
    skip = tuple(ignore)
    want = {k: v for k, v in expected.items() if not _ignored(k, skip)}
    have = {k: v for k, v in state.items() if not _ignored(k, skip)}
    missing = sorted(set(want) - set(have)) + sorted(extra_missing)
    unexpected = sorted(set(have) - set(want)) + sorted(extra_unexpected)
    wrong = [f"{k}: {tuple(have[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
             if k in have and tuple(have[k].shape) != tuple(v.shape)] + list(extra_shapes)
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s) {preview(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) {preview(unexpected)}")
    if wrong:
        parts.append(f"shape mismatch (checkpoint vs model): {preview(wrong, 5)}")
    if parts:
        raise CheckpointError(f"{what}: " + "; ".join(parts), fix)


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, what: str, fix: str,
                ignore: Iterable[str] = (), checkpoint_key: Callable[[str], str] | None = None,
                extra_missing: Sequence[str] = (), extra_unexpected: Sequence[str] = (),
                extra_shapes: Sequence[str] = ()) -> None:
    """Load ``state`` into ``module`` strictly: every module key present with its shape, every
    checkpoint key used, except keys under an ``ignore`` prefix (on either side).

    ``checkpoint_key`` maps a module parameter name to the checkpoint's name for it where the two
    differ (keys are then checked and reported in the checkpoint's names). Any mismatch is one
    :class:`CheckpointError` naming ``what`` (say which file), a preview of the missing /
    unexpected / mis-shaped keys, and ``fix``. Nothing is loaded on error.
    """
    skip = tuple(ignore)
    own = module.state_dict()
    names = {k: (checkpoint_key(k) if checkpoint_key is not None else k) for k in own}
    check_strict({names[k]: v for k, v in own.items()}, state, what=what, fix=fix, ignore=skip,
                 extra_missing=extra_missing, extra_unexpected=extra_unexpected, extra_shapes=extra_shapes)
    used = {k: state[c] for k, c in names.items() if not _ignored(c, skip)}
    result = module.load_state_dict(used, strict=not skip)
    left = [k for k in result.missing_keys if not _ignored(k, skip)] + list(result.unexpected_keys)
    if left:  # cannot happen after check_strict; kept as a guard against torch changing its rules
        raise CheckpointError(f"{what}: keys left unloaded {preview(left)}", fix)


__all__ = ["check_strict", "load_strict", "preview"]
