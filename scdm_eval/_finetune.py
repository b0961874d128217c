"""LoRA fine-tuning on the saved splits: the foundation model + a classification head, per partition.

scDrugMap's fine-tuning arm: LoRA (default r 8, alpha 8, dropout 0.05; :mod:`scdm_embed.models.lora`)
on the model's target modules (default: the paper's, ``Adapter.lora_targets``) plus a head on
the pooled cell embedding (default the paper's MLP ``dim -> 512 -> 512 -> 2`` with ReLU; or a
linear ``dim -> 2``), trained jointly with AdamW on cross-entropy for a few epochs on each
partition's training cells and scored on its test cells with the same metrics as the
frozen-embedding classifiers. Several ranks (the paper's ablation: 4, 8, 16) run on the same
partitions in one call. Rows use :data:`~scdm_eval._run.RESULT_COLUMNS` with
``classifier="lora-r8"`` (``lora-r{rank}``), so ``pd.concat([run_evaluation(...), run_lora(...)])``
summarises in one table.

What it reuses, so the comparison is honest:

* the splits: :func:`make_splits` with the same parameters loads the partitions
  ``scdm-eval run`` saved in the store (or makes and saves them);
* the cells: raw cells are read from each dataset's recorded ``source`` (or ``input=``) as
  extraction read them (same layer, gene column, duplicate-gene rule, ``obs["n_counts"]``:
  :meth:`scdm_embed.inputs.InputDataset.cell_chunk`) and must have the content hash recorded
  at extraction;
* the model: the checkpoint and the complete, typed options recorded at extraction
  (``provenance["options"]``); a store that does not record them is refused (pass the
  options); the tokenizer settings are checked against the provenance (a mismatch is warned about);
* the batching: :class:`scdm_embed.runner.Runner` drives every forward (length bucketing,
  padded-token budget, CUDA out-of-memory back-off, bf16 autocast on CUDA), as in extraction.

Genes are prepared once per dataset (``plan = adapter.prepare(genes)``, an immutable
:class:`~scdm_embed.models.base.GenePlan`) and every cell is tokenized once; one loaded
adapter serves every dataset and partition.

Training runs the foundation model as the extraction did (eval mode: no base dropout, frozen
normalisation statistics); only the LoRA dropout is active. Base weights never change: each
partition starts from a pristine copy of the loaded model. An optimisation step is a batch
of ``batch_size`` training cells; the Runner splits it into micro-batches within the token
budget (and again on out-of-memory) whose gradients add up to the whole batch's, so the
budget changes memory, not the step (with LoRA dropout on, masks are drawn per micro-batch).
On CUDA the forward runs under bf16 autocast (float32 master weights, head and loss; ``bf16=``
/ ``--bf16/--no-bf16`` chooses, on CPU too); ``gradient_checkpointing`` recomputes activations
in the backward pass (Hugging Face models: their own checkpointing; others:
``torch.utils.checkpoint`` around each encoder block).

With ``out``, every fit is saved the moment it finishes as a LoRA bundle (peft adapter, head,
manifest: :mod:`scdm_eval._lora_bundle`) under ``out/lora/<model>/lora-r<rank>/<category>/fold-<K>``
(``--final``: ``.../<category>/final``, all the category's cells); a killed run started again
with the same settings loads the finished fits and trains the others. Results rows carry
telemetry (:data:`TELEMETRY_COLUMNS`); ``progress`` shows a bar over fits and one over the
current fit's training cells (epoch, cells/s).

Models whose cells attend to each other (CellPLM, ``batch_invariant = False``): a batch is
the cells' context and is never split. Training batches are random groups of ``batch_size``
training cells; test cells are embedded in consecutive groups of ``batch_size`` test cells
(store order), so a test cell's context holds test cells only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from scdm_embed.errors import ScdmError, StoreError
from scdm_embed.inputs import InputDataset, read_input
from scdm_embed.models import get_adapter
from scdm_embed.models.base import Adapter, GenePlan
from scdm_embed.models.lora import (
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_R,
    apply_lora,
    enable_gradient_checkpointing,
    supports_gradient_checkpointing,
)
from scdm_embed.runner import Runner, plan_batches, resolve_device, token_lengths
from scdm_embed.store import EmbeddingStore, Provenance
from scdm_embed.store.schema import jsonable

from ._metrics import compute_metrics
from ._run import RESULT_COLUMNS, _row, _task_seed, predictions_table
from ._splits import (
    LeakageWarning,
    Partition,
    SplitWarning,
    make_splits,
    open_store,
    save_splits,
)

log = logging.getLogger(__name__)

#: The prefix of the ``classifier`` value of LoRA rows (``lora-r8``: rank 8).
CLASSIFIER = "lora"
#: The heads: the paper's MLP (``dim -> 512 -> 512 -> 2``) or a linear ``dim -> 2``.
HEADS = ("mlp", "linear")
_MLP_HIDDEN = (512, 512)


def classifier_name(rank: int) -> str:
    """The ``classifier`` value of rank ``rank``'s rows: ``lora-r8``."""
    return f"{CLASSIFIER}-r{int(rank)}"
#: Cells read and tokenized per block.
_CHUNK = 1024


class LoraSettingsWarning(UserWarning):
    """The re-built model's tokenizer settings differ from those the embeddings were made with."""


@dataclass
class _Context:
    """A loaded adapter, one gene plan per dataset, and every cell tokenized once."""

    model: str
    checkpoint: Path | None
    options: dict[str, Any]
    device: torch.device
    adapter: Adapter  #: the one loaded adapter; each partition binds its own LoRA copy as its model
    base: torch.nn.Module  #: pristine copy of the loaded network (on CPU)
    plans: dict[str, GenePlan]  #: per dataset: its genes against the model's vocabulary
    tokens: list[dict[str, np.ndarray]]  #: per cell, in split-table order
    dataset: np.ndarray  #: dataset name per cell, in split-table order
    settings_diff: dict[str, list[str]] = field(default_factory=dict)
    targets: tuple[str, ...] = ()  #: the LoRA target modules (checked against the network)
    read_as: tuple[str | None, str | None] = (None, None)  #: (layer, gene key) the inputs were read with


