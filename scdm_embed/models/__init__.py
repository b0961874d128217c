"""Model registry: ``--model NAME`` -> adapter class (imported lazily)."""

from __future__ import annotations

import importlib
import importlib.util

from ..errors import ScdmError
from .base import Adapter, CellChunk, GeneOverlap, GenePlan
from .options import Option

#: name -> "module:Class" (relative to this package)
_REGISTRY: dict[str, str] = {
    "pca": "_reference:PCAAdapter",
    "hvg": "_reference:HVGAdapter",
    "geneformer": "geneformer:GeneformerAdapter",
    "tgpt": "tgpt:TGPTAdapter",
    "lm": "lm:LanguageModelAdapter",
    "scgpt": "scgpt:ScGPTAdapter",
    "scfoundation": "scfoundation:ScFoundationAdapter",
    "uce": "uce:UCEAdapter",
    "cellplm": "cellplm:CellPLMAdapter",
    "scbert": "scbert:ScBERTAdapter",
    "celllm": "celllm:CellLMAdapter",
}


def available_models() -> list[str]:
    """Registered model names whose adapter module is installed."""
    found = [n for n in _REGISTRY if importlib.util.find_spec(f"{__name__}.{_REGISTRY[n].split(':')[0]}") is not None]
    return found + [n for n in _EXTRA if n not in found]


_EXTRA: dict[str, str | type[Adapter]] = {}


def register_adapter(name: str, adapter: str | type[Adapter]) -> None:
    """Register a third-party adapter: a class, or ``"package.module:Class"`` imported lazily."""
    _EXTRA[name] = adapter


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class registered as ``name``."""
    if name in _EXTRA:
        a = _EXTRA[name]
        if isinstance(a, str):
            mod, cls = a.split(":")
            return getattr(importlib.import_module(mod), cls)
        return a
    if name not in _REGISTRY:
        raise ScdmError(f"unknown model {name!r}", f"pick one of: {', '.join(available_models())} (scdm-embed list-models)")
    mod, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), cls)


__all__ = ["Adapter", "CellChunk", "GeneOverlap", "GenePlan", "Option", "available_models", "get_adapter", "register_adapter"]
