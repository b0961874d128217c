"""LoRA on an adapter's model (the paper's r 8, alpha 8, dropout 0.05), via peft.

Each adapter names the modules LoRA wraps by default (``Adapter.lora_targets``: the target
modules of the scDrugMap paper: tGPT ``c_attn``; scBERT / CellLM ``to_q/to_k/to_v``; Geneformer
``query/key/value``; scGPT / UCE ``out_proj``; CellPLM ``query/key/value_projection``;
scFoundation its attention and feed-forward layers), all real module calls on the forward
path (the attention of scGPT / UCE is written out, so ``out_proj`` is called as a module and
gets a gradient, which stock ``nn.MultiheadAttention`` would not give it). Hugging Face models
without explicit targets fall back to peft's per-architecture defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ScdmError
from .base import Adapter

#: scDrugMap's LoRA settings
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 8, 0.05


def lora_targets(adapter: Adapter) -> tuple[str, ...]:
    """Module-name suffixes LoRA wraps for ``adapter``."""
    targets = tuple(getattr(adapter, "lora_targets", ()) or ())
    if targets:
        return targets
    model = adapter.torch_module()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is not None:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        if model_type in defaults:
            return tuple(defaults[model_type])
    raise ScdmError(f"model {adapter.name!r} declares no LoRA target modules", "set lora_targets on its adapter class")


def apply_lora(
    adapter: Adapter,
    *,
    r: int = LORA_R,
    alpha: int = LORA_ALPHA,
    dropout: float = LORA_DROPOUT,
    targets: Sequence[str] | None = None,
) -> torch.nn.Module:
    """Inject LoRA layers into ``adapter``'s loaded model in place; only LoRA weights train.

    Returns the model. Raises when a target matches no module (a renamed layer would
    otherwise be silently left without an adapter).
    """
    from peft import LoraConfig, inject_adapter_in_model

    model = adapter.torch_module()
    if model is None:
        raise ScdmError(f"model {adapter.name!r} has no neural network to fine-tune", "LoRA applies to transformer models only")
    targets = tuple(targets or lora_targets(adapter))
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ScdmError(f"LoRA targets {missing} match no module of {adapter.name!r}",
                        f"name modules of the model by their name suffix (default for {adapter.name}: "
                        f"{' '.join(lora_targets(adapter))})")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    try:
        model = inject_adapter_in_model(cfg, model)
    except ValueError as err:  # peft: a target that is not a layer type it can wrap (e.g. a whole block)
        raise ScdmError(f"LoRA cannot wrap the targets {list(targets)} of {adapter.name!r}: {err}",
                        "name linear layers (e.g. attention projections), not whole blocks") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    adapter.model = model
    return model


def lora_modules(model: torch.nn.Module) -> dict[str, Any]:
    """``{module name: LoRA layer}`` for every wrapped module."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
