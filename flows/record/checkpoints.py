"""Stage 3: signed checkpoints of the audit chain's head, and the key that signs them.

A hash chain alone does not stop whoever holds the database: every hash is plain SHA-256, so
one can cut the chain's tail or recompute it from an edited row on. A checkpoint is the head
(event ``seq`` and its hash) signed with an Ed25519 key whose private half lives in a file
outside the database (``SOPFLOW_AUDIT_KEY_FILE``, owner-only, mode 600). Nobody without that
file can make a checkpoint that verifies, so ``verify_checkpoints`` names a chain that ends
before a checkpoint (its tail was removed) or no longer carries a checkpoint's hash (it was
rewritten). Every document and export carries the newest checkpoint, and ``audit verify
--against FILE`` holds the live chain to it.

Public keys: every key that ever signed here is listed in ``SOPFLOW_AUDIT_PUBLIC_KEYS`` (one a
line, as ``sopflow audit key`` prints it), so checkpoints signed before a rotation still verify.
The key and its list are files, never rows: the database cannot vouch for itself.

Checkpoints are not audit-chained (a checkpoint's own event would move the head it covers):
their signatures protect them, they are numbered 1, 2, … so a removed one shows, and
``audit verify`` keeps the newest one it found good outside the database
(``Settings.audit_verified_path``), so removing the newest checkpoints with the events they cover
shows too. Must not import prefect; ``cryptography`` is imported where a key is used.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlmodel import Session, col, select

from flows.config import Settings
from flows.errors import ConfigError
from flows.record.export import CHECKPOINT_FORMAT, check_checkpoint, checkpoint_message, key_id_of, parse_public_keys
from flows.record.ledger import ChainReport
from flows.record.tables import AuditCheckpoint, AuditEvent, iso_utc, utcnow

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "SigningKey",
    "checkpoint_due",
    "checkpoint_public",
    "ensure_checkpoint",
    "held_to",
    "known_keys",
    "load_signing_key",
    "newest_checkpoint",
    "public_key_line",
    "read_verified",
    "verify_checkpoints",
    "write_verified",
]


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    public: bytes
    """The 32 raw bytes of the public key."""
    key_id: str
    path: Path

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self.private.sign(message)).decode()


def public_key_line(public: bytes, comment: str = "") -> str:
    """A public key as ``sopflow audit key`` prints it and the public-keys file lists it."""
    line = f"ed25519 {base64.b64encode(public).decode()} {key_id_of(public)}"
    return f"{line} {comment}".rstrip()


def _check_mode(path: Path, what: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{what} {path} is readable or writable by others (mode {mode:03o}); the key that signs the audit "
            f"chain must be the owner's alone: chmod 600 {path}"
        )


def load_signing_key(settings: Settings, *, create: bool = True) -> SigningKey:
    """The key that signs checkpoints, from ``SOPFLOW_AUDIT_KEY_FILE``; made (mode 600) on first
    need, its public key added to ``SOPFLOW_AUDIT_PUBLIC_KEYS``.

    Raises:
        ConfigError: the file is readable by others, unreadable, not an Ed25519 key, or missing
        and ``create`` is False.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = settings.audit_key_path
    what = "SOPFLOW_AUDIT_KEY_FILE"
    if not path.exists():
        if not create:
            raise ConfigError(f"{what} {path} does not exist: `sopflow audit key --create` makes it")
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return load_signing_key(settings, create=False)
        except OSError as exc:
            raise ConfigError(f"{what} {path} cannot be created: {exc.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        _publish(settings, public, f"created {iso_utc(utcnow())}")
    _check_mode(path, what)
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{what} {path} is not a PEM private key: {exc}") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"{what} {path} holds a {type(loaded).__name__}, not an Ed25519 key")
    public = loaded.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if key_id_of(public) not in _listed(settings):
        _publish(settings, public, f"added {iso_utc(utcnow())}")
    return SigningKey(loaded, public, key_id_of(public), path)


def _listed(settings: Settings) -> dict[str, bytes]:
    path = settings.audit_public_keys_path
    try:
        return parse_public_keys(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"SOPFLOW_AUDIT_PUBLIC_KEYS {path}: {exc}") from None


def _publish(settings: Settings, public: bytes, comment: str) -> None:
    path = settings.audit_public_keys_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(public_key_line(public, f"# {comment}") + "\n")


def known_keys(settings: Settings) -> dict[str, bytes]:
    """Every public key that may have signed checkpoints here, by id: the public-keys file, and the
    current key file's own (without creating one).

    Raises:
        ConfigError: a file is unreadable or broken, or the key file is readable by others.
    """
    keys = _listed(settings)
    if settings.audit_key_path.exists():
        key = load_signing_key(settings, create=False)
        keys.setdefault(key.key_id, key.public)
    return keys


def checkpoint_public(cp: AuditCheckpoint, public: bytes | None = None) -> dict[str, Any]:
    """A checkpoint as documents and exports carry it and ``--against`` reads it back."""
    out: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "n": cp.n,
        "seq": cp.seq,
        "head_hash": cp.head_hash,
        "created_at": iso_utc(cp.created_at),
        "key_id": cp.key_id,
        "signature": cp.signature,
    }
    if public is not None:
        out["public_key"] = base64.b64encode(public).decode()
    return out


def newest_checkpoint(session: Session) -> AuditCheckpoint | None:
    return session.exec(select(AuditCheckpoint).order_by(col(AuditCheckpoint.n).desc()).limit(1)).first()


