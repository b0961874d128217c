"""``scdm-web``: browse a store's benchmark in a browser and predict new samples (FastAPI + uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scdm_embed.cli_support import friendly_errors, make_console

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
console = make_console()


def _default_work() -> Path:
    from scdm_embed.locations import cache_dir

    return cache_dir() / "web"


@app.command()
@friendly_errors
def serve(
    store: Annotated[Path, typer.Option("--store", "-s", help="The scdm store (datasets, models, fitted references).")],
    results: Annotated[Path, typer.Option("--results", "-r", help="Folder of `scdm-eval run` / `lora` (the leaderboard; bundles are looked for under it).")],
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the jobs database [default: SQLite file in --work].")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[str | None, typer.Option(envvar="SCDM_WEB_TOKEN", help="Access token that uploads, jobs and downloads need (set it when the app is exposed).")] = None,
    bundles: Annotated[Path | None, typer.Option(help="Folder searched for classifier bundles (`scdm-eval fit --out`) [default: --results].")] = None,
    work: Annotated[Path | None, typer.Option(help="Folder for uploads, outputs and the SQLite DB [default: ~/.cache/scdm/web].")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted (MB).")] = 500.0,
    chunk_size: Annotated[int, typer.Option(help="Cells per extraction chunk of a prediction job (its progress moves per chunk).")] = 1024,
) -> None:
    """Serve the web app: datasets and models, leaderboard, figures, upload an .h5ad -> per-cell predictions."""
    import uvicorn

    from scdm_embed.errors import ScdmError

    from .app import Settings, create_app

    if not 0 < port < 65536:
        raise ScdmError(f"--port {port} is not a TCP port", "pass --port between 1 and 65535")
    if max_upload_mb <= 0:
        raise ScdmError(f"--max-upload-mb {max_upload_mb:g} must be positive", "pass e.g. --max-upload-mb 500")
    if chunk_size < 1:
        raise ScdmError(f"--chunk-size {chunk_size} must be at least 1", "pass e.g. --chunk-size 1024")
    if bundles is not None and not bundles.is_dir():
        raise ScdmError(f"--bundles {str(bundles)!r} is not a folder", "pass the folder that holds `scdm-eval fit` bundles")
    if token is not None and len(token) < 8:
        raise ScdmError("--token is shorter than 8 characters", "pass a longer, random token (e.g. `openssl rand -hex 16`)")
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        console.print(f"[bold yellow]warning:[/] binding {host} without --token: anyone who reaches it can upload")
    settings = Settings(store=store, results=results, work=work or _default_work(), db=db, bundles=bundles,
                        token=token, max_upload_mb=max_upload_mb, chunk_size=chunk_size)
    web = create_app(settings)
    console.print(f"scdm-web on http://{host}:{port}/ (store {store}, results {results}, files in {settings.work})")
    uvicorn.run(web, host=host, port=port, log_level="warning")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