@dataclass
class _Fit:
    """One partition's fine-tuned network, head, test probabilities and training log."""

    proba: np.ndarray
    net: torch.nn.Module
    head: torch.nn.Module
    losses: list[float]
    seconds: float
    train_seconds: float = 0.0
    cells_trained: int = 0  #: training cells x epochs

    @property
    def cells_per_s(self) -> float:
        return self.cells_trained / self.train_seconds if self.train_seconds > 0 else float("nan")


# -- set-up ---------------------------------------------------------------------------------
def check_neural(model: str) -> type[Adapter]:
    """The adapter class of ``model``, refused when it has no network LoRA can fine-tune."""
    cls = get_adapter(model)
    if cls.requires_reference or cls.checkpoint_layout is None:
        raise ScdmError(f"model {model!r} has no neural network to fine-tune with LoRA",
                        "pick a foundation model (geneformer, tgpt, lm, scgpt, scfoundation, uce, cellplm, scbert, "
                        "celllm); compare pca/hvg with `scdm-eval run` instead")
    return cls


def _provenance(st: EmbeddingStore, model: str, datasets: Sequence[str]) -> dict[str, Provenance]:
    """Extraction provenance of ``model`` per dataset (those it was extracted for)."""
    out = {}
    for ds in datasets:
        rec = st.embedding_record(model, ds)
        if rec is not None:
            out[ds] = rec.provenance
    return out


def _checkpoint(model: str, given: str | Path | None, prov: Mapping[str, Provenance],
                st: EmbeddingStore) -> Path:
    if given is not None:
        return Path(given)
    held = {str(p.checkpoint) for p in prov.values() if p.checkpoint}
    if not held:
        raise StoreError(f"the store {str(st.path)!r} records no {model} extraction, so the checkpoint to fine-tune "
                         "is unknown", f"pass checkpoint=DIR (--checkpoint DIR), or extract {model} into the store first")
    if len(held) > 1:
        raise StoreError(f"the store's {model} embeddings were made from several checkpoints: {sorted(held)}",
                         "pass checkpoint=DIR (--checkpoint DIR) to choose one")
    path = Path(held.pop())
    if not path.exists():
        raise ScdmError(f"the {model} checkpoint recorded in the store ({str(path)!r}) does not exist here",
                        "pass checkpoint=DIR (--checkpoint DIR) pointing at it")
    return path


def _options(model: str, given: Mapping[str, Any] | None, prov: Mapping[str, Provenance],
             st: EmbeddingStore) -> dict[str, Any]:
    """The model options: ``given``, else the complete options recorded at extraction (no guessing)."""
    if given is not None:
        return dict(given)
    fix = (f"pass the options the extraction used: model_options={{...}} (--option KEY=VALUE, repeatable; "
           f"`scdm-embed list-models --options` lists {model}'s), or re-extract {model} with this version "
           "(`scdm-embed extract ... --overwrite`)")
    missing = sorted(ds for ds, p in prov.items() if p.options is None)
    if missing:
        raise StoreError(f"the store {str(st.path)!r} does not record the {model} options the embeddings of "
                         f"{missing} were made with (written by an older scdm-embed)", fix)
    recorded = {ds: dict(p.options or {}) for ds, p in prov.items()}
    if len({_norm(o) for o in recorded.values()}) > 1:
        raise StoreError(f"the store's {model} embeddings were made with different options per dataset: {recorded}",
                         "pass model_options={...} (--option KEY=VALUE) to choose the ones to fine-tune with")
    return next(iter(recorded.values()), {})  # no extraction recorded (checkpoint= given): the defaults


def _inputs(st: EmbeddingStore, datasets: Sequence[str], given: str | Path | Mapping[str, str | Path] | None
            ) -> dict[str, Path]:
    """Raw-input path per dataset: ``given`` where set, else the recorded ``source``."""
    if given is None:
        mapping: dict[str, Path] = {}
    elif isinstance(given, Mapping):
        mapping = {str(k): Path(v) for k, v in given.items()}
        unknown = sorted(set(mapping) - set(datasets))
        if unknown:
            raise ScdmError(f"input= names dataset(s) {unknown} that are not in the store (has: {list(datasets)})",
                            "key input= by the store's dataset names (--input DATASET=PATH)")
    else:
        if len(datasets) != 1:
            raise ScdmError(f"input= gives one path but the store holds {len(datasets)} datasets {list(datasets)}",
                            "pass a mapping {dataset: path} (CLI: --input DATASET=PATH, repeatable)")
        mapping = {datasets[0]: Path(given)}
    out = {}
    for ds in datasets:
        if ds in mapping:
            path = mapping[ds]
            if not path.exists():
                raise ScdmError(f"the input given for dataset {ds!r} ({str(path)!r}) does not exist", "check the path")
        else:
            src = st.dataset_record(ds).source
            if not src:
                raise StoreError(f"the store records no input file for dataset {ds!r}",
                                 f"pass input=PATH (--input {ds}=PATH) with the file it was extracted from")
            path = Path(src)
            if not path.exists():
                raise ScdmError(f"the input of dataset {ds!r} is no longer at {str(path)!r} (recorded at extraction)",
                                f"pass input=PATH (--input PATH, or --input {ds}=PATH) where the file is now")
        out[ds] = path
    return out


