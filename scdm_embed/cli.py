"""``scdm-embed``: compute foundation-model cell embeddings once, into a Zarr store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .cli_support import friendly_errors, make_console, parse_options
from .errors import ScdmError
from .genes import DEFAULT_MIN_OVERLAP
from .inputs import DEFAULT_RESISTANT, DEFAULT_SENSITIVE, LabelSpec
from .store import DEFAULT_STORE

app = typer.Typer(
    help="Compute single-cell foundation-model embeddings ONCE and cache them in a Zarr store.\n\n"
    f"Typical use: scdm-embed extract cells.h5ad --model pca --store {DEFAULT_STORE}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = make_console()

Store = Annotated[Path, typer.Option("--store", "-s", help="Zarr store to write into (created if absent).")]


@app.command()
@friendly_errors
def extract(
    input: Annotated[str, typer.Argument(help="AnnData (.h5ad or .zarr) with raw counts, or a registry dataset name (see `datasets`).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (see `list-models`).")],
    store: Store = DEFAULT_STORE,
    dataset: Annotated[str | None, typer.Option(help="Name of the dataset in the store [default: the file's stem].")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Directory of the model's official checkpoint.")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Model option KEY=VALUE (repeatable), e.g. layer=-2.")] = None,
    response_key: Annotated[str, typer.Option(help="obs column with the drug response.")] = "response",
    sensitive: Annotated[list[str] | None, typer.Option(help="Value(s) meaning sensitive (repeatable) [default: sensitive, 1, responder, ...].")] = None,
    resistant: Annotated[list[str] | None, typer.Option(help="Value(s) meaning resistant (repeatable) [default: resistant, 0, non-responder, ...].")] = None,
    study_key: Annotated[str | None, typer.Option(help="obs column naming the study [default: 'study' if present].")] = None,
    sample_key: Annotated[str | None, typer.Option(help="obs column naming the sample/patient [default: 'sample' if present].")] = None,
    tissue_key: Annotated[str | None, typer.Option(help="obs column for tissue.")] = None,
    cancer_type_key: Annotated[str | None, typer.Option(help="obs column for cancer type.")] = None,
    drug_key: Annotated[str | None, typer.Option(help="obs column for drug.")] = None,
    drug_type_key: Annotated[str | None, typer.Option(help="obs column for drug type.")] = None,
    regimen_key: Annotated[str | None, typer.Option(help="obs column for regimen.")] = None,
    gene_key: Annotated[str | None, typer.Option(help="var column with gene ids [default: var_names]; symbols or Ensembl ids.")] = None,
    layer: Annotated[str | None, typer.Option(help="Read counts from this layer instead of X.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Cells per forward pass [default: the model's].")] = None,
    token_budget: Annotated[int | None, typer.Option(help="Max padded tokens per batch (length-bucketed batches) [default: 4096 on CPU, 65536 on CUDA; 0 = no cap].")] = None,
    chunk_size: Annotated[int, typer.Option(help="Cells per stored chunk (the unit of resume).")] = 1024,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N].")] = "auto",
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto | float32 | bfloat16 | float16.")] = "auto",
    store_dtype: Annotated[str, typer.Option(help="Stored dtype: float32 | float16.")] = "float32",
    min_overlap: Annotated[float, typer.Option(help="Refuse when the dataset and the model's vocabulary share less than this.")] = DEFAULT_MIN_OVERLAP,
    reference: Annotated[Path | None, typer.Option(help="pca/hvg: fit genes/basis on this AnnData instead of the first dataset.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Recompute: replace embeddings computed from another input or checkpoint, or a damaged array.")] = False,
    allow_single_class: Annotated[bool, typer.Option("--allow-single-class", help="Accept a dataset whose cells are all sensitive (or all resistant), to be pooled in the store with datasets that hold the other class.")] = False,
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Unpickle the checkpoint files in full (they can run code): only for files you know are the authors'. Default: a restricted loader that refuses code.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    qc: Annotated[str | None, typer.Option(help="Cell QC before embedding: 'paper' = the seed paper's (> 500 genes, mitochondrial fraction < 10%); recorded in the dataset and provenance (see `scdm-embed qc`).")] = None,
    shard: Annotated[str | None, typer.Option(help="Compute only shard i/n of the chunks (chunk c where c % n == i), into the same store as the other shards, concurrently (e.g. a Slurm array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); the last shard marks the array complete.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Run the shards as tasks on this dask.distributed scheduler (tcp://HOST:8786); input and store must be reachable by every worker.")] = None,
    dask_workers: Annotated[int | None, typer.Option(help="Run the shards on a local Dask cluster of N worker processes.")] = None,
    shards: Annotated[int | None, typer.Option(help="With --scheduler/--dask-workers: number of shards [default: one per worker thread].")] = None,
    dask_resource: Annotated[list[str] | None, typer.Option(help="With --scheduler: a Dask resource each shard needs, NAME=AMOUNT (repeatable), e.g. GPU=1 for workers started with --resources GPU=1.")] = None,
) -> None:
    """Embed every cell of INPUT with one model and write the array to the store.

    Re-running the same command resumes an interrupted extraction and skips a finished one.
    """
    from ._engine import extract as _extract
    from .datasets import resolve

    keys = {"study": study_key, "sample": sample_key, "tissue": tissue_key, "cancer_type": cancer_type_key,
            "drug": drug_key, "drug_type": drug_type_key, "regimen": regimen_key}
    labels = LabelSpec(key=response_key, sensitive=tuple(sensitive or DEFAULT_SENSITIVE), resistant=tuple(resistant or DEFAULT_RESISTANT))
    if qc is not None and (scheduler is not None or dask_workers is not None):
        raise ScdmError("--qc runs in one process", "write the QC'd cells first (`scdm-embed qc IN --out qc.h5ad`), "
                        "then extract qc.h5ad on Dask")
    if scheduler is not None or dask_workers is not None:
        from ._dask import extract_on_dask, parse_resources

        if shard is not None:
            raise ScdmError("--shard is for one process; with --scheduler/--dask-workers the shards are made for you",
                            "drop --shard (use --shards N to choose how many)")
        results = extract_on_dask(
            resolve(input), model=model, store=store, scheduler=scheduler, dask_workers=dask_workers, shards=shards,
            resources=parse_resources(dask_resource), dataset=dataset, progress=not quiet, checkpoint=checkpoint,
            labels=labels, meta_keys={k: v for k, v in keys.items() if v is not None}, gene_key=gene_key, layer=layer,
            batch_size=batch_size, token_budget=token_budget, chunk_size=chunk_size, device=device, dtype=dtype,
            store_dtype=store_dtype, min_overlap=min_overlap, reference=reference, overwrite=overwrite,
            model_options=parse_options(option), trust_checkpoint=trust_checkpoint,
            allow_single_class=allow_single_class)
        r = results[0]
        done = sum(x.chunks_computed for x in results)
        state = "complete" if any(x.complete for x in results) else "incomplete (re-run to resume)"
        console.print(f"{r.model}/{r.dataset}: {len(results)} shards on Dask, {done} chunks computed, "
                      f"{r.n_cells} cells x {r.dim} dims, {state} -> {r.store}")
        return
    if shards is not None or dask_resource:
        raise ScdmError("--shards and --dask-resource need --scheduler or --dask-workers",
                        "add --dask-workers N (local) or --scheduler tcp://HOST:8786, or use --shard i/n per process")
    r = _extract(resolve(input), model=model, store=store, dataset=dataset, checkpoint=checkpoint, labels=labels,
                 meta_keys={k: v for k, v in keys.items() if v is not None}, gene_key=gene_key, layer=layer,
                 batch_size=batch_size, token_budget=token_budget, chunk_size=chunk_size, device=device, dtype=dtype,
                 store_dtype=store_dtype, min_overlap=min_overlap, reference=reference, overwrite=overwrite,
                 progress=not quiet, model_options=parse_options(option), trust_checkpoint=trust_checkpoint,
                 allow_single_class=allow_single_class, shard=shard, qc=qc)
    ov = r.overlap
    if r.status == "up-to-date":
        console.print(f"{r.model}/{r.dataset}: already complete in {r.store} (nothing to do)")
    elif r.status == "metadata-updated":
        console.print(f"{r.model}/{r.dataset}: metadata-updated: the cell table (labels, study, ...) changed and was "
                      f"rewritten; embeddings are current (same counts, genes and cells) -> {r.store}")
    elif not r.complete:
        console.print(f"{r.model}/{r.dataset}: shard {r.shard} {r.status}, {r.chunks_computed} chunks in {r.seconds:.1f}s; "
                      f"other shards' chunks are still missing (the last shard, or `scdm-embed finalize`, marks it "
                      f"complete) -> {r.store}")
    else:
        status = r.status if r.shard is None else f"shard {r.shard} {r.status} (the last shard: array complete)"
        console.print(f"{r.model}/{r.dataset}: {status}, {r.n_cells} cells x {r.dim} dims, {r.chunks_computed} chunks "
                      f"in {r.seconds:.1f}s ({format_rate(r.cells_per_s)}) -> {r.store}")
    console.print(f"gene overlap: model uses {ov['n_data_used']}/{ov['n_data']} dataset genes; "
                  f"{ov['n_vocab_in_data']}/{ov['n_vocab']} vocabulary genes present")


def format_rate(cells_per_s: float) -> str:
    """A throughput as people read it: 3 significant digits, "s/cell" below 1 cell/s."""
    if not cells_per_s > 0:
        return "- cells/s"
    if cells_per_s >= 1:
        return f"{cells_per_s:.0f} cells/s" if cells_per_s >= 100 else f"{cells_per_s:.3g} cells/s"
    return f"{1 / cells_per_s:.3g} s/cell"


@app.command()
@friendly_errors
def finalize(
    dataset: Annotated[str, typer.Option(help="The dataset whose array to mark complete.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The model whose array to mark complete.")],
    store: Store = DEFAULT_STORE,
) -> None:
    """Mark a sharded extraction complete once every chunk is done (refuses, listing the missing chunks)."""
    from ._shard import finalize as _finalize

    r = _finalize(store, model=model, dataset=dataset)
    what = "was already complete" if r.status == "already-complete" else "is complete"
    console.print(f"{r.model}/{r.dataset}: all {r.n_chunks} chunks done; the array {what} -> {r.store}")


@app.command("qc")
@friendly_errors
def qc_command(
    input: Annotated[Path, typer.Argument(help="AnnData (.h5ad or .zarr) with raw counts.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The filtered cells (.h5ad; the report in uns['scdm_qc']).")],
    min_genes: Annotated[int, typer.Option(help="Keep cells with MORE than this many detected genes (the paper: nFeature_RNA > 500).")] = 500,
    max_mito: Annotated[float, typer.Option(help="Keep cells whose mitochondrial fraction of counts is BELOW this (the paper: percent.mt < 10%; 1 = off).")] = 0.10,
    sample_key: Annotated[str | None, typer.Option(help="obs column the report is broken down by [default: 'sample', else 'study'].")] = None,
    response_key: Annotated[str, typer.Option(help="obs column with the drug response (class check; skipped when absent).")] = "response",
    sensitive: Annotated[list[str] | None, typer.Option(help="Value(s) meaning sensitive (repeatable).")] = None,
    resistant: Annotated[list[str] | None, typer.Option(help="Value(s) meaning resistant (repeatable).")] = None,
    min_cells_per_class: Annotated[int, typer.Option(help="Refuse when QC leaves a class fewer cells than this.")] = 10,
    gene_key: Annotated[str | None, typer.Option(help="var column with gene ids [default: var_names]; symbols or Ensembl ids.")] = None,
    layer: Annotated[str | None, typer.Option(help="Read counts from this layer instead of X.")] = None,
) -> None:
    """Filter cells as the seed paper did (> 500 genes, < 10% mitochondrial counts) and report what each rule removed per sample."""
    import warnings

    from .qc import qc_file

    labels = LabelSpec(key=response_key, sensitive=tuple(sensitive or DEFAULT_SENSITIVE),
                       resistant=tuple(resistant or DEFAULT_RESISTANT))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = qc_file(input, out, min_genes=min_genes, max_mito=max_mito, sample_key=sample_key, labels=labels,
                         min_cells_per_class=min_cells_per_class, gene_key=gene_key, layer=layer)
    console.print(report.rich_table())
    for w in caught:
        if issubclass(w.category, UserWarning):
            console.print(f"[bold yellow]warning:[/] {w.message}")
    kept = ", ".join(f"{k} {v['kept']}/{v['cells']}" for k, v in report.classes.items())
    console.print(f"kept {report.n_kept} of {report.n_in} cells{f' ({kept})' if kept else ''}; wrote {out}")


@app.command("list-models")
@friendly_errors
def list_models(
    options: Annotated[bool, typer.Option("--options", help="Also list each model's options (name, type, default, help).")] = False,
) -> None:
    """List the registered models and what their checkpoints must hold."""
    from .models import available_models, get_adapter

    t = Table("model", "checkpoint", "description")
    for name in available_models():
        a = get_adapter(name)
        t.add_row(name, a.checkpoint_layout or "(none: fitted per store)", a.description)
    console.print(t)
    if not options:
        return
    for name in available_models():
        spec = get_adapter(name).options_spec
        if not spec:
            console.print(f"{name}: no options")
            continue
        ot = Table(title=f"{name} options (--option KEY=VALUE)", title_justify="left")
        ot.add_column("option", no_wrap=True)
        ot.add_column("type", no_wrap=True)
        ot.add_column("default")
        ot.add_column("help")
        for o in spec:
            default = "(unset)" if o.default is None else str(o.default)
            info = o.help + (f" [one of: {', '.join(map(str, o.choices))}]" if o.choices else "")
            ot.add_row(o.name, o.type_name, default, info)
        console.print(ot)


@app.command()
@friendly_errors
def inspect(
    store: Annotated[Path, typer.Argument(help="The Zarr store to describe.")] = DEFAULT_STORE,
    provenance: Annotated[bool, typer.Option("--provenance", "-p", help="Also print each array's full provenance.")] = False,
) -> None:
    """Show what a store holds: datasets, model x dataset arrays, completeness and provenance."""
    from ._inspect import describe_store

    describe_store(store, console=console, provenance=provenance)


@app.command()
@friendly_errors
def migrate(
    store: Annotated[Path, typer.Argument(help="The Zarr store to upgrade in place.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would change.")] = False,
) -> None:
    """Upgrade a store written by an older scdm to the current format (attributes only; embeddings are kept)."""
    from .store import migrate_store

    m = migrate_store(store, dry_run=dry_run)
    for line in m.changes:
        console.print(f"{'would upgrade' if dry_run else 'upgraded'} {line}")
    for line in m.kept:
        console.print(f"kept {line}")
    if not m.changes:
        console.print(f"{store}: already format {m.to_version}, nothing to migrate")
    elif not dry_run:
        console.print(f"{store}: format {m.from_version} -> {m.to_version}")


@app.command()
@friendly_errors
def datasets(
    fetch: Annotated[str | None, typer.Option(help="Fetch (or seed from shared/) this registry dataset and print its path.")] = None,
) -> None:
    """List the registry's real datasets (use a name in place of INPUT)."""
    from . import datasets as reg

    if fetch:
        console.print(str(reg.fetch(fetch)))
        return
    t = Table("name", "cells", "description")
    for d in reg.REGISTRY.values():
        t.add_row(d.name, str(d.n_cells), d.description)
    console.print(t)