def ensure_checkpoint(session: Session, key: SigningKey) -> AuditCheckpoint | None:
    """The newest checkpoint, covering the head: made now unless one covers it already; None
    while the chain is empty. Call it inside a write session (the head must not move)."""
    head = session.exec(select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(1)).first()
    newest = newest_checkpoint(session)
    if head is None or (newest is not None and newest.seq == head.seq and newest.head_hash == head.hash):
        return newest
    cp = AuditCheckpoint(
        n=(newest.n + 1) if newest else 1,
        seq=head.seq,
        head_hash=head.hash,
        created_at=utcnow(),
        key_id=key.key_id,
        signature="",
    )
    cp.signature = key.sign(checkpoint_message(checkpoint_public(cp)))
    session.add(cp)
    session.flush()
    return cp


def checkpoint_due(session: Session, settings: Settings, now: datetime | None = None) -> bool:
    """True when events follow the newest checkpoint and there are ``checkpoint_events`` of them,
    or the newest is ``checkpoint_minutes`` old (or there is none yet)."""
    head = session.exec(select(AuditEvent.seq).order_by(col(AuditEvent.seq).desc()).limit(1)).first()
    newest = newest_checkpoint(session)
    if head is None or (newest is not None and newest.seq >= head):
        return False
    if newest is None or head - newest.seq >= settings.checkpoint_events:
        return True
    return (now or utcnow()) - newest.created_at >= timedelta(minutes=settings.checkpoint_minutes)


def read_verified(settings: Settings, database: str) -> dict[str, Any] | None:
    """The newest checkpoint ``audit verify`` found good on this machine for ``database``, if any."""
    try:
        kept = json.loads(settings.audit_verified_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = kept.get(database) if isinstance(kept, dict) else None
    return entry if isinstance(entry, dict) and isinstance(entry.get("seq"), int) else None


def write_verified(settings: Settings, database: str, cp: dict[str, Any]) -> None:
    path = settings.audit_verified_path
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        kept = {}
    if not isinstance(kept, dict):
        kept = {}
    kept[database] = {**cp, "verified_at": iso_utc(utcnow())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def _label(cp: dict[str, Any], source: str = "") -> str:
    made = str(cp.get("created_at"))[:16].replace("T", " ")
    return f"{source + ' ' if source else ''}checkpoint {cp.get('n')} (made {made} UTC)"


def held_to(session: Session, report: ChainReport, cp: dict[str, Any], source: str) -> None:
    """The live chain must still contain checkpoint ``cp`` (from ``source``): its event, with its hash."""
    head = report.head
    if head is None or head[0] < cp["seq"]:
        ends = f"ends at event {head[0]}" if head else "is empty"
        report.problem(f"the chain {ends} but {_label(cp, source)} covers event {cp['seq']}: events were removed")
        return
    ev = session.get(AuditEvent, cp["seq"])
    if ev is None:
        report.problem(f"audit event {cp['seq']}, which {_label(cp, source)} covers, is gone: events were removed")
    elif ev.hash != cp["head_hash"]:
        report.problem(
            f"audit event {cp['seq']} has hash {ev.hash[:12]}…, but {_label(cp, source)} signed {cp['head_hash'][:12]}…: "
            "the chain was rewritten at or before that event (its hashes recomputed without the key)"
        )


def verify_checkpoints(
    session: Session, report: ChainReport, keys: dict[str, bytes], *, since: int = 0, kept: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Check every checkpoint numbered above ``since``: numbered without a gap, signed by a known key,
    its event still in the chain with the hash it signed; the newest against the live head; and
    ``kept`` (the newest one found good here before) still in the database. Returns the newest
    checkpoint found good (its public form), for ``write_verified``."""
    good: dict[str, Any] | None = None
    expected = since + 1
    query = select(AuditCheckpoint).where(AuditCheckpoint.n > since).order_by(col(AuditCheckpoint.n))
    newest: AuditCheckpoint | None = None
    for cp in session.exec(query):
        report.checkpoints += 1
        if cp.n != expected:
            report.problem(f"checkpoint {expected} is missing (the next is {cp.n}): a checkpoint was deleted")
        expected = cp.n + 1
        newest = cp
        public = checkpoint_public(cp)
        if problem := check_checkpoint(public, keys):
            report.problem(problem)
            continue
        before = len(report.problems)
        held_to(session, report, public, "")
        if len(report.problems) == before:
            good = public
    if newest is None and since == 0 and report.head is not None:
        report.notes.append(
            f"no signed checkpoint yet: events 1 to {report.head[0]} rest on the hash chain alone "
            "(the worker writes one every SOPFLOW_CHECKPOINT_EVENTS events or SOPFLOW_CHECKPOINT_MINUTES)"
        )
    elif newest is not None and report.head is not None and report.head[0] > newest.seq:
        report.notes.append(
            f"events {newest.seq + 1} to {report.head[0]} follow the newest checkpoint ({newest.n}): "
            "the next checkpoint will cover them"
        )
    if kept is not None:
        stored = session.get(AuditCheckpoint, kept.get("n"))
        if stored is None or stored.seq != kept.get("seq") or stored.head_hash != kept.get("head_hash"):
            report.problem(
                f"{_label(kept)}, which audit verify found good here at {str(kept.get('verified_at'))[:16]} UTC, "
                f"covering event {kept.get('seq')}, is gone from the database or changed: checkpoints were removed"
            )
        if stored is None or stored.n <= since:  # else its row was checked above, named as itself
            held_to(session, report, kept, "the verified")
    return good