def _read(st: EmbeddingStore, ds: str, path: Path, cls: type[Adapter], prov: Provenance | None) -> InputDataset:
    """Open ``path`` as extraction opened it (layer, gene column, duplicate genes); check its hash."""
    data = read_input(path, layer=prov.layer if prov else None, gene_key=prov.gene_key if prov else None,
                      require_labels=False,
                      require_counts=cls.needs_counts, allow_duplicate_genes=cls.allows_duplicate_genes)
    held = st.dataset_record(ds).input_hash
    if data.content_hash != held:
        data.close()
        raise ScdmError(
            f"{str(path)!r} is not the input dataset {ds!r} was extracted from (content hash "
            f"{data.content_hash[:12]} != {str(held)[:12]}); the stage must see exactly the cells the splits were made on",
            "pass the original file with input= (--input); if the data changed, re-extract it "
            "(`scdm-embed extract ... --overwrite`) and re-run the evaluation")
    return data


def _norm(v: Any) -> str:
    return json.dumps(jsonable(v) if isinstance(v, dict) else v, sort_keys=True, default=str)


def _settings_diff(adapter: Adapter, held: Provenance | None) -> list[str]:
    if held is None or held.settings is None:
        return []
    now, was = jsonable(adapter.settings()), dict(held.settings)
    return sorted(k for k in set(now) | set(was) if _norm(now.get(k)) != _norm(was.get(k)))


def build_adapter(model: str, checkpoint: Path, options: Mapping[str, Any], device: torch.device, *,
                  trust_checkpoint: bool = False) -> Adapter:
    """Load ``model`` from ``checkpoint`` with ``options`` in float32 (autocast gives bf16 when asked)."""
    a = get_adapter(model)(checkpoint, trust_checkpoint=trust_checkpoint, **dict(options))
    a.load(device=device, dtype=torch.float32)  # float32 master weights; autocast does bf16 on CUDA
    if a.torch_module() is None:
        raise ScdmError(f"model {model!r} has no neural network to fine-tune with LoRA", "pick a transformer model")
    return a


def _resolve_targets(adapter: Adapter, targets: Sequence[str] | None) -> tuple[str, ...]:
    """``targets`` (default: the adapter's), each checked to name a layer LoRA can wrap."""
    from scdm_embed.models.lora import lora_targets

    default = lora_targets(adapter)
    chosen = tuple(targets) if targets else default
    net = adapter.torch_module()
    wrappable = [n for n, m in net.named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d))
                 or type(m).__name__ == "Conv1D"]
    bad = [t for t in chosen if not any(n == t or n.endswith("." + t) for n in wrappable)]
    if bad:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in wrappable})
        raise ScdmError(f"LoRA target(s) {bad} name no linear layer of {adapter.name!r}",
                        f"pass --targets with layer names of the model (default: {' '.join(default)}; "
                        f"its layers: {', '.join(leaves[:30])}{' ...' if len(leaves) > 30 else ''})")
    return chosen


def _prepare_context(
    st: EmbeddingStore,
    index: pd.Index,
    *,
    model: str,
    checkpoint: str | Path | None,
    input: str | Path | Mapping[str, str | Path] | None,
    model_options: Mapping[str, Any] | None,
    device: torch.device,
    trust_checkpoint: bool = False,
    targets: Sequence[str] | None = None,
) -> _Context:
    """Load the model, open and verify every dataset's cells, tokenize them once (split-table order)."""
    cls = check_neural(model)
    cells = st.cells()
    if not cells.index.astype(str).equals(index):
        raise StoreError("the split table does not match the store's cells", "re-make the splits (`scdm-eval splits make --overwrite`)")
    datasets = list(dict.fromkeys(cells["dataset"]))
    prov = _provenance(st, model, datasets)
    ckpt = _checkpoint(model, checkpoint, prov, st)
    opts = _options(model, model_options, prov, st)
    paths = _inputs(st, datasets, input)
    adapter = build_adapter(model, ckpt, opts, device, trust_checkpoint=trust_checkpoint)
    chosen = _resolve_targets(adapter, targets)
    diff = {ds: d for ds in datasets if (d := _settings_diff(adapter, prov.get(ds)))}
    if diff:
        keys = sorted({k for d in diff.values() for k in d})
        warnings.warn(f"{model}: the re-built model's settings differ from the extraction's in {keys} (datasets "
                      f"{sorted(diff)}); fine-tuning may see the cells differently from the embeddings. Fix: pass "
                      "the extraction's model options (model_options= / --option KEY=VALUE).",
                      LoraSettingsWarning, stacklevel=3)
    plans: dict[str, GenePlan] = {}
    tokens: list[dict[str, np.ndarray]] = []
    for ds in datasets:  # the store's cells are grouped by dataset, in this order
        data = _read(st, ds, paths[ds], cls, prov.get(ds))
        try:
            plans[ds] = plan = adapter.prepare(data.genes)
            for s in range(0, data.n_cells, _CHUNK):
                tokens += adapter.tokenize(data.cell_chunk(s, s + _CHUNK), plan)
        finally:
            data.close()
    base = adapter.torch_module().cpu()  # the loaded network becomes the pristine template
    adapter.model = None  # each partition binds its own LoRA copy
    first = next(iter(prov.values()), None)
    read_as = (first.layer, first.gene_key) if first is not None else (None, None)
    return _Context(model, ckpt, dict(opts), device, adapter, base, plans, tokens, cells["dataset"].to_numpy(), diff,
                    chosen, read_as)


# -- training -------------------------------------------------------------------------------
def _runner(ctx: _Context, batch_size: int, token_budget: int | None, bf16: bool = False) -> Runner:
    """The Runner of training and inference: ``token_budget`` None = the device default, 0 = no cap;
    ``bf16``: the forward under bf16 autocast (float32 master weights, head and loss)."""
    return Runner(ctx.adapter, batch_size=batch_size, token_budget=token_budget,
                  autocast=torch.bfloat16 if bf16 else None)


