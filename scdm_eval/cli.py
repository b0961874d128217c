"""``scdm-eval``: score cached embeddings with fast classifiers under honest splits."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from scdm_embed.cli_support import err_console, friendly_errors, make_console
from scdm_embed.store import DEFAULT_STORE

from ._choices import By, Correction, LoraHead, Protocol, Scheme, Structured, Unparsed

app = typer.Typer(
    help="Predict drug sensitivity from cached cell embeddings: fast classifiers under honest, saved splits.\n\n"
    f"Typical use: scdm-eval run --store {DEFAULT_STORE} --scheme pooled --group-key sample --out results",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
splits_app = typer.Typer(help="Show or make the saved train/test splits of a store.", no_args_is_help=True,
                         add_completion=False, pretty_exceptions_enable=False)
app.add_typer(splits_app, name="splits")
console = make_console()


Store = Annotated[Path, typer.Option("--store", "-s", help="The scdm Zarr store (from `scdm-embed extract`).")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model whose embeddings (or network, for lora) are used, as extracted into the store.")]
SchemeOpt = Annotated[Scheme, typer.Option(help="pooled: k-fold inside each category; cross: leave one study out; transfer (run): fit on --train, predict each --test dataset.")]
ByOpt = Annotated[By, typer.Option(help="all: one category; else one evaluation per value of this metadata column.")]
FoldsOpt = Annotated[int, typer.Option(help="Folds for the pooled scheme.")]
GroupOpt = Annotated[str | None, typer.Option(help="Keep each value of this column (e.g. sample) on one side of every split.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the folds and the classifiers.")]
StrictOpt = Annotated[bool, typer.Option(help="Fail instead of skipping categories that cannot be evaluated.")]


@contextlib.contextmanager
def _show_warnings() -> Iterator[None]:
    """Print user-facing warnings as ``warning: ...`` lines on stderr."""
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        if issubclass(category, UserWarning):
            err_console.print(f"[bold yellow]warning:[/] {escape(str(message))}")

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = old


@app.command()
@friendly_errors
def run(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for results.parquet/.csv, summary.md/.png.")],
    store: Store = DEFAULT_STORE,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Model to evaluate (repeatable; default: every model complete for all datasets).")] = None,
    scheme: SchemeOpt = Scheme.pooled,
    by: ByOpt = By.all,
    classifier: Annotated[list[str] | None, typer.Option("--classifier", "-c", help="mlp | xgboost | logreg | majority (repeatable; default: mlp, xgboost, logreg).")] = None,
    folds: FoldsOpt = 10,
    group_key: GroupOpt = None,
    seed: SeedOpt = 0,
    n_jobs: Annotated[int, typer.Option(help="Parallel fits: -1 or 1 = in this process, one fit at a time on all cores (MLP fits on the CPU: one per "
                                         "core at once, unless --set mlp.threads=N); k = k workers x cores/k threads.")] = -1,
    protocol: Annotated[Protocol, typer.Option(help="scdm: defaults with early stopping; scdrugmap: the released scDrugMap MLP (d-512-512-2, AdamW lr 1e-4, wd 0.01, batch 128, 10 epochs, last kept, no scaling, BCE) on random cell-level folds.")] = Protocol.scdm,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Classifier setting CLASSIFIER.KEY=VALUE, over the protocol (repeatable), e.g. --set mlp.lr=1e-4 --set xgboost.max_depth=4.")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="MLP: most training epochs (same as --set mlp.max_epochs=N).")] = None,
    strict: StrictOpt = False,
    train: Annotated[list[str] | None, typer.Option("--train", help="--scheme transfer: training cells, a dataset name or COLUMN=VALUE (repeatable; union), e.g. collection=primary.")] = None,
    test: Annotated[list[str] | None, typer.Option("--test", help="--scheme transfer: test cells (each dataset scored apart), a dataset name or COLUMN=VALUE (repeatable).")] = None,
    correct: Annotated[Correction, typer.Option(help="harmony: also score each model's embeddings Harmony-corrected on --batch-key (rows MODEL+harmony; transductive: uses the test cells' embeddings, never labels).")] = Correction.none,
    batch_key: Annotated[str, typer.Option(help="Batch column Harmony mixes (--correct harmony).")] = "study",
    permutations: Annotated[int, typer.Option(help="Label-permutation null: N refits on labels shuffled within the split's groups, same folds; p = (1+k)/(1+N) per metric (permutation.csv, summary.md).")] = 0,
    scheduler: Annotated[str | None, typer.Option(help="Run the fits as tasks on this dask.distributed scheduler (tcp://HOST:8786); each worker reads its cells from --store, which every worker must reach.")] = None,
    dask_workers: Annotated[int | None, typer.Option(help="Run the fits on a local Dask cluster of N worker processes (1 thread each).")] = None,
    stream: Annotated[bool, typer.Option(help="XGBoost fits read their cells from a local store block by block, so their "
                                         "grid never holds the slice (--no-stream: from the slice in memory, read "
                                         "once; same results).")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Fit and score classifiers on every model x partition, write the results, a summary and paired tests."""
    from ._report import rich_table, summarize
    from ._run import run_evaluation

    clfs = tuple(classifier) if classifier else ("mlp", "xgboost", "logreg")
    from ._classifiers import parse_settings

    opts = parse_settings(set_ or [])
    if max_epochs is not None and "mlp" in clfs:
        opts.setdefault("mlp", {})["max_epochs"] = max_epochs
    with _show_warnings():
        res = run_evaluation(store, models=model, scheme=scheme.value, by=by.value, classifiers=clfs, folds=folds,
                             group_key=group_key, seed=seed, n_jobs=n_jobs, out=out, classifier_options=opts or None,
                             strict=strict, progress=not quiet, protocol=protocol.value, train=train, test=test,
                             correct=correct.value, batch_key=batch_key, permutations=permutations,
                             scheduler=scheduler, dask_workers=dask_workers, stream=stream)
    console.print(rich_table(summarize(res)))
    if permutations:
        from ._stats import permutation_table

        console.print(permutation_table(res.attrs["permutation"]))
    skipped = res.attrs.get("skipped", [])
    if skipped:
        console.print(f"{len(skipped)} categor{'y' if len(skipped) == 1 else 'ies'}/partition(s) skipped (see summary.md)")
    console.print(f"{len(res)} fits; split {res.attrs['split']}; wrote {out}/results.parquet, results.csv, summary.md, summary.png")
    if (out / "stats.csv").exists():  # paired tests between models / classifiers (see `scdm-eval compare`)
        import pandas as pd

        stats = pd.read_csv(out / "stats.csv")
        console.print(f"paired tests: {len(stats)} comparisons, {int(stats['significant'].sum())} significant "
                      f"(Holm-adjusted t-test p < 0.05); wrote {out}/stats.parquet, stats.csv"
                      + (", permutation.csv" if permutations else ""))


