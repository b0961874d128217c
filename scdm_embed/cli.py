"""``scdm-embed``: compute foundation-model cell embeddings once, into a Zarr store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .cli_support import friendly_errors, make_console, parse_options
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
) -> None:
    """Embed every cell of INPUT with one model and write the array to the store.

    Re-running the same command resumes an interrupted extraction and skips a finished one.
    """
    from ._engine import extract as _extract
    from .datasets import resolve

    keys = {"study": study_key, "sample": sample_key, "tissue": tissue_key, "cancer_type": cancer_type_key,
            "drug": drug_key, "drug_type": drug_type_key, "regimen": regimen_key}
    labels = LabelSpec(key=response_key, sensitive=tuple(sensitive or DEFAULT_SENSITIVE), resistant=tuple(resistant or DEFAULT_RESISTANT))
    r = _extract(resolve(input), model=model, store=store, dataset=dataset, checkpoint=checkpoint, labels=labels,
                 meta_keys={k: v for k, v in keys.items() if v is not None}, gene_key=gene_key, layer=layer,
                 batch_size=batch_size, token_budget=token_budget, chunk_size=chunk_size, device=device, dtype=dtype,
                 store_dtype=store_dtype, min_overlap=min_overlap, reference=reference, overwrite=overwrite,
                 progress=not quiet, model_options=parse_options(option), trust_checkpoint=trust_checkpoint,
                 allow_single_class=allow_single_class)
    ov = r.overlap
    if r.status == "up-to-date":
        console.print(f"{r.model}/{r.dataset}: already complete in {r.store} (nothing to do)")
    elif r.status == "metadata-updated":
        console.print(f"{r.model}/{r.dataset}: metadata-updated: the cell table (labels, study, ...) changed and was "
                      f"rewritten; embeddings are current (same counts, genes and cells) -> {r.store}")
    else:
        console.print(f"{r.model}/{r.dataset}: {r.status}, {r.n_cells} cells x {r.dim} dims, {r.chunks_computed} chunks "
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


def main() -> None:  # console-script entry point
    app()