def _groups(ctx: _Context, cells: np.ndarray, batch_size: int, rng: np.random.Generator | None
            ) -> list[np.ndarray]:
    """Cell positions per optimisation step (``rng``: training) or per dataset (inference).

    One dataset per group (its cells share a gene plan and, for CellPLM, a context). Training:
    cells shuffled, grouped into steps of ``batch_size`` (length-bucketed for batch-invariant
    models, as extraction batches), steps shuffled. Inference: each dataset's cells in store order.
    """
    a = ctx.adapter
    out: list[np.ndarray] = []
    for ds in ctx.plans:
        mine = cells[ctx.dataset[cells] == ds]
        if not len(mine):
            continue
        if rng is None:
            out.append(mine)
            continue
        mine = rng.permutation(mine)
        lengths = token_lengths([ctx.tokens[i] for i in mine], a.sequence_keys)
        out += [mine[b] for b in plan_batches(lengths, batch_size=batch_size, bucket=a.batch_invariant)]
    if rng is not None:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def make_head(dim: int, head: str) -> torch.nn.Module:
    """The paper's MLP ``dim -> 512 -> 512 -> 2`` (ReLU), or a linear ``dim -> 2``."""
    if head == "linear":
        return torch.nn.Linear(dim, 2)
    layers: list[torch.nn.Module] = []
    d = dim
    for h in _MLP_HIDDEN:
        layers += [torch.nn.Linear(d, h), torch.nn.ReLU()]
        d = h
    return torch.nn.Sequential(*layers, torch.nn.Linear(d, 2))


def _fit_partition(ctx: _Context, y: np.ndarray, train: np.ndarray, test: np.ndarray, *, seed: int, epochs: int,
                   lr: float, batch_size: int, token_budget: int | None = None, r: int = LORA_R,
                   alpha: float = LORA_ALPHA, dropout: float = LORA_DROPOUT, head: str = "mlp",
                   grad_accum: int = 1, bf16: bool = False, gradient_checkpointing: bool = False,
                   on_step: Callable[[int, int], None] | None = None) -> _Fit:
    """Fine-tune a fresh LoRA copy of the network + a head on ``train``; P(sensitive) on ``test``
    (``test`` empty: a final fit, no scoring).

    An optimiser step averages the gradients of ``grad_accum`` consecutive batches (the mean
    over their cells). ``bf16``: forward under bf16 autocast; ``gradient_checkpointing``:
    activations recomputed in the backward pass (:func:`enable_gradient_checkpointing`).
    ``on_step(cells, epoch)`` is called after each optimiser step (progress bars)."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    a = ctx.adapter
    a.model = copy.deepcopy(ctx.base).to(ctx.device)
    with warnings.catch_warnings():  # peft notes that it switches GPT-2's Conv1D to fan_in_fan_out itself
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*", category=UserWarning)
        net = apply_lora(a, r=r, alpha=alpha, dropout=dropout, targets=ctx.targets or None)
    head_net = make_head(a.dim, head).to(ctx.device)
    params = [p for p in net.parameters() if p.requires_grad] + list(head_net.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    runner = _runner(ctx, batch_size, token_budget, bf16)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(ctx.device)
    losses: list[float] = []
    net.eval()  # the foundation model runs as in extraction; only LoRA dropout trains
    for name, m in net.named_modules():
        if name.endswith("lora_dropout"):
            m.train()
    head_net.train()
    if gradient_checkpointing:
        enable_gradient_checkpointing(net, name=ctx.model)
    try:
        t_train = time.perf_counter()
        with torch.enable_grad():
            for epoch in range(epochs):
                total, n = 0.0, 0
                steps = _groups(ctx, train, batch_size, rng)
                for w in range(0, len(steps), grad_accum):
                    window = steps[w:w + grad_accum]
                    k = sum(len(s) for s in window)
                    opt.zero_grad(set_to_none=True)
                    loss = 0.0
                    for step in window:
                        cells = [ctx.tokens[i] for i in step]
                        labels = yt[torch.from_numpy(step).to(ctx.device)]

                        def loss_fn(emb: torch.Tensor, pos: np.ndarray, labels=labels, k=k) -> torch.Tensor:
                            # a sum over cells / the window's size: micro-batch gradients add up to its mean
                            logits = head_net(emb.float())
                            return F.cross_entropy(logits, labels[torch.from_numpy(pos).to(ctx.device)],
                                                   reduction="sum") / k

                        try:
                            # micro-batches within the token budget (bucketed); the Runner splits again on OOM
                            loss += sum(runner.backward(cells, loss_fn, micro) for micro in runner.batches(cells))
                        except FloatingPointError as err:
                            raise ScdmError(f"LoRA training of {ctx.model} diverged ({err})",
                                            "try a smaller lr (--lr)") from None
                    opt.step()
                    total += loss * k
                    n += k
                    if on_step is not None:
                        on_step(k, epoch)
                losses.append(total / max(n, 1))
        train_s = time.perf_counter() - t_train
        net.eval()
        head_net.eval()
        proba = np.empty(len(test), dtype=np.float64)
        where = {c: i for i, c in enumerate(test)}
        for group in _groups(ctx, test, batch_size, None):
            emb = torch.from_numpy(runner.embed([ctx.tokens[i] for i in group])).to(ctx.device)
            with torch.no_grad():
                p = torch.softmax(head_net(emb).float(), dim=1)[:, 1]
            proba[[where[c] for c in group]] = p.cpu().numpy()
    finally:
        a.model = None
    return _Fit(proba, net, head_net, losses, time.perf_counter() - t0, train_s, len(train) * epochs)


# -- bf16, telemetry, progress, saving and resume -------------------------------------------
#: columns the LoRA rows add after :data:`RESULT_COLUMNS`
TELEMETRY_COLUMNS: tuple[str, ...] = ("wall_s", "cells_per_s", "peak_rss_mb", "peak_gpu_mb", "device")


def _check_bf16(bf16: bool | None, dev: torch.device) -> bool:
    """``bf16`` resolved for ``dev`` (None: on CUDA yes, elsewhere no); refused where unsupported."""
    if bf16 is None:
        return dev.type == "cuda"
    if not isinstance(bf16, bool):
        raise ScdmError(f"bf16 must be True, False or None (got {bf16!r})", "pass --bf16 or --no-bf16, or leave it out")
    if bf16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ScdmError(f"--bf16 was asked for, but the GPU {torch.cuda.get_device_name(dev)} has no bfloat16 support",
                        "pass --no-bf16 (float32), or use a GPU with bf16 (Ampere or newer)")
    if bf16 and dev.type not in ("cuda", "cpu"):
        raise ScdmError(f"--bf16 autocast is supported on cuda and cpu, not {dev.type}", "pass --no-bf16")
    return bf16


def _peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _telemetry(fit: _Fit, dev: torch.device) -> dict[str, Any]:
    gpu = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")
    return {"wall_s": round(fit.seconds, 3), "cells_per_s": round(fit.cells_per_s, 2), "peak_rss_mb": _peak_rss_mb(),
            "peak_gpu_mb": round(gpu, 1), "device": str(dev)}


@dataclass
class _Job:
    """One fit: a partition (``fold`` None: the category's final fit on ``train`` = all its cells) and a rank."""

    part: Partition
    rank: int
    fold: int | None
    train: np.ndarray
    test: np.ndarray


class _Bar:
    """Two rich bars: fits done, and the current fit's training cells (epoch, cells/s); silent when off."""

    def __init__(self, stack: contextlib.ExitStack, on: bool, title: str, total: int) -> None:
        self.bar = None
        if not on:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from scdm_embed.cli_support import err_console

        class Rate(TextColumn):
            def render(self, task):  # noqa: ANN001, ANN202
                from rich.text import Text

                return Text(f"{task.speed:,.1f} cells/s" if task.speed else "", style="progress.data.speed")

        self.bar = stack.enter_context(Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                                Rate(""), TimeElapsedColumn(), console=err_console, transient=True))
        self.fits = self.bar.add_task(title, total=total)
        self.cells = self.bar.add_task("", total=1, visible=False)
        self.name, self.epochs = "", 1

    def start_fit(self, name: str, cells: int, epochs: int) -> None:
        if self.bar is not None:
            self.name, self.epochs = name, epochs
            self.bar.reset(self.cells, total=max(cells, 1), visible=True,
                           description=f"{name} epoch 1/{epochs}")

    def step(self, cells: int, epoch: int) -> None:
        if self.bar is not None:
            self.bar.update(self.cells, advance=cells, description=f"{self.name} epoch {epoch + 1}/{self.epochs}")

    def fit_done(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.fits)
            self.bar.update(self.cells, visible=False)