@app.command()
@friendly_errors
def export(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset of the store to export.")],
    store: Annotated[Path, typer.Option("--store", "-s", help="The scdm Zarr store.")] = DEFAULT_STORE,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Model to export as obsm['X_<model>'] (repeatable; default: every complete one).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The .h5ad to write (replaced atomically).")] = None,
    results: Annotated[Path | None, typer.Option(help="A `scdm-eval run` --out folder: add per-cell p_sensitive_<model>_<classifier> columns.")] = None,
    into: Annotated[Path | None, typer.Option(help="Your own .h5ad: add the arrays to it by cell id (in place, or to --out); refused when the cell ids differ.")] = None,
) -> None:
    """Write a dataset's embeddings as AnnData (obsm['X_<model>'], obs, provenance in uns['scdm']) for scanpy."""
    from ._export import export_anndata

    path = export_anndata(store, dataset, out=out, models=model, results=results, into=into)
    console.print(f"wrote {path}")


@app.command("import")
@friendly_errors
def import_(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset of the store the embeddings belong to (its cells must match).")],
    name: Annotated[str, typer.Option("--name", "-n", help="Stored as model external:<name> (letters, digits, . _ -).")],
    store: Annotated[Path, typer.Option("--store", "-s", help="The scdm Zarr store.")] = DEFAULT_STORE,
    input: Annotated[Path | None, typer.Option("--input", "-i", help="An .h5ad holding the embeddings in obsm (with --obsm).")] = None,
    obsm: Annotated[str | None, typer.Option(help="The obsm key to import, e.g. X_scVI.")] = None,
    npy: Annotated[Path | None, typer.Option(help="A .npy cells x dims matrix (with --cell-ids).")] = None,
    cell_ids: Annotated[Path | None, typer.Option(help="Text file of the .npy rows' cell ids, one a line.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier import of the same name.")] = False,
) -> None:
    """Import embeddings computed elsewhere as model external:<name>, scored by scdm-eval like any other."""
    from ._import import import_embeddings

    r = import_embeddings(store, dataset, name=name, input=input, obsm=obsm, npy=npy, cell_ids=cell_ids,
                          overwrite=overwrite)
    console.print(f"{r.model}/{r.dataset}: imported {r.n_cells} cells x {r.dim} dims -> {store}; "
                  f"evaluate with `scdm-eval run --store {store} --model {r.model} --out results/`")


