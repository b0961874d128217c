"""Safe checkpoint loading: a crafted pickle planted in ANY file of a checkpoint folder is
refused before it runs, through the real ``scdm-embed extract`` CLI.

Each case copies a genuine checkpoint folder, replaces one pickled slot (a dictionary, an
offsets file, a torch file) with a payload whose unpickling would ``touch`` a marker file,
runs ``extract`` with default options and checks: exit status 2, the message names the file,
the marker was never created, the store was never created. ``--trust-checkpoint`` is only run
on genuine files (running it on a payload would execute it).
"""

from __future__ import annotations

import os
import pickle
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from scdm_embed.cli import app
from scdm_embed.errors import CheckpointError
from scdm_embed.models._safe_load import read_npy, read_pickle, read_safetensors, torch_load
from scdm_embed.store import EmbeddingStore

from .models._performer_ckpt import scgpt_symbols, write_celllm_checkpoint, write_scbert_checkpoint

runner = CliRunner()
GC30M = ("token_dictionary_gc30M.pkl", "gene_median_dictionary_gc30M.pkl", "gene_name_id_dict_gc30M.pkl",
         "ensembl_mapping_dict_gc30M.pkl")
UCE_HUMAN = "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt"
CELLPLM_CKPT = "20230926_85M_randinit_small.best.ckpt"


class Payload:
    """Unpickling this runs ``touch <marker>`` (what a crafted checkpoint file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _pickle_payload(path: Path, marker: Path) -> None:
    """A dictionary-shaped pickle with the payload as one value."""
    path.unlink(missing_ok=True)
    path.write_bytes(pickle.dumps({"ENSG00000000003": Payload(marker)}, protocol=4))


def _torch_payload(path: Path, marker: Path) -> None:
    """A ``torch.save`` file whose pickle holds the payload next to a real tensor."""
    path.unlink(missing_ok=True)
    torch.save({"model_state_dict": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)


def _copy(src: Path, dst: Path) -> Path:
    """``copytree`` of a (read-only) shared checkpoint folder into a writable copy."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for d in [dst, *(p for p in dst.rglob("*") if p.is_dir())]:
        d.chmod(d.stat().st_mode | stat.S_IWUSR)
    return dst


@pytest.fixture(scope="module")
def cells8(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path) -> Path:
    """8 fixture cells, 4 sensitive + 4 resistant (identical in every fixture folder), as a small .h5ad
    (extraction refuses a single-class dataset, and the fixture's first 32 cells are all sensitive)."""
    a = ad.read_h5ad(fixtures_dir / "geneformer" / "cells.h5ad")[np.r_[0:4, 32:36]].copy()
    path = tmp_path_factory.mktemp("cells") / "cells8.h5ad"
    a.write_h5ad(path)
    return path


def _extract(cells: Path, model: str, ckpt: Path, store: Path, *extra: str):
    return runner.invoke(app, ["extract", str(cells), "--model", model, "--checkpoint", str(ckpt),
                               "--store", str(store), "-q", *extra])


# -- checkpoint builders: (tmp, fixtures, vocab) -> checkpoint folder ---------------------------------
def _geneformer(tmp: Path, fx: Path, vocab: Path) -> Path:
    ckpt = _copy(fx / "geneformer" / "checkpoint", tmp / "geneformer")
    for name in GC30M:
        shutil.copyfile(vocab / "geneformer" / "gc30M" / name, ckpt / name)
    return ckpt