class _Saver:
    """Saves each finished fit as a LoRA bundle under ``out/lora`` and finds the finished ones (resume)."""

    def __init__(self, out: Path, ctx: _Context, splits: Any, settings: dict[str, Any], *, seed: int,
                 token_budget: int | None, overwrite: bool) -> None:
        from scdm_embed.models.base import hash_path

        from ._lora_bundle import plan_identity

        self.out, self.ctx, self.splits, self.overwrite = out, ctx, splits, overwrite
        self.checkpoint_hash = hash_path(ctx.checkpoint)
        self.token_budget = token_budget
        self.key_fields = {"model": ctx.model, "checkpoint_hash": self.checkpoint_hash,
                           "model_options": jsonable(ctx.options), "split": splits.name, "seed": int(seed),
                           **jsonable(settings)}
        self.plans = {ds: plan_identity(p) for ds, p in ctx.plans.items()}

    def _key(self, rank: int) -> str:
        import hashlib

        return hashlib.sha256(_norm({**self.key_fields, "rank": int(rank)}).encode()).hexdigest()

    def folder(self, job: _Job) -> Path:
        from ._lora_bundle import fit_dir

        return fit_dir(self.out, self.ctx.model, classifier_name(job.rank), job.part.category, job.fold)

    def check(self, jobs: Sequence[_Job]) -> None:
        """Refuse (before any training) fits saved in ``out`` with other settings, unless ``overwrite``."""
        from ._lora_bundle import clear_partial, load_lora_bundle

        other = []
        for job in jobs:
            folder = self.folder(job)
            clear_partial(folder.parent)  # a killed run's half-written fit
            if (folder / "bundle.json").exists() and not self.overwrite:
                meta = load_lora_bundle(folder).meta
                if meta.get("run_key") != self._key(job.rank):
                    other.append(str(folder))
        if other:
            raise ScdmError(f"{str(self.out)!r} holds LoRA fits made with other settings or data ({other[0]}"
                            f"{f' and {len(other) - 1} more' if len(other) > 1 else ''}), so this run cannot resume them",
                            "re-run with the same settings to resume, pass --overwrite to retrain them, or "
                            "choose another --out")

    def finished(self, job: _Job) -> tuple[np.ndarray, dict[str, Any], list[float]] | None:
        """(test P(sensitive), telemetry, losses) of a finished fit of this run, else ``None``."""
        from ._lora_bundle import load_lora_bundle

        folder = self.folder(job)
        if self.overwrite or not (folder / "bundle.json").exists():
            return None
        b = load_lora_bundle(folder)
        if job.fold is None:
            return np.empty(0), b.meta["telemetry"], b.meta["train_loss"]
        saved = b.test_proba()
        if saved is None or not np.array_equal(saved[0], job.test):
            return None
        return saved[1], b.meta["telemetry"], b.meta["train_loss"]

    def save(self, job: _Job, fit: _Fit, *, seed: int, telemetry: dict[str, Any]) -> Path:
        from ._lora_bundle import save_lora_bundle

        ctx, st = self.ctx, self.key_fields
        prov_layer, prov_gene_key = ctx.read_as
        meta = {
            "model": ctx.model, "classifier": classifier_name(job.rank), "checkpoint": str(ctx.checkpoint),
            "checkpoint_hash": self.checkpoint_hash, "model_options": jsonable(ctx.options),
            "settings": jsonable(ctx.adapter.settings()), "dim": int(ctx.adapter.dim),
            "layer": prov_layer, "gene_key": prov_gene_key, "gene_plans": self.plans,
            "lora": {"r": int(job.rank), "alpha": st["alpha"], "dropout": st["dropout"], "targets": st["targets"]},
            "head": {"kind": st["head"], "layers": [ctx.adapter.dim, *(_MLP_HIDDEN if st["head"] == "mlp" else ()), 2]},
            "training": {k: st[k] for k in ("epochs", "lr", "batch_size", "grad_accum", "bf16")}
            | {"token_budget": self.token_budget, "seed": int(seed), "run_seed": st["seed"]},
            "partition": {"split": self.splits.name, "category": job.part.category,
                          "fold": job.fold, "name": job.part.name if job.fold is not None else "final",
                          "n_train": int(len(job.train)), "n_test": int(len(job.test))},
            "train_loss": [float(x) for x in fit.losses], "telemetry": telemetry,
            "run_key": self._key(job.rank), "run_settings": {**st, "rank": int(job.rank)},
        }
        return save_lora_bundle(self.folder(job), net=fit.net, head=fit.head, meta=meta,
                                proba=fit.proba if job.fold is not None else None,
                                test=job.test if job.fold is not None else None)


