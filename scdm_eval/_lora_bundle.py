"""Saved LoRA fits: the adapter (PEFT layout) + the head + a manifest, and prediction with them.

``scdm-eval lora --out OUT`` saves every fit it makes under::

    OUT/lora/<model>/<classifier>/<category>/fold-<K>/   one per partition (``lora-r8``: rank 8)
    OUT/lora/<model>/<classifier>/<category>/final/      with --final: all cells of the category

Each fit folder is a LoRA bundle::

    bundle.json                 format, base checkpoint (path + hash_path sha256), model options and
                                settings, gene plan identity per dataset, LoRA r / alpha / dropout /
                                targets, head kind and layers, training settings, seed, partition,
                                metrics and telemetry, and the sha256 of every other file
    adapter_config.json         the LoRA adapter as peft ``save_pretrained`` writes it
    adapter_model.safetensors
    head.safetensors            the head's state dict
    test_proba.safetensors      fold fits: P(sensitive) of the partition's test cells (resume)

A folder is written to a temporary name and renamed when complete, so a folder with
``bundle.json`` is a finished fit: a resumed run loads it instead of training again.

``scdm-eval predict --bundle FOLDER --input cells.h5ad`` (:func:`predict_lora`), or
``--store S --dataset D`` (the raw input the store records for D, hash-checked; the store's cell
ids and labels), loads the base checkpoint (``--checkpoint``, default the recorded one; refused
when its hash differs; ``--trust-checkpoint`` as for ``scdm-eval lora``), injects the adapter,
embeds the cells through the :class:`~scdm_embed.runner.Runner` and applies the head.
Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from scdm_embed.errors import CheckpointError, InputError, ScdmError
from scdm_embed.models.base import GenePlan
from scdm_embed.store import EmbeddingStore, Provenance

FORMAT = "scdm-lora-bundle"
FORMAT_VERSION = 1
#: files a LoRA bundle may hold
FILES: tuple[str, ...] = ("bundle.json", "adapter_config.json", "adapter_model.safetensors", "head.safetensors",
                          "test_proba.safetensors")


def plan_identity(plan: GenePlan) -> dict[str, Any]:
    """What identifies a gene plan: the genes used, their vocabulary ids, the overlap counts."""
    h = hashlib.sha256()
    for arr in (plan.columns, plan.vocab_ids):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    return {"sha256": h.hexdigest(), "n_genes_used": int(len(plan.columns)), "overlap": plan.overlap.to_dict()}


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", str(part)).strip("._") or "_"


def fit_dir(out: str | Path, model: str, classifier: str, category: str, fold: int | None) -> Path:
    """``OUT/lora/<model>/<classifier>/<category>/fold-<K>`` (``fold=None``: ``.../final``)."""
    leaf = "final" if fold is None else f"fold-{int(fold)}"
    return Path(out) / "lora" / _safe(model) / _safe(classifier) / _safe(category) / leaf


def is_lora_bundle(path: str | Path) -> bool:
    """Whether ``path`` holds a LoRA bundle's ``bundle.json``."""
    meta = Path(path) / "bundle.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def save_lora_bundle(folder: str | Path, *, net: torch.nn.Module, head: torch.nn.Module, meta: Mapping[str, Any],
                     proba: np.ndarray | None = None, test: np.ndarray | None = None) -> Path:
    """Write one fit as a LoRA bundle in ``folder`` (atomically: a temporary folder renamed when complete)."""
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file

    from scdm_embed import __version__
    from scdm_embed.models.lora import save_adapter

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        save_adapter(net, tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp / "head.safetensors"))
        if proba is not None:
            save_np({"proba": np.asarray(proba, np.float64), "test": np.asarray(test, np.int64)},
                    str(tmp / "test_proba.safetensors"))
        from ._bundle import seal_bundle

        seal_bundle(tmp, {"format": FORMAT, "format_version": FORMAT_VERSION, "scdm_version": __version__, **meta},
                    folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def clear_partial(parent: Path) -> None:
    """Remove temporary fit folders a killed run left in ``parent`` (never a finished fit)."""
    if parent.is_dir():
        for p in parent.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class LoraBundle:
    """A saved LoRA fit: manifest + folder (weights are read when predicting)."""

    path: Path
    meta: dict[str, Any]

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def classifier(self) -> str:
        return self.meta["classifier"]

    def test_proba(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(test positions in the split table, P(sensitive)) of a fold fit, else ``None``."""
        f = self.path / "test_proba.safetensors"
        if not f.is_file():
            return None
        from safetensors.numpy import load_file

        d = load_file(str(f))
        return d["test"], d["proba"]

    def head(self, device: torch.device) -> torch.nn.Module:
        """The trained head (eval mode)."""
        from safetensors.torch import load_file

        from ._finetune import make_head

        h = make_head(int(self.meta["dim"]), self.meta["head"]["kind"])
        h.load_state_dict(load_file(str(self.path / "head.safetensors")), strict=True)
        return h.to(device).eval()


def load_lora_bundle(path: str | Path) -> LoraBundle:
    """Read a LoRA bundle (checked: format, file list, sha256 of every file)."""
    from ._bundle import read_manifest

    path = Path(path)
    meta = read_manifest(path, fmt=FORMAT, version=FORMAT_VERSION, allowed=FILES, what="LoRA bundle",
                         hint="pass a fit folder written by `scdm-eval lora --out OUT` "
                              "(OUT/lora/<model>/<classifier>/<category>/fold-K)",
                         recreate="re-run `scdm-eval lora --overwrite` to re-create it")
    return LoraBundle(path, meta)


def _base_checkpoint(b: LoraBundle, checkpoint: str | Path | None) -> Path:
    from scdm_embed.models.base import hash_path

    ckpt = Path(checkpoint) if checkpoint is not None else Path(b.meta["checkpoint"])
    if not ckpt.exists():
        raise ScdmError(f"the base checkpoint {str(ckpt)!r} does not exist",
                        "pass --checkpoint DIR with the base checkpoint the adapter was trained on")
    got, want = hash_path(ckpt), b.meta["checkpoint_hash"]
    if got != want:
        raise CheckpointError(f"the base checkpoint {str(ckpt)!r} is not the one the LoRA adapter was trained on "
                              f"(hash {got[:19]} != {want[:19]})",
                              "pass --checkpoint with the base checkpoint the bundle records (bundle.json "
                              "'checkpoint'), unchanged")
    return ckpt


def _store_input(b: LoraBundle, store: str | Path | EmbeddingStore, dataset: str | None,
                 input: str | Path | None) -> tuple[EmbeddingStore, str, Path, Provenance]:
    """The store, the dataset, its raw input (``input``, else the recorded one) and how extraction read it."""
    from ._bundle import check_dataset
    from ._finetune import _inputs
    from ._splits import open_store

    st = open_store(store)
    if dataset is None:
        raise ScdmError(f"--store needs --dataset: which of its datasets to predict (has: {', '.join(st.datasets())})",
                        "pass --dataset NAME")
    check_dataset(st, dataset)
    path = _inputs(st, [dataset], input)[dataset]
    rec = st.embedding_record(b.model, dataset)  # read the file as its extraction did, else as the training did
    prov = rec.provenance if rec is not None else Provenance(input_hash=st.dataset_record(dataset).input_hash,
                                                            layer=b.meta.get("layer"), gene_key=b.meta.get("gene_key"))
    return st, dataset, path, prov


def predict_lora(
    bundle: str | Path | LoraBundle,
    *,
    input: str | Path | None = None,
    store: str | Path | EmbeddingStore | None = None,
    dataset: str | None = None,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    trust_checkpoint: bool = False,
    out: str | Path | None = None,
) -> pd.DataFrame:
    """Per-cell P(sensitive) of raw cells with a LoRA bundle.

    The cells: ``input`` (an .h5ad), or ``store`` + ``dataset``: the raw input the dataset was
    extracted from (``input`` when given, else the path the store records; its content hash must
    equal the store's), with the store's cell ids and labels. The base model is re-built from
    ``checkpoint`` (default: the recorded one; its hash must equal the bundle's) with the recorded
    options (``trust_checkpoint``: unpickle its files in full, as ``lora --trust-checkpoint``), the
    adapter is injected, the cells are embedded through the Runner (the training's batch size and
    autocast) and the head gives P(sensitive). Returns the columns of
    :data:`scdm_eval._bundle.PREDICT_COLUMNS`; with ``out`` (.parquet or .csv), also writes them.
    """
    from scdm_embed.inputs import read_input
    from scdm_embed.models.lora import load_adapter
    from scdm_embed.runner import Runner, resolve_device

    from ._bundle import check_predict_out, predictions_frame, write_predictions
    from ._finetune import _read, build_adapter, check_neural

    b = bundle if isinstance(bundle, LoraBundle) else load_lora_bundle(bundle)
    check_predict_out(out)
    cls = check_neural(b.model)
    st = None
    if store is not None:
        st, name, path, prov = _store_input(b, store, dataset, input)
    elif input is None:
        raise ScdmError("a LoRA bundle predicts raw cells: its base model + adapter embed them",
                        "pass --input CELLS.h5ad, or --store S --dataset D (the dataset's recorded input); "
                        "--checkpoint BASE when the base checkpoint moved")
    elif not Path(input).is_file():
        raise ScdmError(f"--input {str(input)!r} does not exist", "pass an .h5ad file")
    else:
        path, name = Path(input), dataset or Path(input).stem
    ckpt = _base_checkpoint(b, checkpoint)
    dev = resolve_device(device)
    if st is not None:
        data = _read(st, name, path, cls, prov)
    else:
        how = {"layer": b.meta.get("layer"), "gene_key": b.meta.get("gene_key"), "require_counts": cls.needs_counts,
               "allow_duplicate_genes": cls.allows_duplicate_genes, "allow_single_class": True}
        try:  # labelled cells keep their labels (y_true); unlabelled ones predict all the same
            data = read_input(path, **how)
        except InputError:
            data = read_input(path, require_labels=False, **how)
    try:
        adapter = build_adapter(b.model, ckpt, b.meta.get("model_options") or {}, dev,
                                trust_checkpoint=trust_checkpoint)
        load_adapter(adapter, b.path)
        plan = adapter.prepare(data.genes)
        tokens: list[dict[str, np.ndarray]] = []
        for s in range(0, data.n_cells, 1024):
            tokens += adapter.tokenize(data.cell_chunk(s, s + 1024), plan)
        if st is not None:  # the same file (hash checked): the store's ids and labels, in its order
            table = st.cells([name])
        else:
            table = data.cells.copy()
            table.index = [f"{name}/{c}" for c in table.index]
    finally:
        data.close()
    train = b.meta["training"]
    autocast = torch.bfloat16 if train.get("bf16") else None
    runner = Runner(adapter, batch_size=int(train["batch_size"]), token_budget=train.get("token_budget") or 0,
                    autocast=autocast)
    head = b.head(dev)
    emb = torch.from_numpy(runner.embed(tokens)).to(dev)
    with torch.no_grad():
        p = torch.softmax(head(emb).float(), dim=1)[:, 1].cpu().numpy().astype(np.float64)
    res = predictions_frame(table, name, b.model, b.classifier, p)
    if out is not None:
        write_predictions(res, out)
    return res


__all__ = ["FILES", "FORMAT", "LoraBundle", "fit_dir", "is_lora_bundle", "load_lora_bundle", "plan_identity",
           "predict_lora", "save_lora_bundle"]