def _lora_inputs(items: list[str] | None):
    """``--input PATH`` -> the path; ``--input DATASET=PATH`` (repeatable) -> a mapping."""
    from scdm_embed.errors import ScdmError

    if not items:
        return None
    named = [i.split("=", 1) for i in items if "=" in i and not Path(i).exists()]
    if not named:
        if len(items) > 1:
            raise ScdmError(f"{len(items)} --input paths given without dataset names", "write them as --input DATASET=PATH")
        return Path(items[0])
    if len(named) != len(items):
        raise ScdmError("--input mixes PATH and DATASET=PATH forms", "name every input as --input DATASET=PATH")
    return {k.strip(): Path(v) for k, v in named}


@app.command()
@friendly_errors
def lora(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for lora_results.parquet/.csv and lora_summary.md.")],
    store: Store = DEFAULT_STORE,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint folder (default: the one recorded at extraction).")] = None,
    input: Annotated[list[str] | None, typer.Option("--input", help="Raw input when it moved: PATH, or DATASET=PATH (repeatable).")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", help="Model option KEY=VALUE (repeatable; default: the options recorded at extraction).")] = None,
    scheme: SchemeOpt = Scheme.pooled,
    by: ByOpt = By.all,
    folds: FoldsOpt = 10,
    group_key: GroupOpt = None,
    seed: SeedOpt = 0,
    rank: Annotated[list[int] | None, typer.Option("--rank", help="LoRA rank (repeatable: --rank 4 --rank 8 --rank 16 runs the ablation; rows lora-r4, ...) [default: 8].")] = None,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scaling alpha/rank).")] = 8.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout, in [0, 1).")] = 0.05,
    targets: Annotated[list[str] | None, typer.Option("--targets", help="Module (name suffix) LoRA wraps (repeatable) [default: the model's from the paper: tgpt c_attn; scbert/celllm to_q to_k to_v; geneformer query key value; scgpt/uce out_proj; cellplm query/key/value_projection].")] = None,
    head: Annotated[LoraHead, typer.Option(help="mlp: the paper's d-512-512-2 head; linear: d-2. Trained jointly with the adapters.")] = LoraHead.mlp,
    epochs: Annotated[int, typer.Option(help="Training epochs per partition.")] = 3,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (LoRA + head).")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Cells per batch (CellPLM: the cells' shared context).")] = 16,
    grad_accum: Annotated[int, typer.Option(help="Batches whose gradients make one optimiser step.")] = 1,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="Forward under bf16 autocast (float32 master weights) [default: on CUDA yes, on CPU no].", show_default=False)] = None,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in the backward pass: less memory, same gradients, ~1/3 more compute.")] = False,
    final: Annotated[bool, typer.Option("--final", help="Also fit, per category and rank, on all its cells and save it (OUT/lora/MODEL/lora-rN/CATEGORY/final).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Retrain fits already saved in --out (default: resume, keeping finished fits).")] = False,
    token_budget: Annotated[int | None, typer.Option(help="Max padded tokens per forward; larger batches run as micro-batches [default: 4096 on CPU, 65536 on CUDA; 0 = no cap].")] = None,
    max_partitions: Annotated[int | None, typer.Option(help="Only the first N partitions (quick runs).")] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cuda, cuda:N or cpu.")] = "auto",
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Unpickle the checkpoint files in full (they can run code): only for files you know are the authors'.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """LoRA-fine-tune a foundation model + head on every partition of the saved splits, per rank (GPU stage)."""
    from scdm_embed.cli_support import parse_options

    from ._finetune import run_lora
    from ._report import rich_table, summarize

    opts = parse_options(option) if option else None
    with _show_warnings():
        res = run_lora(store, model=model, checkpoint=checkpoint, input=_lora_inputs(input), model_options=opts,
                       scheme=scheme.value, by=by.value, folds=folds, group_key=group_key, seed=seed, epochs=epochs,
                       lr=lr, batch_size=batch_size, token_budget=token_budget, rank=rank or 8, alpha=alpha,
                       dropout=dropout, targets=targets, head=head.value, grad_accum=grad_accum, bf16=bf16,
                       gradient_checkpointing=gradient_checkpointing, max_partitions=max_partitions, device=device,
                       out=out, final=final, overwrite=overwrite, progress=not quiet,
                       trust_checkpoint=trust_checkpoint)
    console.print(rich_table(summarize(res)))
    info = res.attrs.get("lora", {})
    combined = " and combined_summary.md" if (out / "combined_summary.md").exists() else ""
    resumed = f" ({info['resumed']} resumed from saved fits)" if info.get("resumed") else ""
    console.print(f"{len(res)} of {info.get('partitions_total', len(res))} partitions fine-tuned on {info.get('device')}"
                  f"{resumed}; split {res.attrs['split']}; wrote {out}/lora_results.parquet, lora_results.csv, "
                  f"lora_summary.md{combined}; fits (LoRA bundles for `scdm-eval predict`) in {info.get('bundles')}")


