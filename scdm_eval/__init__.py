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
    from ._finetune import run_lora
    from ._metrics import METRICS, compute_metrics
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
    )

_WHERE = {
    "Bundle": "_bundle", "fit_classifier": "_bundle", "load_bundle": "_bundle", "predict": "_bundle",
    "CLASSIFIERS": "_classifiers", "Classifier": "_classifiers", "make_classifier": "_classifiers",
    "run_lora": "_finetune",
    "METRICS": "_metrics", "compute_metrics": "_metrics",
    "plot_summary": "_report", "summarize": "_report", "to_markdown": "_report", "write_report": "_report",
    "RESULT_COLUMNS": "_run", "run_evaluation": "_run",
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
    "summarize",
    "to_markdown",
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
