"""The checkpoint catalogue (``scdm-embed checkpoints``) and verified downloads (``scdm-embed download``).

The catalogue is one data file, ``models/checkpoints.json``: per model, the official source
(a Hugging Face repository or a page to fetch by hand), the files the adapter expects and
where each goes inside ``--checkpoint DIR``, sizes and sha256 where published, the licence.

A download never leaves a file that could be used half-written: bytes go to ``<file>.part``
(resumed with an HTTP ``Range`` request on the next run), and only a file whose size and
sha256 (where known) match is renamed into place; a mismatching file is deleted and refused.
Sources, in order:

* ``--mirror URL`` / ``$SCDM_CHECKPOINT_MIRROR``: a plain HTTP(S) mirror laid out as
  ``<URL>/<model>/<path>`` (the folder layout itself). It may publish ``<URL>/<model>/SHA256SUMS``
  (``sha256sum`` format), checked for every file the catalogue gives no checksum for;
* a Hugging Face repository: ``huggingface_hub.hf_hub_download`` (``--revision``; ``HF_ENDPOINT``
  selects another hub), which verifies the repository's own hashes;
* anything else (Google Drive, figshare, Dropbox pages): refused with where to fetch it by hand.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import CheckpointError, InputError
from .models.base import sha256_file as _sha256

CATALOGUE = Path(__file__).parent / "models" / "checkpoints.json"
#: environment variable naming a mirror (same as ``--mirror``)
MIRROR_ENV = "SCDM_CHECKPOINT_MIRROR"
_BLOCK = 1 << 20
_TIMEOUT_S = 60


@dataclass(frozen=True)
class CheckpointFile:
    """One file of a checkpoint folder."""

    path: str
    remote: str
    required: bool = True
    size: int | None = None
    sha256: str | None = None
    alternatives: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class CheckpointEntry:
    """A model's entry in the catalogue."""

    model: str
    title: str
    source: dict[str, Any]
    licence: str
    files: tuple[CheckpointFile, ...]
    verified: bool
    homepage: str = ""
    paper: str = ""
    notes: str = ""

    @property
    def kind(self) -> str:
        """``none`` | ``huggingface`` | ``manual``."""
        return str(self.source.get("kind", "manual"))

    @property
    def where(self) -> str:
        """The source as people read it: a repository id or a URL."""
        if self.kind == "huggingface":
            return f"hf:{self.source['repo_id']}@{self.source.get('revision', 'main')}"
        return str(self.source.get("url", "-"))

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``--json``)."""
        return {"model": self.model, "title": self.title, "source": self.source, "licence": self.licence,
                "homepage": self.homepage, "paper": self.paper, "verified": self.verified, "notes": self.notes,
                "files": [{**f.__dict__, "alternatives": list(f.alternatives)} for f in self.files]}


@lru_cache(maxsize=1)
def catalogue() -> dict[str, CheckpointEntry]:
    """Every model's :class:`CheckpointEntry`, from ``models/checkpoints.json``."""
    raw = json.loads(CATALOGUE.read_text())["models"]
    out = {}
    for model, e in raw.items():
        files = tuple(CheckpointFile(path=f["path"], remote=f.get("remote", f["path"]), required=f.get("required", True),
                                     size=f.get("size"), sha256=f.get("sha256"),
                                     alternatives=tuple(f.get("alternatives", ())), note=f.get("note", ""))
                      for f in e.get("files", []))
        out[model] = CheckpointEntry(model=model, title=e["title"], source=e["source"], licence=e["licence"],
                                     files=files, verified=bool(e.get("verified")), homepage=e.get("homepage", ""),
                                     paper=e.get("paper", ""), notes=e.get("notes", ""))
    return out


def checkpoint_entry(model: str) -> CheckpointEntry:
    """The catalogue entry of ``model`` (an InputError naming the known ones otherwise)."""
    cat = catalogue()
    if model not in cat:
        raise InputError(f"no checkpoint entry for model {model!r}", f"pick one of: {', '.join(cat)} (scdm-embed checkpoints)")
    return cat[model]


# -- verification ------------------------------------------------------------------------
def _check(path: Path, *, size: int | None, sha256: str | None, what: str) -> None:
    """Refuse (and delete) a file whose size or sha256 is not the expected one."""
    got = path.stat().st_size
    if size is not None and got != size:
        path.unlink()
        raise CheckpointError(f"{what}: {got} bytes, expected {size} (truncated or altered); the file was deleted",
                              "re-run the same command to download it again")
    if sha256 is not None and _sha256(path) != sha256.lower():
        path.unlink()
        raise CheckpointError(f"{what}: sha256 does not match the published checksum (corrupt or altered); "
                              "the file was deleted", "re-run the same command; if it fails again, the source "
                              "serves another file than the one published: report it")


