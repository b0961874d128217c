"""``scdm-web``: placeholder until the web app lands."""

from __future__ import annotations


def main() -> None:  # pragma: no cover - replaced by the web app
    raise SystemExit("scdm-web is not built yet")