@app.command()
@friendly_errors
def prompt(
    llm: Annotated[str, typer.Option("--llm", help="Model name at the endpoint (e.g. gpt-4o-mini); rows are model llm:NAME.")],
    base_url: Annotated[str, typer.Option("--base-url", help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (vLLM, llama.cpp).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for llm_results.parquet/.csv, llm_summary.md, llm_predictions.parquet, llm_usage.json.")],
    store: Annotated[Path | None, typer.Option("--store", "-s", help=f"Store whose saved splits are used (default {DEFAULT_STORE} unless --input alone).")] = None,
    input: Annotated[list[str] | None, typer.Option("--input", help="Cells' counts: with --store, PATH or DATASET=PATH when the recorded input moved (repeatable); alone, an .h5ad (or registry name) whose splits are made in memory.")] = None,
    genes: Annotated[int, typer.Option(help="Top expressed genes per cell in the prompt (the paper: 10 or 100).")] = 10,
    cot: Annotated[bool, typer.Option("--cot", help="Ask for reasoning before the answer (classifier prompt-topN-cot).")] = False,
    context: Annotated[bool, typer.Option(help="Put the cells' tissue, cancer type and drug (when known) in the prompt.")] = True,
    cells_per_request: Annotated[int, typer.Option(help="Cells per request (ids c1, c2, ... in the answer).")] = 1,
    max_cells: Annotated[int | None, typer.Option(help="Ask about at most this many test cells (cost cap): a seeded subset stratified by (partition, class), so every partition keeps a cell of each class it has while the cap allows (>= 2 per partition), the rest in proportion.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Completion token cap per request [default: 24, 384 with --cot; +16 per cell with several per request].")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: deterministic where the endpoint is).")] = 0.0,
    scheme: SchemeOpt = Scheme.pooled,
    by: ByOpt = By.all,
    folds: FoldsOpt = 10,
    group_key: GroupOpt = None,
    seed: SeedOpt = 0,
    strict: StrictOpt = False,
    structured: Annotated[Structured, typer.Option(help="Structured output: auto probes json_schema (OpenAI, vLLM), then json_object + schema (llama.cpp), then text; remembered per endpoint.")] = Structured.auto,
    unparsed: Annotated[Unparsed, typer.Option(help="Score an unparsed answer as wrong (P(sensitive) = 1 - truth) or neutral (0.5); counted per fold either way.")] = Unparsed.wrong,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the API key [default: OPENAI_API_KEY when set; local servers need none].")] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at a time.")] = 4,
    retries: Annotated[int, typer.Option(help="Retries of a request on 429 / 5xx / time-out / lost connection (exponential back-off).")] = 5,
    backoff: Annotated[float, typer.Option(help="First back-off in seconds (doubles each retry; a Retry-After header wins).")] = 1.0,
    timeout: Annotated[float, typer.Option(help="Seconds before a request times out (then it is retried).")] = 120.0,
    cache: Annotated[Path | None, typer.Option(help="Response cache folder [default: $SCDM_CACHE_DIR/llm, ~/.cache/scdm/llm].")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the requests and estimated tokens; send nothing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Ask a chat LLM, per test cell of the saved splits, whether the cell is drug-sensitive or resistant."""
    from ._prompt import describe_plan, plan_prompting, run_prompting
    from ._report import rich_table, summarize

    inp = _lora_inputs(input)
    if store is None and inp is None:
        store = DEFAULT_STORE
    kw = dict(llm=llm, input=inp, genes=genes, cot=cot, context=context, cells_per_request=cells_per_request,
              max_cells=max_cells, max_tokens=max_tokens, temperature=temperature, scheme=scheme.value, by=by.value,
              folds=folds, group_key=group_key, seed=seed, strict=strict, structured=structured.value, cache=cache)
    with _show_warnings():
        if dry_run:
            console.print(describe_plan(plan_prompting(store, base_url=base_url, **kw)), markup=False)
            return
        res = run_prompting(store, base_url=base_url, unparsed=unparsed.value, api_key_env=api_key_env,
                            concurrency=concurrency, retries=retries, backoff=backoff, timeout=timeout, out=out,
                            progress=not quiet, **kw)
    console.print(rich_table(summarize(res)))
    info = res.attrs["llm"]
    u = info["usage"]
    console.print(f"{u['cells']} cells in {u['requests']} requests ({u['sent']} sent, {u['cached']} cached, "
                  f"{u['retries']} retries; structured output: {info['structured']}); {u['unparsed']} unparsed "
                  f"(scored {info['unparsed']}); tokens spent: {u['spent_prompt_tokens']} prompt + "
                  f"{u['spent_completion_tokens']} completion; split {res.attrs['split']}; wrote {out}/llm_results.parquet, "
                  "llm_summary.md, llm_predictions.parquet, llm_usage.json")


@app.command()
@friendly_errors
def fit(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the bundle (bundle.json + safetensors / model.ubj).")],
    store: Store = DEFAULT_STORE,
    classifier: Annotated[str, typer.Option("--classifier", "-c", help="mlp | xgboost | logreg | majority.")] = "logreg",
    dataset: Annotated[list[str] | None, typer.Option("--dataset", "-d", help="Train on this dataset (repeatable; default: every dataset with the model's embeddings).")] = None,
    by: ByOpt = By.all,
    category: Annotated[list[str] | None, typer.Option("--category", help="Train on cells whose --by column has this value (repeatable).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Classifier setting KEY=VALUE or CLASSIFIER.KEY=VALUE (repeatable), e.g. --set lr=1e-4.")] = None,
    seed: SeedOpt = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a bundle already in --out.")] = False,
) -> None:
    """Train a classifier on all selected cells and save it as a bundle (no pickle) with the embedding's provenance."""
    from ._bundle import fit_classifier

    b = fit_classifier(store, model=model, classifier=classifier, out=out, datasets=dataset, by=by.value,
                       category=category, settings=_fit_settings(classifier, set_), seed=seed, overwrite=overwrite)
    t = b.meta["training"]
    console.print(f"fitted {b.meta['classifier']} on {t['n_cells']} {model} cells ({t['sensitive']} sensitive / "
                  f"{t['resistant']} resistant; datasets {', '.join(t['datasets'])}); wrote {out}")


def _fit_settings(classifier: str, items: list[str] | None) -> dict[str, str]:
    """``--set`` items of ``fit``: ``KEY=VALUE`` or ``CLASSIFIER.KEY=VALUE`` for the fitted classifier."""
    from scdm_embed.errors import ScdmError

    out: dict[str, str] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        clf, dot, name = key.strip().rpartition(".")
        if not eq or not name.strip():
            raise ScdmError(f"--set {item!r} is not KEY=VALUE", "write it as e.g. --set lr=1e-4")
        if dot and clf != classifier:
            raise ScdmError(f"--set {item!r} is for {clf!r}, but the classifier is {classifier!r}",
                            f"write it as --set {classifier}.KEY=VALUE (or KEY=VALUE)")
        out[name.strip()] = value.strip()
    return out


@app.command()
@friendly_errors
def predict(
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="Bundle folder from `scdm-eval fit`, or a LoRA fit folder from `scdm-eval lora` (OUT/lora/MODEL/lora-rN/CATEGORY/fold-K or final).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Per-cell predictions (.parquet or .csv).")],
    store: Annotated[Path | None, typer.Option("--store", "-s", help="Store holding the cells' embeddings (with --input: where to embed them; needed for pca/hvg). LoRA bundles: the store whose --dataset's recorded raw input to embed.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset to predict (with --input: its name, default the file name).")] = None,
    input: Annotated[Path | None, typer.Option("--input", help="Raw cells (.h5ad) to embed with the bundle's model first (LoRA bundles with --store: where the dataset's recorded input file is now).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="With --input: the model's checkpoint folder (default: the bundle's recorded one; LoRA bundles: the base checkpoint, refused when its hash differs).")] = None,
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Unpickle the checkpoint files in full (they can run code): only for files you know are the authors'.")] = False,
) -> None:
    """Predict drug sensitivity per cell with a saved classifier (refuses embeddings computed differently)."""
    from ._bundle import predict as run_predict

    res = run_predict(bundle, store, dataset=dataset, input=input, checkpoint=checkpoint,
                      trust_checkpoint=trust_checkpoint, out=out)
    n1 = int((res["predicted"] == "sensitive").sum())
    console.print(f"{len(res)} cells of {res['dataset'].iloc[0] if len(res) else dataset}: {n1} predicted sensitive, "
                  f"{len(res) - n1} resistant; wrote {out}")


@app.command()
@friendly_errors
def compare(
    results: Annotated[Path, typer.Option("--results", "-r", help="The --out folder of `scdm-eval run` (or its results.parquet).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for stats.parquet/.csv and the summary.md section [default: beside the results].")] = None,
) -> None:
    """Paired tests between models and classifiers over the same folds (t-test, Wilcoxon, Holm, d_z)."""
    from ._stats import compare_results, stats_table

    stats = compare_results(results, out=out)
    console.print(stats_table(stats))
    where = out if out is not None else (results if results.is_dir() else results.parent)
    console.print(f"{len(stats)} comparisons, {int(stats['significant'].sum())} significant (Holm-adjusted paired "
                  f"t-test p < 0.05); wrote {where}/stats.parquet, stats.csv, summary.md")


@app.command()
@friendly_errors
def report(
    results: Annotated[Path, typer.Option("--results", "-r", help="Folder of `scdm-eval run` / `lora` / `prompt` (results.parquet, lora_results.parquet, llm_results.parquet).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.html and the figures (PNG + SVG).")],
    store: Annotated[Path | None, typer.Option("--store", "-s", help="The store the results came from: UMAPs (cached in it), compute table, provenance.")] = None,
    metric: Annotated[str, typer.Option(help="Metric that ranks the models (recommendation table, radars).")] = "auroc",
    umap: Annotated[bool, typer.Option(help="UMAP of each model's embeddings (needs --store).")] = True,
    max_cells: Annotated[int, typer.Option(help="UMAPs above this many cells use a random subsample (said on the figure).")] = 50_000,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress messages.")] = False,
) -> None:
    """Write one self-contained HTML report (inline SVG figures, tables, provenance) + PNG/SVG figure files."""
    from scdm_embed.errors import ScdmError

    from ._html import write_html_report
    from ._metrics import METRICS

    if metric not in METRICS:
        raise ScdmError(f"--metric {metric!r} is not a metric", f"pick one of: {', '.join(METRICS)}")
    if max_cells < 10:
        raise ScdmError(f"--max-cells {max_cells} is too small for a UMAP", "pass --max-cells 10 or more")
    paths = write_html_report(results, out=out, store=store, metric=metric, umap=umap, max_umap_cells=max_cells,
                              progress=not quiet)
    n_fig = sum(1 for k in paths if k.endswith("_svg"))
    console.print(f"wrote {paths['html']} ({n_fig} figures as PNG + SVG in {out})")


@splits_app.command("make")
@friendly_errors
def splits_make(
    store: Store = DEFAULT_STORE,
    scheme: SchemeOpt = Scheme.pooled,
    by: ByOpt = By.all,
    folds: FoldsOpt = 10,
    group_key: GroupOpt = None,
    seed: SeedOpt = 0,
    strict: StrictOpt = False,
    overwrite: Annotated[bool, typer.Option(help="Recompute even when these splits are saved.")] = False,
) -> None:
    """Compute the splits of the store's cells and save them (or load the saved ones)."""
    from ._splits import make_splits

    with _show_warnings():
        s = make_splits(store, scheme=scheme.value, by=by.value, folds=folds, group_key=group_key, seed=seed,
                        strict=strict, overwrite=overwrite)
    console.print(_partitions_table(s))


@splits_app.command("show")
@friendly_errors
def splits_show(
    store: Store = DEFAULT_STORE,
    name: Annotated[str | None, typer.Option(help="Show the partitions of this split.")] = None,
) -> None:
    """List the splits saved in the store, or the partitions of one."""
    from scdm_embed.errors import ScdmError

    from ._splits import list_splits, load_splits

    if name is None:
        df = list_splits(store)
        if not len(df):
            console.print("no saved splits (they are made by `scdm-eval run` or `scdm-eval splits make`)")
            return
        t = Table(title=f"splits in {store}")
        t.add_column("name", no_wrap=True)
        for c in ("cells", "partitions", "skipped", "created"):
            t.add_column(c, justify="right" if c != "created" else "left")
        for r in df.itertuples(index=False):
            t.add_row(r.name, str(r.n_cells), str(r.partitions), str(r.skipped), str(r.created or "")[:16])
        console.print(t)
        console.print("names: scheme-by-k<folds>-<group key|cells>-s<seed>-<cell hash> (pooled), "
                      "cross-by-<study key>-<cell hash> (cross); show one with --name")
        return
    s = load_splits(store, name)
    if s is None:
        raise ScdmError(f"no split named {name!r} in {str(store)!r}", "list them with `scdm-eval splits show --store PATH`")
    console.print(_partitions_table(s))


def _partitions_table(s) -> Table:
    t = Table(title=f"{s.name}: {len(s.table)} cells, {len(s)} partitions")
    for c in ("category", "partition", "train (sens/res)", "test (sens/res)", "skipped"):
        t.add_column(c)
    for r in s.partitions.itertuples(index=False):
        t.add_row(escape(str(r.category)), escape(str(r.name)) or "-",
                  f"{r.n_train} ({r.train_sensitive}/{r.train_resistant})",
                  f"{r.n_test} ({r.test_sensitive}/{r.test_resistant})", escape(str(r.skipped)))
    return t


def main() -> None:
    app()


if __name__ == "__main__":
    main()
