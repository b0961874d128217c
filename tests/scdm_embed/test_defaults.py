"""Defaults declared once: where shared/ and the cache are, the fixture-model table, CLI defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from scdm_embed import datasets, locations


def test_shared_dir_honours_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCDM_SHARED", str(tmp_path / "elsewhere"))
    assert locations.shared_dir() == (tmp_path / "elsewhere").resolve()  # named even when missing
    assert locations.shared_dirs()[0] == tmp_path / "elsewhere"
    assert datasets._mirrors()[0] == tmp_path / "elsewhere" / "data"


def test_shared_dir_default_is_beside_the_checkout(monkeypatch: pytest.MonkeyPatch, shared_dir: Path) -> None:
    monkeypatch.delenv("SCDM_SHARED", raising=False)
    assert locations.shared_dir() == shared_dir


def test_cache_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCDM_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert locations.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SCDM_CACHE_DIR")
    assert locations.cache_dir() == tmp_path / "x" / "scdm"
    monkeypatch.delenv("SCDM_DATA_DIR", raising=False)
    assert datasets.cache_dir() == tmp_path / "x" / "scdm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert locations.cache_dir() == Path.home() / ".cache" / "scdm"


def test_fixture_table_points_at_real_files(fixture_models) -> None:
    from scdm_embed.models import available_models
    from scdm_embed.testing import FIXTURE_MODELS

    assert tuple(fixture_models) == FIXTURE_MODELS
    assert set(FIXTURE_MODELS) <= set(available_models())
    for ckpt, opts in fixture_models.values():
        assert ckpt.is_dir()
        assert all(Path(v).is_file() for v in opts.values())


@pytest.mark.parametrize(("rate", "shown"), [(2121.4, "2121 cells/s"), (123.4, "123 cells/s"), (12.34, "12.3 cells/s"),
                                             (1.0, "1 cells/s"), (0.4, "2.5 s/cell"), (0.0312, "32.1 s/cell"),
                                             (0.0, "- cells/s")])
def test_rates_below_one_cell_per_second_stay_readable(rate: float, shown: str) -> None:
    from scdm_embed.cli import format_rate

    assert format_rate(rate) == shown


def test_cli_defaults_are_the_library_defaults() -> None:
    from typer.testing import CliRunner

    from scdm_embed.cli import app
    from scdm_embed.genes import DEFAULT_MIN_OVERLAP
    from scdm_embed.store import DEFAULT_STORE

    out = CliRunner().invoke(app, ["extract", "--help"], env={"COLUMNS": "300"}).output
    assert str(DEFAULT_STORE) in out and str(DEFAULT_MIN_OVERLAP) in out
