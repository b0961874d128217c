"""Language-model adapter: real all-MiniLM-L6-v2 weights (offline) on the 64 fixture cells,
compared with a plain Hugging Face computation; tiny random causal LMs (GPT-2, LLaMA) with no
pad token; batch invariance, determinism, truncation, strict loading."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

from scdm_embed.errors import CheckpointError
from scdm_embed.genes import GeneTable
from scdm_embed.models import get_adapter
from scdm_embed.models._sentences import ranked_genes
from scdm_embed.models.base import CellChunk, GenePlan
from scdm_embed.models.lm import LanguageModelAdapter, minilm_checkpoint
from scdm_embed.runner import embed_matrix

from ._shared import CPU, load_adapter, read_cells


@pytest.fixture(scope="module")
def cells(fixtures_dir: Path) -> ad.AnnData:
    return read_cells(fixtures_dir / "tgpt" / "cells.h5ad", float32=True)


@pytest.fixture(scope="module")
def genes(cells: ad.AnnData) -> GeneTable:
    """The genes as the CLI builds them (``read_input``): the symbols are the var_names."""
    return GeneTable.from_var(cells.var)


def _keep_top(X: sp.csr_matrix, sizes: list[int]) -> sp.csr_matrix:
    """Cell i keeps only its top ``sizes[i]`` expressed genes."""
    keep = [r[:k] for r, k in zip(ranked_genes(X, None), sizes, strict=True)]
    rows = np.concatenate([np.full(len(k), i) for i, k in enumerate(keep)])
    cols = np.concatenate(keep)
    return sp.csr_matrix((np.asarray(X[rows, cols]).ravel(), (rows, cols)), shape=X.shape, dtype=np.float32)


@pytest.fixture(scope="module")
def varied(cells: ad.AnnData) -> sp.csr_matrix:
    """Cell i keeps its top 1 + i % 8 genes: short sentences of many lengths (cheap on CPU)."""
    return _keep_top(cells.X, [1 + i % 8 for i in range(cells.n_obs)])


@pytest.fixture(scope="module")
def varied_long(cells: ad.AnnData) -> sp.csr_matrix:
    """Cell i keeps its top 1 + i genes (the longest ones are truncated by a 48-token context)."""
    return _keep_top(cells.X, [1 + i for i in range(cells.n_obs)])


_load = partial(load_adapter, LanguageModelAdapter)  # (checkpoint, genes, *, dtype=float32, **options)


def _sentence(X: sp.csr_matrix, i: int, symbols: np.ndarray, n: int) -> str:
    x = X[i].toarray().ravel()
    order = np.argsort(-x, kind="stable")
    return " ".join(symbols[order[x[order] > 0][:n]])


def _reference(path: Path, X: sp.csr_matrix, symbols: np.ndarray, n: int, max_length: int) -> np.ndarray:
    """Plain Hugging Face: AutoTokenizer + AutoModel, one cell at a time, mean over the mask."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for i in range(X.shape[0]):
            enc = tok(_sentence(X, i, symbols, n), truncation=True, max_length=max_length, return_tensors="pt")
            h = model(**enc).last_hidden_state[0]
            m = enc["attention_mask"][0].bool()
            out.append(h[m].mean(0).numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def minilm() -> LanguageModelAdapter:
    return _load("minilm", n_genes=8)


@pytest.fixture(scope="module")
def plan(minilm, genes) -> GenePlan:
    """The fixture genes' plan (for lm it depends on the genes only, not on the checkpoint)."""
    return minilm.prepare(genes)


# -- MiniLM (real weights) ----------------------------------------------------------------------
def test_minilm_checkpoint_and_registry(minilm):
    path = minilm_checkpoint()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert minilm.checkpoint == path
    assert get_adapter("lm") is LanguageModelAdapter
    assert minilm.dim == 384 and not minilm.settings()["causal"]
    assert minilm.default_dtype(CPU) == torch.float32
    assert minilm.default_dtype(torch.device("cuda")) == torch.bfloat16


def test_minilm_equals_plain_hf(minilm, cells, genes):
    emb = embed_matrix(minilm, cells.X, genes, cells.obs_names, batch_size=64)
    ref = _reference(minilm.checkpoint, cells.X, np.asarray(cells.var_names), 8, 512)
    assert emb.shape == (64, 384) and np.isfinite(emb).all()
    assert np.abs(emb - ref).max() <= 1e-5
    # cells are distinguishable
    d = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    assert d[~np.eye(64, dtype=bool)].min() > 1e-3


def test_minilm_batch_invariance(minilm, plan, cells, genes, varied):
    toks = minilm.tokenize(CellChunk(X=varied, cell_ids=cells.obs_names.to_numpy(), genes=genes), plan)
    assert len({len(t["input_ids"]) for t in toks}) >= 10
    batched = embed_matrix(minilm, varied, genes, cells.obs_names, batch_size=64)
    alone = embed_matrix(minilm, varied, genes, cells.obs_names, batch_size=1)
    assert np.abs(batched - alone).max() <= 1e-5


def test_minilm_determinism(minilm, cells, genes):
    X, ids = cells.X[:12], cells.obs_names[:12]
    a = embed_matrix(minilm, X, genes, ids, batch_size=4)
    b = embed_matrix(minilm, X, genes, ids, batch_size=4)
    np.testing.assert_array_equal(a, b)


def test_minilm_default_truncates_to_context(plan, cells, genes):
    a = _load("minilm")
    assert a.n_genes == 1024 and a.settings()["max_length"] == 512
    X = cells.X[:2]
    toks = a.tokenize(CellChunk(X=X, cell_ids=cells.obs_names[:2].to_numpy(), genes=genes), plan)
    assert [len(t["input_ids"]) for t in toks] == [512, 512]
    assert all(t["input_ids"][0] == a.tokenizer.cls_token_id and t["input_ids"][-1] == a.tokenizer.sep_token_id
               for t in toks)
    emb = embed_matrix(a, X, genes, cells.obs_names[:2], batch_size=2)
    ref = _reference(a.checkpoint, X, np.asarray(cells.var_names), 1024, 512)
    assert np.abs(emb - ref).max() <= 1e-5


def test_n_genes_truncation(minilm, plan, cells, genes):
    a = _load("minilm", n_genes=5)
    chunk = CellChunk(X=cells.X[:8], cell_ids=cells.obs_names[:8].to_numpy(), genes=genes)
    sentences = a.sentences(chunk, plan)
    symbols = np.asarray(cells.var_names)
    assert sentences == [_sentence(cells.X, i, symbols, 5) for i in range(8)]
    assert all(len(s.split()) == 5 for s in sentences)
    assert minilm.sentences(chunk, plan)[0].split()[:5] == sentences[0].split()
    toks = [t["input_ids"].tolist() for t in a.tokenize(chunk, plan)]
    assert toks == a.tokenizer(sentences)["input_ids"]
    e5 = embed_matrix(a, cells.X[:8], genes, cells.obs_names[:8])
    e8 = embed_matrix(minilm, cells.X[:8], genes, cells.obs_names[:8])
    assert np.abs(e5 - e8).max() > 1e-2
    assert a.settings()["n_genes"] == 5


def test_normalised_input_ranks_alike(minilm, plan, cells, genes):
    """Ranking is per cell: library-size normalisation + log1p gives the same sentences."""
    X = cells.X[:8]
    norm = sp.csr_matrix(sp.diags(1e4 / np.asarray(X.sum(1)).ravel()) @ X)
    norm.data = np.log1p(norm.data)
    ids = cells.obs_names[:8].to_numpy()
    assert minilm.sentences(CellChunk(X=X, cell_ids=ids, genes=genes), plan) == \
        minilm.sentences(CellChunk(X=norm.astype(np.float32), cell_ids=ids, genes=genes), plan)


# -- tiny random causal LMs without a pad token --------------------------------------------------
def _tiny_tokenizer(words: list[str], *, bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"eos_token": "</s>", "unk_token": "<unk>"}
    if bos:  # LLaMA-style: <s> prepended
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        kwargs["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs), len(vocab)


def _tiny_causal(root: Path, kind: str, words: list[str]) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    path = root / kind
    tok, n_vocab = _tiny_tokenizer(words, bos=kind == "llama")
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=n_vocab, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                         bos_token_id=2, eos_token_id=2, pad_token_id=None)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                          bos_token_id=1, eos_token_id=2, pad_token_id=None)
        model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, cells) -> Path:
    root = tmp_path_factory.mktemp("tiny_lm")
    words = []
    for r in ranked_genes(cells.X, 40):
        for s in np.asarray(cells.var_names)[r]:
            words += s.replace("-", " - ").replace(".", " . ").split()
    for kind in ("gpt2", "llama"):
        _tiny_causal(root, kind, words)
    return root


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tiny_causal_lm(tiny_dir, kind, cells, genes, varied_long):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(tiny_dir / kind), local_files_only=True)
    assert raw.pad_token_id is None
    a = _load(tiny_dir / kind)
    s = a.settings()
    assert s["causal"] and s["pad_token_id"] == raw.eos_token_id and s["max_length"] == 48
    assert a.tokenizer.pad_token_id == raw.eos_token_id
    assert s["unused_checkpoint_keys"] == (["lm_head.weight"] if kind == "llama" else [])
    assert a.dim == 32

    toks = a.tokenize(CellChunk(X=varied_long, cell_ids=cells.obs_names.to_numpy(), genes=genes), a.prepare(genes))
    lengths = [len(t["input_ids"]) for t in toks]
    assert max(lengths) == 48 and len(set(lengths)) >= 10
    if kind == "llama":
        assert all(t["input_ids"][0] == 1 for t in toks)

    batched = embed_matrix(a, varied_long, genes, cells.obs_names, batch_size=64)
    alone = embed_matrix(a, varied_long, genes, cells.obs_names, batch_size=1)
    assert np.isfinite(batched).all()
    assert np.abs(batched - alone).max() <= 1e-5
    ref = _reference(tiny_dir / kind, varied_long, np.asarray(cells.var_names), 1024, 48)
    assert np.abs(batched - ref).max() <= 1e-5

    # causality is what makes right padding safe: a prefix's states ignore later tokens
    ids = torch.from_numpy(toks[-1]["input_ids"][None])
    with torch.no_grad():
        full = a.model(input_ids=ids).last_hidden_state
        head = a.model(input_ids=ids[:, :10]).last_hidden_state
    assert torch.allclose(full[:, :10], head, atol=1e-5)