# -- public API -----------------------------------------------------------------------------
def run_lora(
    store: str | Path | EmbeddingStore,
    *,
    model: str,
    checkpoint: str | Path | None = None,
    input: str | Path | Mapping[str, str | Path] | None = None,
    model_options: Mapping[str, Any] | None = None,
    scheme: Literal["pooled", "cross"] = "pooled",
    by: str = "all",
    folds: int = 10,
    group_key: str | None = None,
    seed: int = 0,
    epochs: int = 3,
    lr: float = 1e-4,
    batch_size: int = 16,
    token_budget: int | None = None,
    rank: int | Sequence[int] = LORA_R,
    alpha: float = LORA_ALPHA,
    dropout: float = LORA_DROPOUT,
    targets: Sequence[str] | None = None,
    head: Literal["mlp", "linear"] = "mlp",
    grad_accum: int = 1,
    bf16: bool | None = None,
    gradient_checkpointing: bool = False,
    max_partitions: int | None = None,
    device: str = "auto",
    out: str | Path | None = None,
    final: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    trust_checkpoint: bool = False,
) -> pd.DataFrame:
    """LoRA-fine-tune ``model`` + a head on every partition of the store's saved splits, per LoRA rank.

    The partitions are exactly those of ``scdm-eval run`` with the same ``scheme``/``by``/
    ``folds``/``group_key``/``seed``. Raw cells come from each dataset's recorded input file
    (``input=``: a path, or ``{dataset: path}``, when it moved; its content hash must match
    the store's). ``checkpoint`` and ``model_options`` default to the extraction provenance
    (a store that does not record the options is refused: pass ``model_options``).
    ``trust_checkpoint`` unpickles the checkpoint files in full (as ``extract --trust-checkpoint``).
    Per partition and per ``rank`` (one rank or several: ``rank=(4, 8, 16)`` is the paper's
    ablation, every rank on the same partitions with the same seed): a fresh copy of the
    network with LoRA (``rank``, ``alpha``, ``dropout``) on ``targets`` (module-name suffixes;
    default: the model's target modules from the paper, ``Adapter.lora_targets``), a ``head``
    (``"mlp"``: the paper's ``dim -> 512 -> 512 -> 2``; ``"linear"``: ``dim -> 2``) trained
    jointly, AdamW (``lr``) on cross-entropy for ``epochs`` epochs over the training cells in
    batches of ``batch_size``, one optimiser step per ``grad_accum`` batches; then
    P(sensitive) of the test cells, scored like the other classifiers. ``token_budget`` caps the padded tokens of one forward (default:
    4,096 on CPU, 65,536 on CUDA; 0 = no cap): a larger batch is run as micro-batches whose
    gradients add up to the batch's. ``dropout`` is the LoRA dropout (0 makes training
    independent of how a batch is split). Seeded per partition: the same ``seed`` gives the
    same rows (on the same device). ``max_partitions`` keeps only the first partitions (quick runs).
    ``bf16`` runs the forward under bf16 autocast (float32 master weights, head and loss;
    default: on CUDA yes, on CPU no); ``gradient_checkpointing`` recomputes activations in
    the backward pass (less memory, same gradients; refused for networks it cannot checkpoint).

    Saving and resume (with ``out``): every fit is saved as a LoRA bundle (peft adapter, head,
    manifest; :mod:`scdm_eval._lora_bundle`) in ``out/lora/<model>/lora-r<rank>/<category>/fold-<K>``,
    the moment it finishes; a run that is killed and started again with the same settings
    loads the finished fits and trains only the others. ``final`` adds, per category and rank,
    a fit on all the category's cells (``.../<category>/final``; no score). Fits saved with
    other settings are refused, unless ``overwrite`` (which also retrains finished fits).

    Returns one row per partition and rank, columns :data:`RESULT_COLUMNS` then
    :data:`TELEMETRY_COLUMNS` (``wall_s`` of the fit, training ``cells_per_s`` (cells x epochs /
    training seconds), the process's ``peak_rss_mb``, ``peak_gpu_mb`` on CUDA, ``device``),
    ``classifier="lora-r{rank}"``; ``results.attrs["lora"]`` records every training setting.
    With ``out``: ``lora_results.parquet/.csv``, ``lora_summary.csv/.md``, and, when
    ``results.parquet`` of ``scdm-eval run`` on the same split is there,
    ``combined_summary.csv/.md`` over both.
    """
    st = open_store(store)
    check_neural(model)
    for name, val, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < low:
            raise ScdmError(f"{name} must be an integer >= {low} (got {val!r})", f"pass e.g. {name}=3")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ScdmError(f"lr must be a positive number (got {lr!r})", "pass e.g. lr=1e-4")
    if token_budget is not None and (not isinstance(token_budget, (int, np.integer)) or isinstance(token_budget, bool)
                                     or token_budget < 0):
        raise ScdmError(f"token_budget must be an integer >= 0 (got {token_budget!r})",
                        "pass e.g. token_budget=4096 (0 = no cap), or leave it out for the device default")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ScdmError(f"dropout must be a number in [0, 1) (got {dropout!r})", f"pass e.g. --dropout {LORA_DROPOUT} (dropout={LORA_DROPOUT})")
    ranks = _check_ranks(rank)
    if not isinstance(alpha, (int, float, np.integer, np.floating)) or isinstance(alpha, bool) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise ScdmError(f"alpha must be a positive number (got {alpha!r})", f"pass e.g. alpha={LORA_ALPHA}")
    if head not in HEADS:
        raise ScdmError(f"head must be one of {list(HEADS)} (got {head!r})",
                        "pass head='mlp' (the paper's d-512-512-2) or head='linear' (--head mlp|linear)")
    if not isinstance(grad_accum, (int, np.integer)) or isinstance(grad_accum, bool) or grad_accum < 1:
        raise ScdmError(f"grad_accum must be an integer >= 1 (got {grad_accum!r})", "pass e.g. grad_accum=4")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ScdmError(f"seed must be an integer (got {seed!r})", "pass e.g. seed=0")
    if targets is not None:
        if isinstance(targets, str):
            targets = [targets]
        targets = [str(x).strip() for x in targets]
        if not targets or any(not x for x in targets):
            raise ScdmError(f"targets must be module names (got {targets!r})",
                            "pass e.g. --targets query --targets value, or leave it out for the paper's defaults")
    if max_partitions is not None and (not isinstance(max_partitions, (int, np.integer)) or max_partitions < 1):
        raise ScdmError(f"max_partitions must be an integer >= 1 (got {max_partitions!r})", "pass e.g. max_partitions=2, or leave it out")
    for name, val in (("gradient_checkpointing", gradient_checkpointing), ("final", final),
                      ("overwrite", overwrite)):
        if not isinstance(val, bool):
            raise ScdmError(f"{name} must be True or False (got {val!r})", f"pass {name}=True or leave it out")
    if final and out is None:
        raise ScdmError("final=True saves a fit per category, but no out= folder is given",
                        "pass out=FOLDER (--out) with --final")
    dev = resolve_device(device)
    use_bf16 = _check_bf16(bf16, dev)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LeakageWarning)
        warnings.simplefilter("always", SplitWarning)
        # a new split is saved only once the run succeeded: a failed run leaves the store as it was
        splits = make_splits(st, save=False, scheme=scheme, by=by, folds=folds, group_key=group_key, seed=seed)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = [str(w.message) for w in caught if issubclass(w.category, (LeakageWarning, SplitWarning))]

    ctx = _prepare_context(st, splits.table.index, model=model, checkpoint=checkpoint, input=input,
                           model_options=model_options, device=dev, trust_checkpoint=trust_checkpoint,
                           targets=targets)
    if gradient_checkpointing and not supports_gradient_checkpointing(ctx.base):
        enable_gradient_checkpointing(copy.deepcopy(ctx.base), name=model)  # raises: not supported
    y = splits.table["label"].to_numpy().astype(np.int64)
    parts: list[Partition] = list(splits)
    if max_partitions is not None:
        parts = parts[:max_partitions]
    settings = {"epochs": int(epochs), "lr": float(lr), "batch_size": int(batch_size), "grad_accum": int(grad_accum),
                "alpha": float(alpha),
                "dropout": float(dropout), "targets": list(ctx.targets), "head": head, "bf16": use_bf16}
    budget = _runner(ctx, batch_size, token_budget).token_budget
    jobs = [_Job(part, r, part.fold, part.train, part.test) for part in parts for r in ranks]
    if final:
        for cat in dict.fromkeys(p.category for p in splits):
            cells = np.unique(np.concatenate([np.concatenate([p.train, p.test]) for p in splits if p.category == cat]))
            jobs += [_Job(next(p for p in splits if p.category == cat), r, None, cells, cells[:0]) for r in ranks]
    saver = None if out is None else _Saver(Path(out), ctx, splits, settings, seed=seed, token_budget=budget,
                                            overwrite=overwrite)
    if saver is not None:
        saver.check(jobs)  # before any training: fits saved with other settings are refused
    rows, log_rows, blocks, saved, resumed = [], [], [], [], 0
    with contextlib.ExitStack() as stack:
        bar = _Bar(stack, progress, f"LoRA {model} on {dev.type}{' bf16' if use_bf16 else ''}", len(jobs))
        for job in jobs:
            name = classifier_name(job.rank)
            s = _task_seed(seed, job.part.category, job.fold) if job.fold is not None else \
                _task_seed(seed, f"{job.part.category}/final", 0)
            done = saver.finished(job) if saver is not None else None
            if done is not None:
                proba, tele, losses = done
                resumed += 1
            else:
                bar.start_fit(f"{name} {job.part.category}/{'final' if job.fold is None else job.part.name}",
                              len(job.train) * epochs, epochs)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                fit = _fit_partition(ctx, y, job.train, job.test, seed=s, epochs=epochs, lr=lr,
                                     batch_size=batch_size, token_budget=token_budget, r=job.rank, alpha=alpha,
                                     dropout=float(dropout), head=head, grad_accum=int(grad_accum), bf16=use_bf16,
                                     gradient_checkpointing=gradient_checkpointing, on_step=bar.step)
                proba, losses = fit.proba, fit.losses
                tele = _telemetry(fit, dev)
                if saver is not None:
                    saved.append(str(saver.save(job, fit, seed=s, telemetry=tele)))
                log.info("LoRA %s r%d %s/%s: loss %s, %.1f s", model, job.rank, job.part.category, job.part.name,
                         fit.losses, fit.seconds)
                del fit
            if job.fold is not None:
                metrics = compute_metrics(y[job.test], proba)
                rows.append({**_row(model, splits, job.part, name, metrics, y, seed), **tele})
                blocks.append((model, job.part, name, proba))
            log_rows.append({"category": job.part.category, "fold": job.fold, "partition": job.part.name if
                             job.fold is not None else "final", "rank": job.rank, "classifier": name,
                             "train_loss": [round(x, 6) for x in losses], "seconds": tele["wall_s"],
                             "resumed": done is not None})
            bar.fit_done()
    results = pd.DataFrame(rows, columns=[*RESULT_COLUMNS, *TELEMETRY_COLUMNS]).astype(
        {"fold": np.int64, "seed": np.int64, "leak_prone": bool})
    results.attrs.update({
        "split": splits.name, "skipped": splits.skipped.to_dict("records"), "warnings": notes,
        "params": {**splits.params, "models": [model], "classifiers": [classifier_name(r) for r in ranks],
                   "store": str(st.path)},
        "lora": {"checkpoint": str(ctx.checkpoint), "model_options": ctx.options, "ranks": ranks, "alpha": alpha,
                 "dropout": float(dropout), "targets": list(ctx.targets), "head": head,
                 "head_layers": [ctx.adapter.dim, *(_MLP_HIDDEN if head == "mlp" else ()), 2],
                 "epochs": epochs, "lr": lr, "batch_size": batch_size, "grad_accum": int(grad_accum), "seed": seed,
                 "token_budget": budget, "device": str(dev), "autocast": "bfloat16" if use_bf16 else None,
                 "bf16": use_bf16, "gradient_checkpointing": gradient_checkpointing,
                 "partitions_run": len(parts), "partitions_total": len(splits), "resumed": resumed,
                 "saved": saved, "bundles": None if out is None else str(Path(out) / "lora" / model),
                 "settings_diff": ctx.settings_diff, "fits": log_rows},
    })
    if out is not None:
        write_lora_report(results, out, predictions=predictions_table(
            st.cells(splits.params["datasets"]), splits, blocks))
    if not splits.saved:
        save_splits(st, splits)
    return results


