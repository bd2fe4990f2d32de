"""The service floor: checking the audit trail. ``verify_audit`` walks the live chain and every
record row and signature against it, then every signed checkpoint, the live head against the
newest, and (``--against``) a checkpoint a document, an export or a saved file kept
(``sopflow audit verify``); ``verify_export`` checks a record exported with ``sopflow record RUN
--json`` offline (``flows.record.export``, the stdlib-only checker an inspector can copy and run
alone). ``checkpoint_job`` is the worker's periodic job that writes checkpoints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlmodel import Session

from flows.config import Settings
from flows.errors import ConfigError
from flows.record import checkpoints, current, ledger
from flows.record.db import init_db, read_session, safe_url, write_session
from flows.record.export import check_checkpoint, parse_public_keys
from flows.record.export import verify_export as _check_export
from flows.record.tables import AuditEvent

__all__ = [
    "CHECKS",
    "Kept",
    "audit_key",
    "checkpoint_job",
    "make_checkpoint",
    "read_kept",
    "verify_audit",
    "verify_export",
]

CHECKS: list[Callable[[Session, ledger.ChainReport], None]] = []
"""Further checks of the live database, run by every ``audit verify`` after the chain, its rows,
signatures and checkpoints, in the same snapshot: each adds its problems to the report (e.g. the
current-state tables against the ledger). Add one here, and only here."""

_EMBEDDED = re.compile(r'<script type="application/json" id="sopflow-checkpoint">(.*?)</script>', re.DOTALL)


class Kept:
    """A checkpoint kept outside the database (``--against FILE``), with the events an export carried."""

    def __init__(self, source: str, checkpoint: dict[str, Any], events: list[dict[str, Any]]) -> None:
        self.source = source
        self.checkpoint = checkpoint
        self.events = events


def read_kept(path: Path) -> Kept:
    """The checkpoint a document (HTML), an export (JSON) or a saved checkpoint file carries.

    Raises:
        ConfigError: unreadable, or no checkpoint in it.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--against {path}: {exc.strerror}") from None
    if raw.startswith(b"%PDF"):
        raise ConfigError(
            f"--against {path}: a PDF; use the document's HTML (same name, .html), the run's export or a saved checkpoint"
        )
    text = raw.decode("utf-8", errors="replace")
    found = _EMBEDDED.search(text)
    try:
        doc = json.loads(found.group(1) if found else text)
    except ValueError:
        raise ConfigError(
            f"--against {path}: neither a sopflow document, an export nor a checkpoint file (no checkpoint found)"
        ) from None
    if isinstance(doc, dict) and isinstance(doc.get("checkpoint"), dict):  # an export
        events = [e for e in doc.get("audit_events") or [] if isinstance(e, dict)]
        return Kept(f"{path.name}'s", doc["checkpoint"], events)
    if isinstance(doc, dict) and "head_hash" in doc:
        return Kept(f"{path.name}'s", doc, [])
    raise ConfigError(f"--against {path}: it carries no signed checkpoint (made before sopflow signed them?)")


def verify_audit(
    settings: Settings,
    *,
    incremental: bool = False,
    against: Kept | None = None,
    progress: ledger.Progress | None = None,
) -> ledger.ChainReport:
    """Walk the audit chain, every record row and signature against it, every signed checkpoint,
    the live head against the newest, ``against``'s checkpoint, then ``CHECKS``. ``incremental``
    starts from the newest checkpoint verified here before (a full walk when there is none). A
    clean report keeps the newest good checkpoint outside the database for the next one.

    Raises:
        ConfigError: the key files cannot be read.
    """
    init_db(settings.database_url)
    keys = checkpoints.known_keys(settings)
    database = safe_url(settings.database_url)
    kept = checkpoints.read_verified(settings, database)
    after = (kept["seq"], str(kept["head_hash"])) if incremental and kept else None
    with read_session(settings.database_url) as s:
        report = ledger.verify_chain(s, after=after, progress=progress)
        if incremental and kept is None:
            report.notes.append("no checkpoint was verified here before: this was a full walk")
        good = checkpoints.verify_checkpoints(s, report, keys, since=int(kept["n"]) if after and kept else 0, kept=kept)
        first = s.get(AuditEvent, 1)
        if kept is not None and kept.get("genesis") and (first is None or first.hash != kept["genesis"]):
            report.problem(
                "audit event 1 is not the one audit verify found here before: the whole chain was replaced "
                f"(or {database} is another database now)"
            )
        if against is not None:
            _hold_to(s, report, against, keys)
        if incremental:  # the current-state tables are checked whole, by a full walk (as old rows are)
            report.notes.append("the current-state tables were not compared: a full walk compares them")
        else:
            for problem in current.compare(s):  # what is open, waiting, quarantined, against the record rows
                report.problem(problem)
        for check in CHECKS:
            check(s, report)
    if report.ok and good is not None and first is not None:
        checkpoints.write_verified(settings, database, {**good, "genesis": first.hash})
    return report


