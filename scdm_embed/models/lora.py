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


# -- gradient checkpointing --------------------------------------------------------------------
def checkpoint_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated encoder blocks of ``model``: the items of every ``nn.ModuleList`` of one block
    type (nested lists, as the Performer's ``[attention, feed-forward]`` pairs, are entered), outermost
    first; a block inside another is not listed again."""
    blocks: list[torch.nn.Module] = []

    def visit(m: torch.nn.Module, inside: bool) -> None:
        for child in m.children():
            if isinstance(child, torch.nn.ModuleList) and len(child):
                items = list(child)
                if all(isinstance(i, torch.nn.ModuleList) for i in items):
                    for inner in items:  # e.g. Performer: layers[i] = [PreNorm(attn), PreNorm(ff)]
                        for block in inner:
                            if not inside and any(True for _ in block.parameters()):
                                blocks.append(block)
                            visit(block, True)
                    continue
                same = len({type(i) for i in items}) == 1 and any(True for _ in items[0].parameters())
                for block in items:
                    if same and not inside:
                        blocks.append(block)
                    visit(block, inside or same)
                continue
            visit(child, inside)

    visit(model, False)
    return blocks


def _is_hf(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "supports_gradient_checkpointing", False)) and hasattr(
        model, "gradient_checkpointing_enable")


def supports_gradient_checkpointing(model: torch.nn.Module) -> bool:
    """Whether :func:`enable_gradient_checkpointing` can checkpoint ``model``."""
    return _is_hf(model) or bool(checkpoint_blocks(model))


def enable_gradient_checkpointing(model: torch.nn.Module, *, name: str = "the model") -> str:
    """Recompute activations in the backward pass instead of keeping them (less memory, ~1/3 more compute).

    A Hugging Face model uses its own ``gradient_checkpointing_enable`` (non-reentrant); its
    checkpointed layers are flagged as training (they checkpoint only then) while every other
    module keeps its mode (so base dropout stays off). Other networks get
    ``torch.utils.checkpoint`` (non-reentrant, RNG state kept: LoRA dropout masks replay exactly)
    around each encoder block (:func:`checkpoint_blocks`). Returns ``"hf"`` or ``"blocks"``;
    raises :class:`ScdmError` where neither applies.
    """
    import warnings

    if _is_hf(model):
        kwargs = {"use_reentrant": False}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
                  and m is not model]
        for m in layers:
            m.training = True  # HF checkpoints a layer only in training mode; its children keep theirs
        if layers:
            return "hf"
    blocks = checkpoint_blocks(model)
    if not blocks:
        raise ScdmError(f"gradient checkpointing is not supported for {name}: its network has no repeated "
                        "encoder blocks to checkpoint", "drop --gradient-checkpointing (lower --token-budget "
                        "or --batch-size to save memory instead)")
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        inner = block.forward

        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return "blocks"


# -- saving and loading adapters ---------------------------------------------------------------
#: the PEFT adapter files (``PeftModel.save_pretrained`` names them so)
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def save_adapter(model: torch.nn.Module, folder: Any) -> list[str]:
    """Write ``model``'s LoRA adapter as PEFT does: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    from pathlib import Path

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(folder))
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(folder / ADAPTER_WEIGHTS))
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def load_adapter(adapter: Adapter, folder: Any) -> torch.nn.Module:
    """Inject the saved LoRA adapter of ``folder`` into ``adapter``'s loaded model (in place; eval mode)."""
    from pathlib import Path

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = LoraConfig.from_pretrained(str(folder))
    model = adapter.torch_module()
    if model is None:
        raise ScdmError(f"model {adapter.name!r} has no neural network for a LoRA adapter", "load a transformer model")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*", category=UserWarning)
        model = inject_adapter_in_model(cfg, model)
    state = load_file(str(folder / ADAPTER_WEIGHTS), device=str(next(model.parameters()).device))
    res = set_peft_model_state_dict(model, state)
    missing = [k for k in res.missing_keys if "lora_" in k]
    if missing or res.unexpected_keys:
        raise ScdmError(f"the saved LoRA adapter does not fit {adapter.name!r} (missing {missing[:3]}, unexpected "
                        f"{list(res.unexpected_keys)[:3]})", "use the base checkpoint and options it was trained on")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    adapter.model = model
    return model
