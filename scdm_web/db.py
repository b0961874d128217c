"""The app's database (SQLAlchemy 2): uploads and prediction jobs. SQLite file by default, any URL."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import DateTime, Float, ForeignKey, Integer, String, Text, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from scdm_embed.errors import ScdmError

#: job states, in the order a job passes them
STATES = ("queued", "running", "done", "failed")


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


class Base(DeclarativeBase):
    pass


class Upload(Base):
    """An uploaded .h5ad, stored under a generated name (the client's name is kept for display only)."""

    __tablename__ = "uploads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stored_name: Mapped[str] = mapped_column(String(80), unique=True)
    original_name: Mapped[str] = mapped_column(String(255), default="")
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    n_cells: Mapped[int] = mapped_column(Integer, default=0)
    n_genes: Mapped[int] = mapped_column(Integer, default=0)
    sha256: Mapped[str] = mapped_column(String(80), default="")
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now)


class Job(Base):
    """A prediction of one upload with one classifier bundle."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    upload_id: Mapped[int] = mapped_column(ForeignKey("uploads.id"))
    model: Mapped[str] = mapped_column(String(80))
    bundle: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str] = mapped_column(String(255), default="queued")
    message: Mapped[str] = mapped_column(Text, default="")
    hint: Mapped[str] = mapped_column(Text, default="")
    result_name: Mapped[str] = mapped_column(String(80), default="")
    n_cells: Mapped[int] = mapped_column(Integer, default=0)
    n_sensitive: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now)
    finished: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, default=None)

    def as_dict(self) -> dict[str, Any]:
        """The job as JSON-able fields (what the progress view polls)."""
        return {"id": self.id, "upload_id": self.upload_id, "model": self.model, "bundle": self.bundle,
                "status": self.status, "progress": round(float(self.progress), 3), "stage": self.stage,
                "message": self.message, "hint": self.hint, "n_cells": self.n_cells, "n_sensitive": self.n_sensitive,
                "created": self.created.isoformat() if self.created else None,
                "finished": self.finished.isoformat() if self.finished else None,
                "download": f"/jobs/{self.id}/predictions.csv" if self.status == "done" else None}


class Database:
    """Engine + session factory; ``session()`` is a transaction (committed on success)."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

        self.url = url
        sqlite = url.startswith("sqlite")
        kw: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}} if sqlite else {}
        try:
            self.engine = create_engine(url, **kw)
            if sqlite:
                @event.listens_for(self.engine, "connect")
                def _pragmas(conn, _record) -> None:  # WAL: readers do not block the job thread's writes
                    cur = conn.cursor()
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute("PRAGMA busy_timeout=30000")
                    cur.close()
            Base.metadata.create_all(self.engine)
        except (ArgumentError, NoSuchModuleError) as e:
            raise ScdmError(f"--db {url!r} is not a usable SQLAlchemy URL ({e})",
                            "pass e.g. --db sqlite:///scdm-web.db or --db postgresql://user@host/db") from None
        except OperationalError as e:
            raise ScdmError(f"cannot open the database {url!r} ({e.orig})",
                            "check that the database (or the folder of the SQLite file) exists and is writable") from None
        self._factory = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite allows one writer at a time: serialise this process's writes instead of retrying
        self._write = threading.Lock() if sqlite else None

    @contextmanager
    def session(self) -> Iterator[Session]:
        lock = self._write
        if lock is not None:
            lock.acquire()
        try:
            with self._factory() as s, s.begin():
                yield s
        finally:
            if lock is not None:
                lock.release()

    def dispose(self) -> None:
        self.engine.dispose()


__all__ = ["STATES", "Base", "Database", "Job", "Upload", "now"]
