"""The bytes of a rendered document, read as every web node and worker reads them: from the
database (``flows.record.documents``), found by the path its record names."""

from __future__ import annotations

from sqlmodel import select

from flows.config import get_settings
from flows.record.db import read_session
from flows.record.documents import document_bytes
from flows.record.tables import Document

__all__ = ["stored", "stored_text"]


def stored(path: str, database_url: str | None = None) -> bytes:
    with read_session(database_url or get_settings().database_url) as s:
        doc = s.exec(select(Document).where(Document.path == path)).first()
        assert doc is not None, f"no document is recorded at {path!r}"
        return document_bytes(s, doc)


def stored_text(path: str, database_url: str | None = None) -> str:
    return stored(path, database_url).decode("utf-8")