@app.command()
@friendly_errors
def checkpoints(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Show this model's files and layout in full.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the catalogue (or the --model entry) as JSON.")] = False,
) -> None:
    """Where each model's official checkpoint comes from, the files and layout its adapter expects, the licence."""
    import json

    from ._download import catalogue, checkpoint_entry

    entries = [checkpoint_entry(model)] if model else list(catalogue().values())
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in entries], indent=1))
        return
    if model:
        e = entries[0]
        console.print(f"{e.model}: {e.title}\nsource: {e.where}\nlicence: {e.licence}\n"
                      f"layout cross-checked: {'yes' if e.verified else 'no'}\n{e.notes}")
        t = Table("file in --checkpoint DIR", "at the source", "required", "size", "sha256")
        for f in e.files:
            alt = f" (or {', '.join(f.alternatives)})" if f.alternatives else ""
            t.add_row(f.path + alt, f.remote, "yes" if f.required else "optional",
                      "-" if f.size is None else str(f.size), f.sha256 or "-")
        console.print(t)
        return
    t = Table("model", "source", "files (required/all)", "licence", "verified")
    for e in entries:
        t.add_row(e.model, e.where, f"{sum(f.required for f in e.files)}/{len(e.files)}", e.licence,
                  "yes" if e.verified else "no")
    console.print(t)
    console.print("details: scdm-embed checkpoints --model NAME; fetch: scdm-embed download NAME --to DIR")


