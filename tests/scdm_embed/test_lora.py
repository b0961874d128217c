"""Every LoRA target module of every model receives a gradient (what the LoRA stage relies on).

LoRA (r 8, alpha 8, dropout 0.05, as the paper) is injected with peft into each adapter's model,
built from the reference-fixture checkpoints (scBERT / CellLM: small official-layout checkpoints),
and a backward pass from the pooled cell embeddings of real PC9 cells must reach the ``lora_B``
weight of every wrapped module with a non-zero, finite gradient: the default targets (the
paper's, scGPT / UCE ``out_proj`` included: stock ``nn.MultiheadAttention`` would read its
weight directly and leave a LoRA there without gradient) and the wider sets of attention and
feed-forward layers the adapters used to wrap.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scdm_embed import ScdmError
from scdm_embed.models.lora import apply_lora, lora_modules, lora_targets
from scdm_embed.runner import Runner
from tests.scdm_embed.models._performer_ckpt import (
    scgpt_symbols,
    write_celllm_checkpoint,
    write_scbert_checkpoint,
)
from tests.scdm_embed.models._shared import load_adapter, make_chunk, read_cells

MODELS = ("geneformer", "tgpt", "lm", "scgpt", "scfoundation", "uce", "cellplm", "scbert", "celllm")
#: the paper's target modules (scFoundation: its code's; lm: peft's defaults for the architecture)
PAPER_TARGETS = {
    "tgpt": ("c_attn",),
    "scbert": ("to_q", "to_k", "to_v"),
    "celllm": ("to_q", "to_k", "to_v"),
    "geneformer": ("query", "key", "value"),
    "scgpt": ("self_attn.out_proj",),
    "uce": ("self_attn.out_proj",),
    "cellplm": ("query_projection", "key_projection", "value_projection"),
    "scfoundation": ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"),
}
#: wider sets: every attention projection and feed-forward layer
WIDE_TARGETS = {
    "scgpt": ("self_attn.Wqkv", "self_attn.out_proj", "linear1", "linear2"),
    "uce": ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"),
    "cellplm": ("query_projection", "key_projection", "value_projection", "out_projection"),
    "scbert": ("to_q", "to_k", "to_v", "to_out"),
    "celllm": ("to_q", "to_k", "to_v", "to_out"),
}


def _checkpoint(model, fixtures_dir, vocab_dir, tmp_path):
    gf = vocab_dir / "geneformer" / "gc30M"
    return {
        "geneformer": (fixtures_dir / "geneformer" / "checkpoint",
                       {"token_dictionary": gf / "token_dictionary_gc30M.pkl",
                        "gene_median_dictionary": gf / "gene_median_dictionary_gc30M.pkl", "max_length": 128}),
        "tgpt": (fixtures_dir / "tgpt" / "checkpoint", {}),
        "lm": ("minilm", {"n_genes": 16}),
        "scgpt": (fixtures_dir / "scgpt" / "checkpoint", {"max_length": 128}),
        "scfoundation": (fixtures_dir / "scfoundation" / "checkpoint",
                         {"gene_index": vocab_dir / "scfoundation" / "OS_scRNA_gene_index.19264.tsv"}),
        "uce": (fixtures_dir / "uce" / "checkpoint", {"sample_size": 64}),
        "cellplm": (fixtures_dir / "cellplm" / "checkpoint", {}),
        "scbert": (write_scbert_checkpoint(tmp_path / "scbert", scgpt_symbols(vocab_dir, 16906), dim=8), {}),
        "celllm": (write_celllm_checkpoint(tmp_path / "celllm", scgpt_symbols(vocab_dir, 19379, skip=500), dim=8), {}),
    }[model]


CASES = [(m, "default") for m in MODELS] + [(m, "wide") for m in WIDE_TARGETS]


@pytest.mark.parametrize(("model", "which"), CASES)
def test_every_lora_target_gets_a_gradient(model, which, fixtures_dir, vocab_dir, tmp_path):
    from scdm_embed.genes import GeneTable

    cells = read_cells(fixtures_dir / "tgpt" / "cells.h5ad", rows=[0, 1, 40], float32=True)
    genes = GeneTable.from_var(cells.var)
    ckpt, opts = _checkpoint(model, fixtures_dir, vocab_dir, tmp_path)
    a = load_adapter(model, ckpt, genes, **opts)
    if which == "default":
        targets = lora_targets(a)
        if model in PAPER_TARGETS:
            assert targets == PAPER_TARGETS[model]
        net = apply_lora(a, r=8, alpha=8, dropout=0.05)
    else:
        targets = WIDE_TARGETS[model]
        net = apply_lora(a, r=8, alpha=8, dropout=0.05, targets=targets)
    wrapped = lora_modules(net)
    assert wrapped, "no module was wrapped"
    for name in wrapped:
        assert any(name == t or name.endswith("." + t) for t in targets)
    for t in targets:  # every target wraps at least one module
        assert any(name == t or name.endswith("." + t) for name in wrapped), t
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), "only LoRA weights train"

    toks = a.tokenize(make_chunk(cells.X, genes, cells.obs_names), a.prepare(genes))
    batch = Runner(a).collate(toks)
    net.eval()
    with torch.enable_grad():
        emb = a.pool(a.forward(batch), batch)
        w = torch.from_numpy(np.random.default_rng(0).standard_normal(emb.shape).astype(np.float32))
        (emb * w).sum().backward()  # a random direction: L2-normalised outputs have a constant norm
    for name, layer in wrapped.items():
        g = layer.lora_B["default"].weight.grad
        assert g is not None, f"{model}: {name} got no gradient"
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"{model}: {name} got a zero gradient"


def test_unknown_target_is_refused(fixtures_dir):
    a = load_adapter("tgpt", fixtures_dir / "tgpt" / "checkpoint")
    with pytest.raises(ScdmError, match="match no module"):
        apply_lora(a, targets=("no_such_layer",))


@pytest.mark.parametrize("model", MODELS)
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(model, fixtures_dir, vocab_dir, tmp_path):
    """``--gradient-checkpointing``: each LoRA layer runs again in the backward pass, same gradients."""
    import copy

    from scdm_embed.genes import GeneTable
    from scdm_embed.models.lora import enable_gradient_checkpointing

    cells = read_cells(fixtures_dir / "tgpt" / "cells.h5ad", rows=[0, 1, 40], float32=True)
    genes = GeneTable.from_var(cells.var)
    ckpt, opts = _checkpoint(model, fixtures_dir, vocab_dir, tmp_path)
    a = load_adapter(model, ckpt, genes, **opts)
    torch.manual_seed(0)
    plain = apply_lora(a, r=4, alpha=8, dropout=0.0)
    for name, p in plain.named_parameters():  # lora_B starts at zero: move it so every path carries signal
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    toks = a.tokenize(make_chunk(cells.X, genes, cells.obs_names), a.prepare(genes))
    batch = Runner(a).collate(toks)

    def grads(net):
        a.model = net
        net.eval()
        calls = []
        hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in lora_modules(net).values()]
        how = enable_gradient_checkpointing(net, name=model) if net is not plain else None
        with torch.enable_grad():
            emb = a.pool(a.forward(batch), batch)
            forward_calls = len(calls)
            w = torch.from_numpy(np.random.default_rng(0).standard_normal(emb.shape).astype(np.float32))
            (emb * w).sum().backward()
        for h in hooks:
            h.remove()
        return how, forward_calls, len(calls), {n: p.grad.clone() for n, p in net.named_parameters()
                                                  if "lora_" in n}

    checked = copy.deepcopy(plain)
    _, f0, n0, g0 = grads(plain)
    how, f1, n1, g1 = grads(checked)
    assert how == ("hf" if model in ("tgpt", "geneformer", "lm") else "blocks")
    assert n0 == f0 and f1 == f0 and n1 > f1, "the backward pass recomputed no LoRA layer"
    assert set(g0) == set(g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)
