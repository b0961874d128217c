"""scdm-web: browse a store's benchmark results and predict new samples in a browser.

>>> from scdm_web import Settings, create_app
>>> app = create_app(Settings(store="store/demo.zarr", results="results/demo", work="web"))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
