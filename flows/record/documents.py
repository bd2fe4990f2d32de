"""Stage 3: the bytes of rendered documents, kept in the database so every web node and worker
reads them wherever it runs (issue 13).

``store_document_bytes`` inserts the bytes once under their sha256 (``DocumentContent``; the same
record renders to the same bytes, so a re-render stores nothing new); the ``Document`` row that
names the sha256 is the audit-chained record. ``document_bytes`` reads them back, and for a
document rendered before the bytes moved into the database, from its file (``Document.path`` was
then an absolute path on the machine that rendered it). Callers re-check the bytes against the
sha256. Must not import prefect.
"""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session

from flows.record.ledger import sha256_hex
from flows.record.tables import Document, DocumentContent, utcnow

__all__ = ["document_bytes", "store_document_bytes"]


def store_document_bytes(session: Session, content: bytes) -> str:
    """Keep ``content`` under its sha256 (inside a write session); returns the sha256."""
    digest = sha256_hex(content)
    if session.get(DocumentContent, digest) is None:
        session.add(DocumentContent(sha256=digest, size=len(content), content=content, stored_at=utcnow()))
        session.flush()
    return digest


def document_bytes(session: Session, doc: Document) -> bytes:
    """The document's bytes: from the database, else (an older document) from its file.

    Raises:
        OSError: neither holds them (the file of an older document is gone or on another machine).
    """
    row = session.get(DocumentContent, doc.sha256)
    if row is not None:
        return bytes(row.content)
    path = Path(doc.path)
    if not path.is_absolute():
        raise FileNotFoundError(2, "not in the database", doc.path)
    return path.read_bytes()