def _to_bin(ckpt: Path) -> Path:
    """The older Hugging Face layout: the same weights in ``pytorch_model.bin``."""
    torch.save(read_safetensors(ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    return ckpt


def _geneformer_bin(tmp: Path, fx: Path, vocab: Path) -> Path:
    return _to_bin(_geneformer(tmp, fx, vocab))


def _tgpt_bin(tmp: Path, fx: Path, vocab: Path) -> Path:
    return _to_bin(_copy(fx / "tgpt" / "checkpoint", tmp / "tgpt"))


def _uce(tmp: Path, fx: Path, vocab: Path) -> Path:
    return _copy(fx / "uce" / "checkpoint", tmp / "uce")


def _scfoundation(tmp: Path, fx: Path, vocab: Path) -> Path:
    ckpt = _copy(fx / "scfoundation" / "checkpoint", tmp / "scfoundation")
    shutil.copyfile(vocab / "scfoundation" / "OS_scRNA_gene_index.19264.tsv", ckpt / "OS_scRNA_gene_index.19264.tsv")
    return ckpt


def _plain(model: str) -> Callable[[Path, Path, Path], Path]:
    return lambda tmp, fx, vocab: _copy(fx / model / "checkpoint", tmp / model)


def _scbert(tmp: Path, fx: Path, vocab: Path) -> Path:
    return write_scbert_checkpoint(tmp / "scbert", scgpt_symbols(vocab, 16906), dim=4, depth=1)


def _celllm(tmp: Path, fx: Path, vocab: Path) -> Path:
    return write_celllm_checkpoint(tmp / "celllm", scgpt_symbols(vocab, 19379), dim=4, depth=1)


#: (model, checkpoint builder, planted file relative to the checkpoint, payload writer)
SLOTS = [
    *(("geneformer", _geneformer, name, _pickle_payload) for name in GC30M),
    ("geneformer", _geneformer_bin, "pytorch_model.bin", _torch_payload),
    ("tgpt", _tgpt_bin, "pytorch_model.bin", _torch_payload),
    ("uce", _uce, "model_files/species_offsets.pkl", _pickle_payload),
    ("uce", _uce, "model_files/1layer_randinit_model.torch", _torch_payload),
    ("uce", _uce, "model_files/all_tokens.torch", _torch_payload),
    ("uce", _uce, f"model_files/protein_embeddings/{UCE_HUMAN}", _torch_payload),
    ("scfoundation", _scfoundation, "models.ckpt", _torch_payload),
    ("scgpt", _plain("scgpt"), "best_model.pt", _torch_payload),
    ("cellplm", _plain("cellplm"), CELLPLM_CKPT, _torch_payload),
    ("scbert", _scbert, "panglao_pretrain.pth", _torch_payload),
    ("celllm", _celllm, "checkpoint4_fixed.pth", _torch_payload),
]


@pytest.mark.parametrize(("model", "build", "slot", "plant"), SLOTS,
                         ids=[f"{m}-{Path(s).name}" for m, _, s, _ in SLOTS])
def test_payload_is_refused_before_it_runs(model: str, build: Callable, slot: str, plant: Callable,
                                           tmp_path: Path, cells8: Path, fixtures_dir: Path,
                                           vocab_dir: Path) -> None:
    ckpt = build(tmp_path, fixtures_dir, vocab_dir)
    marker = tmp_path / "PWNED"
    target = ckpt / slot
    assert target.is_file()  # the slot exists in the genuine layout: the payload replaces it
    plant(target, marker)
    assert b"system" in target.read_bytes()  # the planted file really calls os.system
    store = tmp_path / "s.zarr"

    r = _extract(cells8, model, ckpt, store)

    assert r.exit_code == 2, r.output
    assert target.name in r.output
    hf_bin = slot == "pytorch_model.bin"  # never fully unpickled, so the opt-in is not offered
    assert ("--trust-checkpoint" in r.output) != hf_bin
    assert "Traceback" not in r.output
    assert not marker.exists()
    assert not store.exists()


def test_uce_offsets_not_a_dict(tmp_path: Path, cells8: Path, fixtures_dir: Path, vocab_dir: Path) -> None:
    ckpt = _uce(tmp_path, fixtures_dir, vocab_dir)
    off = ckpt / "model_files" / "species_offsets.pkl"
    off.unlink()
    off.write_bytes(pickle.dumps([0, 1, 2]))
    store = tmp_path / "s.zarr"
    r = _extract(cells8, "uce", ckpt, store)
    assert r.exit_code == 2, r.output
    assert "species_offsets.pkl" in r.output and "Traceback" not in r.output
    assert not store.exists()


def test_object_array_gene2vec_is_refused(tmp_path: Path, cells8: Path, vocab_dir: Path) -> None:
    ckpt = _scbert(tmp_path, Path(), vocab_dir)
    g2v = ckpt / "gene2vec_16906.npy"
    np.save(g2v, np.array([Payload(tmp_path / "PWNED")], dtype=object), allow_pickle=True)
    r = _extract(cells8, "scbert", ckpt, tmp_path / "s.zarr")
    assert r.exit_code == 2, r.output
    assert g2v.name in r.output
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "s.zarr").exists()


# -- the genuine files load through the restricted loaders --------------------------------------------
@pytest.mark.parametrize("generation", ["gc30M", "gc95M"])
def test_official_geneformer_dictionaries_load(vocab_dir: Path, generation: str) -> None:
    files = sorted((vocab_dir / "geneformer" / generation).glob("*.pkl"))
    assert len(files) == 4
    for f in files:
        with open(f, "rb") as fh:  # the authors' file from ../shared: the unrestricted result to match
            expected = pickle.load(fh)
        got = read_pickle(f)
        assert type(got) is dict and got == expected  # same keys and values (ints/floats bit-exact)


def test_official_uce_offsets_load(fixtures_dir: Path) -> None:
    f = fixtures_dir / "uce" / "checkpoint" / "model_files" / "species_offsets.pkl"
    with open(f, "rb") as fh:
        expected = pickle.load(fh)
    assert read_pickle(f) == expected and "human" in expected


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_values_round_trip(tmp_path: Path, protocol: int) -> None:
    obj = {"scalar": np.float32(1.5), "int": np.int64(7), "array": np.arange(6, dtype=np.int32).reshape(2, 3),
           "strings": np.array(["a", None], dtype=object), "dtype": np.dtype("f8"), "set": {1, 2},
           "tuple": (1, 2.5, 3j, b"x", None, True)}
    f = tmp_path / "ok.pkl"
    f.write_bytes(pickle.dumps(obj, protocol=protocol))
    got = read_pickle(f)
    assert got["scalar"] == obj["scalar"] and got["scalar"].dtype == np.float32
    assert got["int"] == 7 and got["dtype"] == np.dtype("f8")
    np.testing.assert_array_equal(got["array"], obj["array"])  # integers: exact
    assert got["strings"].tolist() == ["a", None]
    assert got["set"] == {1, 2} and got["tuple"] == obj["tuple"]


def test_loaders_refuse_and_name_the_global(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    pkl, pt = tmp_path / "d.pkl", tmp_path / "w.pt"
    _pickle_payload(pkl, marker)
    _torch_payload(pt, marker)
    for load, path in ((read_pickle, pkl), (torch_load, pt)):
        with pytest.raises(CheckpointError) as err:
            load(path)
        assert path.name in err.value.problem and "system" in err.value.problem
        assert "--trust-checkpoint" in (err.value.fix or "")
    legacy = tmp_path / "legacy.pt"
    torch.save({"x": Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy.pt"):
        torch_load(legacy, mmap=True)
    assert not marker.exists()


def test_damaged_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        torch_load(bad)
    with pytest.raises(CheckpointError, match="not a readable pickle"):
        read_pickle(bad)
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.npy"):
        read_npy(empty)


def test_genuine_pytorch_model_bin_loads(tmp_path: Path, cells8: Path, fixtures_dir: Path, vocab_dir: Path) -> None:
    ckpt = _tgpt_bin(tmp_path, fixtures_dir, vocab_dir)
    store = tmp_path / "s.zarr"
    r = _extract(cells8, "tgpt", ckpt, store)
    assert r.exit_code == 0, r.output
    g = EmbeddingStore(store, mode="r").embedding_group("tgpt", "cells8")
    assert g.attrs["complete"] and np.isfinite(np.asarray(g["X"][:])).all()


# -- the opt-in ---------------------------------------------------------------------------------------
def test_trust_checkpoint_on_genuine_files_is_recorded(tmp_path: Path, cells8: Path, fixtures_dir: Path,
                                                       vocab_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = _geneformer(tmp_path, fixtures_dir, vocab_dir)
    safe, trusted = tmp_path / "safe.zarr", tmp_path / "trusted.zarr"
    r = _extract(cells8, "geneformer", ckpt, safe)
    assert r.exit_code == 0, r.output
    with caplog.at_level("WARNING"):
        r = _extract(cells8, "geneformer", ckpt, trusted, "--trust-checkpoint")
    assert r.exit_code == 0, r.output
    assert any("trust-checkpoint" in rec.getMessage() for rec in caplog.records)
    attrs = {p: dict(EmbeddingStore(p, mode="r").embedding_group("geneformer", "cells8").attrs) for p in (safe, trusted)}
    assert attrs[safe]["trust_checkpoint"] is False
    assert attrs[trusted]["trust_checkpoint"] is True
    a = EmbeddingStore(safe, mode="r").embedding_group("geneformer", "cells8")
    b = EmbeddingStore(trusted, mode="r").embedding_group("geneformer", "cells8")
    # same files, same process, same CPU kernels: the two loaders must give identical embeddings
    np.testing.assert_array_equal(np.asarray(a["X"][:]), np.asarray(b["X"][:]))