@app.command()
@friendly_errors
def download(
    model: Annotated[str, typer.Argument(help="Model whose official checkpoint to fetch (see `checkpoints`).")],
    to: Annotated[Path, typer.Option("--to", help="Folder to lay the files out in (created if absent); pass it as --checkpoint.")],
    revision: Annotated[str | None, typer.Option(help="Hugging Face revision (branch, tag or commit) [default: the catalogue's].")] = None,
    mirror: Annotated[str | None, typer.Option(help="HTTP(S) mirror serving <URL>/<model>/<path> (and optionally SHA256SUMS) [default: $SCDM_CHECKPOINT_MIRROR].")] = None,
    optional: Annotated[bool, typer.Option("--optional", help="Also fetch the optional files from Hugging Face.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Fetch a model's official files, verify sizes/checksums, lay them out as its adapter expects.

    An interrupted download resumes on the next run; a file that fails verification is deleted and refused.
    """
    import os

    from ._download import MIRROR_ENV, checkpoint_entry, download_checkpoint
    from .errors import InputError

    hub = checkpoint_entry(model).kind == "huggingface" and not (mirror or os.environ.get(MIRROR_ENV))
    if hub and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise InputError("HF_HUB_OFFLINE is set in your environment, so nothing can be fetched from Hugging Face",
                         "unset HF_HUB_OFFLINE for this command, or pass --mirror URL")
    r = download_checkpoint(model, to=to, revision=revision, mirror=mirror, include_optional=optional)
    if not quiet:
        for f in r.fetched:
            console.print(f"fetched {f}")
        for f in r.kept:
            console.print(f"verified {f} (already there)")
    console.print(f"{model}: ready; use --checkpoint {r.checkpoint}")


def main() -> None:  # console-script entry point
    app()