def _check_ranks(rank: int | Sequence[int]) -> list[int]:
    """``rank`` as a list of distinct integers >= 1, in the order given."""
    given = [rank] if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool) else rank
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence) or not given:
        raise ScdmError(f"rank must be an integer >= 1 or a list of them (got {rank!r})",
                        f"pass e.g. rank={LORA_R} or rank=(4, 8, 16) (--rank 4 --rank 8 --rank 16)")
    bad = [r for r in given if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1]
    if bad:
        raise ScdmError(f"LoRA rank must be an integer >= 1 (got {bad[0]!r})",
                        f"pass e.g. --rank {LORA_R} (repeatable: --rank 4 --rank 8 --rank 16)")
    return list(dict.fromkeys(int(r) for r in given))


def write_lora_report(results: pd.DataFrame, out: str | Path, *, predictions: pd.DataFrame | None = None) -> dict[str, Path]:
    """``lora_results.parquet/.csv`` and ``lora_summary.csv/.md`` in ``out`` (with ``predictions``, the
    per-cell ``lora_predictions.parquet``); with the ``results.parquet`` of ``scdm-eval run`` on the
    same split there, ``combined_summary.csv/.md``."""
    from ._report import summarize, to_markdown, write_stage_tables

    out = Path(out)
    paths, plain = write_stage_tables(results, out, "lora", predictions=predictions)
    frozen = out / "results.parquet"
    if frozen.exists() and len(results):
        other = pd.read_parquet(frozen)
        lora_rows = other["classifier"].astype(str).str.match(rf"^{CLASSIFIER}(-r\d+)?$")
        other = other[~lora_rows & (other["split"] == results["split"].iloc[0])]
        if len(other):
            both = pd.concat([other, plain], ignore_index=True)
            both.attrs = {k: v for k, v in results.attrs.items() if k != "lora"}
            p = both.attrs.get("params")
            if p:
                both.attrs["params"] = {**p, "models": sorted(set(both["model"])),
                                        "classifiers": list(dict.fromkeys(both["classifier"]))}
            s = summarize(both)
            paths["combined_csv"] = out / "combined_summary.csv"
            paths["combined_md"] = out / "combined_summary.md"
            s.to_csv(paths["combined_csv"], index=False)
            paths["combined_md"].write_text(to_markdown(both, s), encoding="utf-8")
    return paths


__all__ = ["CLASSIFIER", "HEADS", "TELEMETRY_COLUMNS", "LoraSettingsWarning", "build_adapter", "check_neural",
           "classifier_name", "make_head", "run_lora", "write_lora_report"]