def test_tiny_bf16_pools_in_float32(tiny_dir, cells, genes):
    a = _load(tiny_dir / "llama", genes, dtype=torch.bfloat16)
    assert next(a.model.parameters()).dtype == torch.bfloat16
    e16 = embed_matrix(a, cells.X[:8], genes, cells.obs_names[:8])
    e32 = embed_matrix(_load(tiny_dir / "llama", genes), cells.X[:8], genes, cells.obs_names[:8])
    assert e16.dtype == np.float32 and np.isfinite(e16).all()
    assert np.abs(e16 - e32).max() < 0.1 * np.abs(e32).max()


# -- strict loading --------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_checkpoint(tmp_path, genes):
    with pytest.raises(CheckpointError, match="does not exist"):
        LanguageModelAdapter(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="needs a checkpoint"):
        LanguageModelAdapter(None)
    with pytest.raises(CheckpointError, match="config.json"):
        _load(tmp_path, genes)


def test_broken_weights(tiny_dir, tmp_path, genes):
    ckpt = _copy(tiny_dir / "gpt2", tmp_path / "missing")
    sd = load_file(ckpt / "model.safetensors")
    del sd[next(k for k in sd if k.endswith("h.1.mlp.c_fc.weight"))]
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing"):
        _load(ckpt, genes)

    ckpt = _copy(tiny_dir / "llama", tmp_path / "mismatch")
    sd = load_file(ckpt / "model.safetensors")
    key = next(k for k in sd if k.endswith("layers.0.input_layernorm.weight"))
    sd[key] = torch.ones(33)
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError):
        _load(ckpt, genes)

    ckpt = _copy(tiny_dir / "llama", tmp_path / "extra")
    sd = load_file(ckpt / "model.safetensors")
    sd["model.layers.7.mlp.up_proj.weight"] = torch.ones(2, 2)
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected"):
        _load(ckpt, genes)


def test_missing_weights_or_tokenizer(tiny_dir, tmp_path, genes):
    ckpt = _copy(tiny_dir / "gpt2", tmp_path / "noweights")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights"):
        _load(ckpt, genes)
    ckpt = _copy(tiny_dir / "gpt2", tmp_path / "notok")
    (ckpt / "tokenizer.json").unlink()
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="tokenizer"):
        _load(ckpt, genes)
