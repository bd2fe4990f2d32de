"""Shared storage (issue 13): rendered documents live in the database, so a web node or a worker
on another host serves them; a document rendered before (its ``path`` a file on the machine that
rendered it) still opens from that file; either way the sha256 in the record is the check.
Results: ``SOPFLOW_RESULTS_STORAGE`` chooses a shared folder or a Prefect block for every worker.
On SQLite and PostgreSQL (``db_url``)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from flows.config import get_settings
from flows.engine.env import prefect_env
from flows.errors import ConfigError, RecordError
from flows.record import ledger
from flows.record.db import write_session
from flows.record.documents import store_document_bytes
from flows.record.tables import Document, utcnow
from flows.services.documents import document_file

HTML = "<html><body>receipt of COI-2026-0001 · 接收记录</body></html>".encode()


def _document(db_url: str, make_run, path: str, content: bytes, *, in_database: bool) -> tuple[str, str]:
    with write_session(db_url) as s:
        made = make_run(s)
        if in_database:
            store_document_bytes(s, content)
        doc = Document(
            run_id=made.run.id,
            step_id="receipt_record",
            template="dose_receipt.html.j2",
            path=path,
            sha256=ledger.sha256_hex(content),
            rendered_at=utcnow(),
        )
        ledger.append(s, doc, actor="system", action="document.render")
        return doc.id, made.run.id


def test_document_in_the_database_is_served_without_any_file(db_url: str, make_run, sql):
    settings = replace(get_settings(), database_url=db_url)
    doc_id, _ = _document(db_url, make_run, "RUN/receipt-1.html", HTML, in_database=True)

    doc = document_file(settings, doc_id, "ana")

    assert doc["content"] == HTML
    assert doc["intact"] is True
    assert (doc["name"], doc["media_type"]) == ("receipt-1.html", "text/html")
    # The bytes changed behind sopflow's back: served, but no longer intact (the sha256 is the check).
    sql("UPDATE sf_document_content SET content = :c", c=HTML.replace(b"0001", b"0002"))
    assert document_file(settings, doc_id, "ana")["intact"] is False


def test_same_bytes_are_stored_once(db_url: str, make_run):
    _document(db_url, make_run, "RUN/a.html", HTML, in_database=True)
    with write_session(db_url) as s:
        store_document_bytes(s, HTML)
    from sqlalchemy import text

    from flows.record.db import get_engine

    with get_engine(db_url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sf_document_content")).scalar_one() == 1


def test_document_rendered_before_opens_from_its_file(db_url: str, make_run, tmp_path: Path):
    settings = replace(get_settings(), database_url=db_url)
    old = tmp_path / "documents" / "run" / "receipt-1.html"
    old.parent.mkdir(parents=True)
    old.write_bytes(HTML)
    doc_id, _ = _document(db_url, make_run, str(old), HTML, in_database=False)

    doc = document_file(settings, doc_id, "ana")
    assert doc["content"] == HTML
    assert doc["intact"] is True

    old.unlink()
    with pytest.raises(RecordError, match=r"receipt-1\.html is neither in the database nor readable here"):
        document_file(settings, doc_id, "ana")


def test_results_go_where_every_worker_reaches_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SOPFLOW_RESULTS_STORAGE", str(tmp_path / "shared"))
    env = prefect_env(get_settings())
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == str(tmp_path / "shared")
    assert "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK" not in env

    monkeypatch.setenv("SOPFLOW_RESULTS_STORAGE", "block:local-file-system/sopflow-results")
    env = prefect_env(get_settings())
    assert env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == "local-file-system/sopflow-results"

    monkeypatch.delenv("SOPFLOW_RESULTS_STORAGE")
    assert prefect_env(get_settings())["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == str(
        Path(os.environ["SOPFLOW_HOME"]).resolve() / "results"
    )
    monkeypatch.setenv("SOPFLOW_RESULTS_STORAGE", "block:sopflow-results")
    with pytest.raises(ConfigError, match="SOPFLOW_RESULTS_STORAGE: expected a folder or block:TYPE/NAME"):
        get_settings()
