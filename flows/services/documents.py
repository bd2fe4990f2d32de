"""The service floor: controlled documents. ``document_file`` hands a rendered document to a
reader with a role at its run's institution (``guard.reader_problem``), its bytes re-checked
against the sha256 the record holds (``intact``). The bytes come from the database, so any web
node serves any document; one rendered before they moved there comes from its file.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from flows.config import Settings
from flows.errors import NotFoundError, RecordError
from flows.record import ledger
from flows.record.db import init_db, read_session
from flows.record.documents import document_bytes
from flows.record.tables import Document, SopRun
from flows.services import guard

__all__ = ["document_file"]

MEDIA_TYPES = {".pdf": "application/pdf", ".html": "text/html", ".htm": "text/html"}


def document_file(settings: Settings, document_id: str, username: str) -> dict[str, Any]:
    """A rendered document: its record, its bytes, their media type, and whether the bytes still
    have the sha256 the record holds (``intact``).

    Raises:
        NotFoundError: no such document, or one of an institution where the user holds no role (alike).
        RecordError: its file is gone.
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        doc = s.get(Document, document_id)
        run = s.get(SopRun, doc.run_id) if doc is not None else None
        if doc is None or guard.reader_problem(s, username, run.institution if run else "") is not None:
            raise NotFoundError(guard.NO_SUCH_DOCUMENT)  # alike: a reader cannot tell which
        path = PurePosixPath(doc.path.replace("\\", "/"))
        try:
            content = document_bytes(s, doc)
        except OSError as exc:
            raise RecordError(
                f"document {document_id!r}: {path.name} is neither in the database nor readable here ({exc.strerror})"
            ) from None
    return {
        "id": doc.id,
        "run_id": doc.run_id,
        "step_id": doc.step_id,
        "template": doc.template,
        "name": path.name,
        "sha256": doc.sha256,
        "rendered_at": doc.rendered_at,
        "content": content,
        "media_type": MEDIA_TYPES.get(path.suffix.lower(), "text/plain"),
        "intact": ledger.sha256_hex(content) == doc.sha256,
    }