def _hold_to(session: Session, report: ledger.ChainReport, kept: Kept, keys: dict[str, bytes]) -> None:
    if problem := check_checkpoint(kept.checkpoint, keys, f"{kept.source} checkpoint"):
        report.problem(problem)
        return
    checkpoints.held_to(session, report, kept.checkpoint, kept.source)
    for ev in kept.events:
        live = session.get(AuditEvent, ev.get("seq"))
        if live is None:
            report.problem(f"audit event {ev.get('seq')} of {kept.source} export is gone from the live chain")
        elif live.hash != ev.get("hash"):
            report.problem(
                f"audit event {ev.get('seq')}: {kept.source} export has hash {str(ev.get('hash'))[:12]}…, "
                f"the live chain {live.hash[:12]}…: one of the two was altered"
            )


def make_checkpoint(settings: Settings) -> dict[str, Any] | None:
    """The newest checkpoint, made now when none covers the head (``sopflow audit checkpoint``).

    Raises:
        ConfigError: the key file cannot be used.
    """
    init_db(settings.database_url)
    key = checkpoints.load_signing_key(settings)
    with write_session(settings.database_url) as s:
        cp = checkpoints.ensure_checkpoint(s, key)
        return checkpoints.checkpoint_public(cp, key.public) if cp else None


def checkpoint_job(settings: Settings) -> int:
    """The worker's periodic job: a checkpoint once ``checkpoint_events`` events or
    ``checkpoint_minutes`` follow the newest one. Returns how many it wrote (0 or 1)."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        if not checkpoints.checkpoint_due(s, settings):
            return 0
    key = checkpoints.load_signing_key(settings)
    with write_session(settings.database_url) as s:
        if not checkpoints.checkpoint_due(s, settings):  # another worker wrote it meanwhile
            return 0
        checkpoints.ensure_checkpoint(s, key)
    return 1


def audit_key(settings: Settings, *, create: bool = False) -> dict[str, Any]:
    """The checkpoint key's public half and every public key known here (``sopflow audit key``).

    Raises:
        ConfigError: no key file (and not ``create``), or one that cannot be used.
    """
    key = checkpoints.load_signing_key(settings, create=create)
    return {
        "key_id": key.key_id,
        "public_key": checkpoints.public_key_line(key.public),
        "key_file": str(key.path),
        "public_keys_file": str(settings.audit_public_keys_path),
        "known": sorted(checkpoints.known_keys(settings)),
    }


def verify_export(document: dict[str, Any], keys_text: str | None = None) -> list[str]:
    """Every problem of an exported record (empty when it checks out); ``keys_text``: the
    installation's public keys as ``sopflow audit key`` prints them (None: unconfirmed).

    Raises:
        ConfigError: ``keys_text`` holds no valid key.
    """
    keys = None
    if keys_text is not None:
        try:
            keys = parse_public_keys(keys_text)
        except ValueError as exc:
            raise ConfigError(f"--key: {exc}") from None
        if not keys:
            raise ConfigError("--key: no public key in it")
    return _check_export(document, keys)