# -- plain HTTP with resume ----------------------------------------------------------------
class _NotFound(CheckpointError):
    """The server has no such file (HTTP 404)."""


def _http_fetch(url: str, dest: Path, *, progress: Callable[[int, int | None], None] | None = None) -> None:
    """Fetch ``url`` into ``dest`` via ``dest.part``, resuming a partial ``.part`` with ``Range``."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=_TIMEOUT_S)  # noqa: S310 - http(s) checked by the caller
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part is whole (verified by the caller)
            os.replace(part, dest)
            return
        if e.code == 404:
            raise _NotFound(f"{url}: HTTP 404 not found", "check the mirror's layout: <mirror>/<model>/<path>") from None
        raise CheckpointError(f"{url}: HTTP {e.code} {e.reason}", "check the mirror URL / file, then re-run") from None
    except (urllib.error.URLError, OSError) as e:
        raise CheckpointError(f"cannot reach {url}: {getattr(e, 'reason', e)}",
                              "check the network and the URL, then re-run the same command (it resumes)") from None
    with resp:
        resumed = have and resp.status == 206
        total = resp.headers.get("Content-Length")
        expect = int(total) + (have if resumed else 0) if total is not None else None
        try:
            with part.open("ab" if resumed else "wb") as fh:
                done = have if resumed else 0
                while True:
                    b = resp.read(_BLOCK)
                    if not b:
                        break
                    fh.write(b)
                    done += len(b)
                    if progress is not None:
                        progress(done, expect)
        except (OSError, http.client.HTTPException) as e:  # a dropped connection: keep the .part for the next run
            raise CheckpointError(f"the download of {url} was interrupted ({type(e).__name__}); "
                                  f"{part.stat().st_size if part.exists() else 0} bytes kept in {part.name}",
                                  "re-run the same command: it resumes from there") from None
    got = part.stat().st_size
    if expect is not None and got < expect:
        raise CheckpointError(f"the download of {url} ended early ({got} of {expect} bytes, kept in {part.name})",
                              "re-run the same command: it resumes from there")
    os.replace(part, dest)


def _mirror_sums(base: str, model: str) -> dict[str, str]:
    """``<base>/<model>/SHA256SUMS`` as {path: sha256} ({} when the mirror publishes none)."""
    url = f"{base.rstrip('/')}/{urllib.parse.quote(model)}/SHA256SUMS"
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r:  # noqa: S310
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return {}
        raise CheckpointError(f"{url}: HTTP {e.code} {e.reason}", "check the mirror, then re-run") from None
    except (urllib.error.URLError, OSError) as e:
        raise CheckpointError(f"cannot reach the mirror {base}: {getattr(e, 'reason', e)}",
                              "check the --mirror URL (or $SCDM_CHECKPOINT_MIRROR) and the network") from None
    sums = {}
    for line in text.splitlines():
        if line.strip():
            digest, _, name = line.strip().partition(" ")
            sums[name.strip().lstrip("*").removeprefix("./")] = digest.lower()
    return sums


# -- the command -------------------------------------------------------------------------
@dataclass
class DownloadResult:
    """What ``download_checkpoint`` did: the folder to pass as ``--checkpoint``."""

    model: str
    checkpoint: Path
    fetched: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _safe_target(root: Path, rel: str) -> Path:
    target = (root / rel).resolve()
    if root.resolve() not in target.parents:
        raise CheckpointError(f"catalogue path {rel!r} leaves the checkpoint folder", "report this catalogue entry")
    return target


def download_checkpoint(
    model: str,
    *,
    to: str | Path,
    revision: str | None = None,
    mirror: str | None = None,
    include_optional: bool = False,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> DownloadResult:
    """Fetch ``model``'s official files into ``to`` (laid out as its adapter reads them), verified.

    ``mirror`` (default ``$SCDM_CHECKPOINT_MIRROR``) fetches ``<mirror>/<model>/<path>`` over plain
    HTTP with resume; otherwise Hugging Face files come through ``huggingface_hub`` at ``revision``
    (default: the catalogue's). Optional files are fetched with ``include_optional`` (from a
    mirror: when it has them). Files already in place are re-verified, not re-fetched.
    """
    entry = checkpoint_entry(model)
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    root = Path(to)
    if root.exists() and not root.is_dir():
        raise InputError(f"--to {str(root)!r} is a file", "pass a folder (created if absent)")
    if entry.kind == "none":
        raise InputError(f"model {model!r} has no checkpoint (it is fitted on your data)",
                         f"run `scdm-embed extract INPUT --model {model}` without --checkpoint")
    if mirror is None and entry.kind != "huggingface":
        raise InputError(f"{model}'s official files are not on a host scdm can fetch from ({entry.source.get('how', '')})",
                         f"fetch them by hand from {entry.where} into {root}/ as `scdm-embed checkpoints --model {model}` "
                         "lists them, or pass --mirror URL of a mirror that serves them")
    if mirror is not None and urllib.parse.urlparse(mirror).scheme not in ("http", "https"):
        raise InputError(f"mirror {mirror!r} is not an http(s) URL", "pass --mirror http(s)://host/path")
    sums = _mirror_sums(mirror, model) if mirror is not None else {}  # the mirror answers before DIR is made
    root.mkdir(parents=True, exist_ok=True)
    res = DownloadResult(model, root)
    for f in entry.files:
        names = [f.path, *(str(Path(f.path).parent / a) if "/" in f.path else a for a in f.alternatives)]
        have = next((n for n in names if _safe_target(root, n).exists()), None)
        if have is not None:
            sha = f.sha256 if have == f.path else None
            _check(_safe_target(root, have), size=f.size if have == f.path else None, sha256=sha or sums.get(have),
                   what=f"{model}/{have} (already in {root})")
            res.kept.append(have)
        elif mirror is not None:
            got = _mirror_fetch(mirror, model, f, names, root, sums, progress)
            (res.fetched if got else res.skipped).append(got or f.path)
        elif not f.required and not include_optional:
            res.skipped.append(f.path)
        else:
            target = _safe_target(root, f.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            _hf_fetch(entry, f, target, revision=revision)
            _check(target, size=f.size, sha256=f.sha256, what=f"{model}/{f.path}")
            res.fetched.append(f.path)
    return res


def _mirror_fetch(mirror: str, model: str, f: CheckpointFile, names: list[str], root: Path, sums: dict[str, str],
                  progress: Callable[[str, int, int | None], None] | None) -> str | None:
    """Fetch ``f`` from the mirror under its name or an alternative; the name fetched (None: an
    optional file the mirror lacks). A partial ``.part`` of any name is resumed first."""
    names = sorted(names, key=lambda n: not _safe_target(root, n).with_name(Path(n).name + ".part").exists())
    for name in names:
        target = _safe_target(root, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        url = f"{mirror.rstrip('/')}/{urllib.parse.quote(model)}/{urllib.parse.quote(name)}"
        try:
            _http_fetch(url, target, progress=(lambda d, t, p=name: progress(p, d, t)) if progress else None)
        except _NotFound:
            continue
        official = name == f.path
        _check(target, size=f.size if official else None, sha256=(f.sha256 if official else None) or sums.get(name),
               what=f"{model}/{name}")
        return name
    if f.required:
        raise CheckpointError(f"the mirror {mirror} has no {model}/{f.path}"
                              + (f" (nor {', '.join(names[1:])})" if len(names) > 1 else ""),
                              f"put the file at {mirror.rstrip('/')}/{model}/{f.path}, or use another --mirror")
    return None


def _hf_fetch(entry: CheckpointEntry, f: CheckpointFile, target: Path, *, revision: str | None) -> None:
    """One file through ``huggingface_hub`` (its own resume and hash checks), moved to ``target``."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    stage = target.parent / f".hf-{target.name}"
    # a download is an explicit request to go online: the adapters switch the HF libraries to
    # offline mode in-process when they load local folders (``hf_offline``), which must not block it
    # (a user's own HF_HUB_OFFLINE is checked by the CLI before anything sets it)
    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        got = hf_hub_download(entry.source["repo_id"], f.remote, revision=revision or entry.source.get("revision"),
                              local_dir=stage, endpoint=os.environ.get("HF_ENDPOINT") or None)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise CheckpointError(f"cannot fetch {f.remote} from {entry.where}: {type(e).__name__}: {e}",
                              "check the network, --revision and HF_ENDPOINT, then re-run (it resumes)") from None
    finally:
        constants.HF_HUB_OFFLINE = was
    os.replace(got, target)
    with contextlib.suppress(OSError):
        shutil.rmtree(stage)


__all__ = ["CATALOGUE", "MIRROR_ENV", "CheckpointEntry", "CheckpointFile", "DownloadResult", "catalogue",
           "checkpoint_entry", "download_checkpoint"]
