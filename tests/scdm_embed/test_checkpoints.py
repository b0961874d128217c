"""`scdm-embed checkpoints`: the catalogue names exactly the files each adapter reads.

For every model with weights, the catalogue's files are located in a working official-layout
checkpoint (the reference fixtures, assembled as in conftest); a folder holding only those
files loads, and removing any required one makes the adapter refuse it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from scdm_embed._download import CheckpointFile, catalogue
from scdm_embed.cli import app
from scdm_embed.errors import ScdmError
from scdm_embed.models import available_models, get_adapter
from scdm_embed.models.lm import minilm_checkpoint
from tests._cli import assert_refused

runner = CliRunner()
WITH_FILES = [m for m in available_models() if catalogue().get(m) is not None and catalogue()[m].files]


def test_every_registered_model_has_an_entry_and_the_cli_lists_them():
    assert set(catalogue()) == set(available_models())
    r = runner.invoke(app, ["checkpoints", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [e["model"] for e in data] == list(catalogue())
    for e in data:
        assert e["licence"] and e["source"]["kind"] in ("none", "huggingface", "manual")
        if e["source"]["kind"] == "huggingface":
            assert "/" in e["source"]["repo_id"]
        for f in e["files"]:
            assert f["sha256"] is None or len(f["sha256"]) == 64
    r = runner.invoke(app, ["checkpoints"])
    assert r.exit_code == 0 and all(m in r.output for m in catalogue())
    r = runner.invoke(app, ["checkpoints", "--model", "uce"])
    assert r.exit_code == 0 and "all_tokens.torch" in r.output
    assert_refused(runner.invoke(app, ["checkpoints", "--model", "nope"]), "nope")


def _locate(src: Path, files: tuple[CheckpointFile, ...]) -> dict[str, str]:
    """catalogue path -> the name that file has in ``src``: its own, an alternative, or (for a
    renamed fixture: CellPLM's prefix, UCE's model file) the one unclaimed file of the same kind."""
    found: dict[str, str] = {}
    for f in files:
        parent = str(Path(f.path).parent)
        for n in (f.path, *(a if parent == "." else f"{parent}/{a}" for a in f.alternatives)):
            if (src / n).is_file():
                found[f.path] = n
                break
    for f in files:
        if f.path in found:
            continue
        kind = "." + Path(f.path).name.split(".", 1)[1]
        folder = (src / f.path).parent
        cands = [str(p.relative_to(src)) for p in folder.glob(f"*{kind}") if p.is_file()]
        cands = [c for c in cands if c not in found.values()]
        if len(cands) == 1:
            found[f.path] = cands[0]
    return found


def _source(model: str, model_checkpoints: dict[str, str | None]) -> Path:
    return minilm_checkpoint() if model == "lm" else Path(model_checkpoints[model])


def _loads(folder: Path, model: str) -> None:
    a = get_adapter(model)(folder)
    a.load(device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize("model", WITH_FILES)
def test_catalogue_files_are_what_the_loader_reads(model, model_checkpoints, tmp_path):
    entry = catalogue()[model]
    src = _source(model, model_checkpoints)
    found = _locate(src, entry.files)
    required = [f for f in entry.files if f.required]
    assert all(f.path in found for f in required), [f.path for f in required if f.path not in found]
    if model != "lm":  # the fixture folders hold nothing the catalogue does not name
        every = {str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()}
        assert every <= set(found.values()), every - set(found.values())
    dst = tmp_path / model
    for rel in found.values():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, dst / rel)
    _loads(dst, model)  # the catalogue's files suffice
    for f in required:  # and each required one is needed
        trial = tmp_path / f"{model}-without"
        shutil.rmtree(trial, ignore_errors=True)
        shutil.copytree(dst, trial)
        alts = {found[f.path], f.path, *(str(Path(f.path).parent / a) for a in f.alternatives)}
        for rel in alts:
            (trial / rel).unlink(missing_ok=True)
        with pytest.raises(ScdmError):
            _loads(trial, model)
