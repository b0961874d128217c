"""scdm-eval: fast classifiers on cached single-cell foundation-model embeddings, under honest splits.

>>> import scdm_eval
>>> res = scdm_eval.run_evaluation("store/scdm.zarr", group_key="sample", out="results")  # doctest: +SKIP
>>> scdm_eval.summarize(res)  # doctest: +SKIP

Names are imported on first use, so that grid workers (which import this package to
unpickle their task) stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._bundle import Bundle, fit_classifier, load_bundle, predict
    from ._classifiers import CLASSIFIERS, Classifier, make_classifier
    from ._correct import batch_entropy, correct_embeddings
    from ._finetune import run_lora
    from ._html import write_html_report
    from ._lora_bundle import LoraBundle, load_lora_bundle, predict_lora
    from ._metrics import METRICS, compute_metrics
    from ._prompt import plan_prompting, run_prompting
    from ._report import plot_summary, summarize, to_markdown, write_report
    from ._run import RESULT_COLUMNS, run_evaluation
    from ._splits import (
        BY_CHOICES,
        SCHEMES,
        LeakageWarning,
        Partition,
        Splits,
        SplitWarning,
        list_splits,
        load_splits,
        make_splits,
        transfer_splits,
    )
    from ._stats import compare_results, paired_tests, permutation_pvalues

_WHERE = {
    "Bundle": "_bundle", "fit_classifier": "_bundle", "load_bundle": "_bundle", "predict": "_bundle",
    "CLASSIFIERS": "_classifiers", "Classifier": "_classifiers", "make_classifier": "_classifiers",
    "run_lora": "_finetune",
    "LoraBundle": "_lora_bundle", "load_lora_bundle": "_lora_bundle", "predict_lora": "_lora_bundle",
    "plan_prompting": "_prompt", "run_prompting": "_prompt",
    "METRICS": "_metrics", "compute_metrics": "_metrics",
    "plot_summary": "_report", "summarize": "_report", "to_markdown": "_report", "write_report": "_report",
    "write_html_report": "_html",
    "RESULT_COLUMNS": "_run", "run_evaluation": "_run",
    "paired_tests": "_stats", "permutation_pvalues": "_stats", "compare_results": "_stats",
    "correct_embeddings": "_correct", "batch_entropy": "_correct", "transfer_splits": "_splits",
    "BY_CHOICES": "_splits", "SCHEMES": "_splits", "LeakageWarning": "_splits", "Partition": "_splits",
    "Splits": "_splits", "SplitWarning": "_splits", "list_splits": "_splits", "load_splits": "_splits",
    "make_splits": "_splits",
}
__all__ = [
    "Bundle",
    "fit_classifier",
    "load_bundle",
    "predict",
    "BY_CHOICES",
    "CLASSIFIERS",
    "METRICS",
    "RESULT_COLUMNS",
    "SCHEMES",
    "Classifier",
    "LeakageWarning",
    "Partition",
    "SplitWarning",
    "Splits",
    "compute_metrics",
    "list_splits",
    "load_splits",
    "make_classifier",
    "make_splits",
    "plot_summary",
    "run_evaluation",
    "run_lora",
    "LoraBundle",
    "load_lora_bundle",
    "predict_lora",
    "plan_prompting",
    "run_prompting",
    "paired_tests",
    "permutation_pvalues",
    "compare_results",
    "correct_embeddings",
    "batch_entropy",
    "transfer_splits",
    "summarize",
    "to_markdown",
    "write_html_report",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
