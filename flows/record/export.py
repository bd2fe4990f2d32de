"""Stage 3 (edge): check an exported quality record offline (``sopflow audit verify-export FILE``).

Standard library only, and nothing else from sopflow: an inspector can copy this one file and
run ``python export.py record.json``. The export (``sopflow record RUN --json``) carries, beside
the readable record, the run's rows exactly as stored (``rows``) and every audit event that
recorded them (``audit_events``). This checks, and names the first thing that does not hold:

1. each event's hash recomputes from its fields (seq, at, actor, action, object type and id,
   payload, reason, previous hash); events are in chain order, and where two exported events
   are neighbours in the chain the later one names the earlier one's hash; the export's
   ``audit_head`` agrees with the events;
2. each exported row equals the row its audit event recorded, and each row an event recorded
   is exported; a run's step records and run events are numbered 1, 2, … without a gap;
3. each signature's hash recomputes from exactly what it signed (run, SOP sha256, step, the
   data of every step record carrying it, signer, printed name, meaning, statement, time);
4. the readable parts (run, steps, history, corrections, run events, deviations, documents,
   escalations) say what the rows say;
5. the export's signed ``checkpoint`` (written when the export was made) covers its
   ``audit_head`` and its Ed25519 signature verifies with the installation's public key
   (``python export.py record.json --key KEY``, the key as ``sopflow audit key`` prints it, or a
   file of such keys). Without ``--key`` the signature is checked against the key the export
   names, which proves nothing about who signed: say so.

What it cannot show offline: that no later event of this run exists beyond the export's head;
``sopflow audit verify --against record.json`` checks that against the live chain.

Ed25519 verification uses ``cryptography`` when it is installed, else the pure-Python
verification of RFC 8032 below (slow, a few milliseconds a signature, and enough for one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
from typing import Any

__all__ = [
    "CHECKPOINT_FORMAT",
    "check_checkpoint",
    "checkpoint_message",
    "ed25519_verify",
    "event_hash",
    "key_id_of",
    "main",
    "parse_public_keys",
    "verify_export",
]

GENESIS = "0" * 64
CHECKPOINT_FORMAT = "sopflow-checkpoint/1"


def _canonical(obj: Any) -> bytes:
    # The export holds times as the ISO strings the hashes were computed over: no datetime here.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sha256(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


def event_hash(ev: dict[str, Any]) -> str:
    """The hash an audit event must carry: sha256 of the canonical JSON of its other fields."""
    return _sha256(
        {
            k: ev.get(k)
            for k in ("seq", "at", "actor", "action", "object_type", "object_id", "payload", "reason", "prev_hash")
        }
    )


# -- signed checkpoints ------------------------------------------------------------------------


def checkpoint_message(cp: dict[str, Any]) -> bytes:
    """The bytes a checkpoint's signature covers: its format, number, event, head hash, time and key id."""
    return _canonical(
        {
            "format": CHECKPOINT_FORMAT,
            "n": cp.get("n"),
            "seq": cp.get("seq"),
            "head_hash": cp.get("head_hash"),
            "created_at": cp.get("created_at"),
            "key_id": cp.get("key_id"),
        }
    )


def key_id_of(public_key: bytes) -> str:
    """A public key's id: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def parse_public_keys(text: str) -> dict[str, bytes]:
    """Public keys by id, from text holding one or more keys as ``sopflow audit key`` prints them
    (``ed25519 BASE64 [key id] [comment]``) or bare base64; ``#`` starts a comment. Raises ValueError."""
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        b64 = words[1] if words[0] == "ed25519" and len(words) > 1 else words[0]
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"line {number}: not an Ed25519 public key (expected 32 bytes of base64): {b64[:60]!r}")
        keys[key_id_of(raw)] = raw
    return keys


_P = 2**255 - 19
_Q = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_Point = tuple[int, int, int, int]


def _add(a: _Point, b: _Point) -> _Point:
    x = (a[1] - a[0]) * (b[1] - b[0]) % _P
    y = (a[1] + a[0]) * (b[1] + b[0]) % _P
    c = 2 * a[3] * b[3] * _D % _P
    d = 2 * a[2] * b[2] % _P
    e, f, g, h = y - x, d - c, d + c, y + x
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s: int, p: _Point) -> _Point:
    q: _Point = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _x_of(y: int, sign: int) -> int | None:
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    return _P - x if (x & 1) != sign else x


def _point(data: bytes) -> _Point | None:
    y = int.from_bytes(data, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    x = _x_of(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _x_of(_GY, 0) or 0
_G: _Point = (_GX, _GY, 1, _GX * _GY % _P)


def _ed25519_pure(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """RFC 8032 section 6 (the reference verification), for machines without ``cryptography``."""
    a, r = _point(public_key), _point(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _Q:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % _Q
    left, right = _mul(s, _G), _add(r, _mul(h, a))
    return (left[0] * right[2] - right[0] * left[2]) % _P == 0 and (left[1] * right[2] - right[1] * left[2]) % _P == 0


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes, *, pure: bool = False) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    if not pure:
        try:
            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        except ImportError:  # an inspector's machine without it
            pure = True
        else:
            try:
                Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
            except InvalidSignature:
                return False
            return True
    return _ed25519_pure(public_key, message, signature)


def check_checkpoint(cp: Any, keys: dict[str, bytes] | None, where: str = "checkpoint") -> str | None:
    """None when ``cp`` is a checkpoint whose signature verifies with one of ``keys`` (None: the key
    the checkpoint itself names), else what is wrong."""
    if not isinstance(cp, dict) or cp.get("format") != CHECKPOINT_FORMAT:
        return f"{where}: not a sopflow checkpoint (expected format {CHECKPOINT_FORMAT!r})"
    for name, kind in (("n", int), ("seq", int), ("head_hash", str), ("created_at", str), ("key_id", str)):
        if not isinstance(cp.get(name), kind):
            return f"{where}: {name} is missing or not a{'n integer' if kind is int else ' string'}"
    label = f"{where} {cp['n']} (event {cp['seq']})"
    if keys is None:
        try:
            raw = base64.b64decode(str(cp.get("public_key") or ""), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if key_id_of(raw) != cp["key_id"]:
            return f"{label}: the public key it carries is not key {cp['key_id']}"
    elif cp["key_id"] not in keys:
        return (
            f"{label}: signed by key {cp['key_id']}, which is not among the public keys it was checked with: "
            "forged, or signed with a key this installation never published"
        )
    else:
        raw = keys[cp["key_id"]]
    try:
        signature = base64.b64decode(str(cp.get("signature") or ""), validate=True)
    except (binascii.Error, ValueError):
        signature = b""
    if not ed25519_verify(raw, checkpoint_message(cp), signature):
        return f"{label}: its signature does not verify with key {cp['key_id']}: the checkpoint was altered or forged"
    return None


def _check_export_checkpoint(doc: dict[str, Any], keys: dict[str, bytes] | None, problems: list[str]) -> None:
    cp = doc.get("checkpoint")
    if cp is None:
        if keys is not None:
            problems.append("checkpoint: the export carries no signed checkpoint (made before sopflow signed them?)")
        return
    if problem := check_checkpoint(cp, keys):
        problems.append(problem)
        return
    head = doc.get("audit_head") or {}
    if head.get("seq") != cp["seq"] or head.get("hash") != cp["head_hash"]:
        problems.append(
            f"checkpoint {cp['n']} covers event {cp['seq']} ({cp['head_hash'][:12]}…), but the export's audit_head is "
            f"event {head.get('seq')} ({str(head.get('hash'))[:12]}…): the head was altered"
        )


def _check_events(doc: dict[str, Any], problems: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """Check the events; returns the row each event recorded, by (table, id), with its event's seq."""
    covered: dict[tuple[str, str], dict[str, Any]] = {}
    prev: dict[str, Any] | None = None
    for ev in doc.get("audit_events") or []:
        seq = ev.get("seq")
        if event_hash(ev) != ev.get("hash"):
            problems.append(f"audit event {seq}: its content does not match its hash: the event was edited")
        if prev is not None:
            if not isinstance(seq, int) or seq <= prev["seq"]:
                problems.append(f"audit event {seq}: out of chain order (follows event {prev['seq']})")
            elif seq == prev["seq"] + 1 and ev.get("prev_hash") != prev.get("hash"):
                problems.append(f"audit event {seq}: does not follow event {prev['seq']} (prev_hash differs)")
        elif seq == 1 and ev.get("prev_hash") != GENESIS:
            problems.append("audit event 1: does not start the chain (prev_hash is not the genesis hash)")
        payload = ev.get("payload")
        if isinstance(payload, dict) and isinstance(payload.get("row"), dict):
            key = (str(ev.get("object_type")), str(ev.get("object_id")))
            if key in covered:
                problems.append(f"audit event {seq}: records {key[0]} row {key[1]} a second time")
            covered[key] = {"seq": seq, "row": payload["row"]}
        prev = ev
    head = doc.get("audit_head")
    events = doc.get("audit_events") or []
    if head and events:
        last = events[-1]
        if head.get("seq") == last.get("seq") and head.get("hash") != last.get("hash"):
            problems.append(f"audit_head: names event {head.get('seq')} with a hash other than that event's")
        elif isinstance(head.get("seq"), int) and isinstance(last.get("seq"), int) and head["seq"] < last["seq"]:
            problems.append(f"audit_head: event {head['seq']} is older than the export's last event {last['seq']}")
    return covered


def _check_rows(doc: dict[str, Any], covered: dict[tuple[str, str], dict[str, Any]], problems: list[str]) -> None:
    rows: dict[str, list[dict[str, Any]]] = doc.get("rows") or {}
    seen: set[tuple[str, str]] = set()
    for table, table_rows in sorted(rows.items()):
        for row in table_rows:
            key = (table, str(row.get("id")))
            seen.add(key)
            ev = covered.get(key)
            if ev is None:
                problems.append(f"{table} row {key[1]}: no audit event in the export records it (an event was removed)")
            elif ev["row"] != row:
                changed = sorted(k for k in set(row) | set(ev["row"]) if row.get(k) != ev["row"].get(k))
                problems.append(
                    f"{table} row {key[1]}: differs from what audit event {ev['seq']} recorded ({', '.join(changed)})"
                )
    for (table, row_id), ev in sorted(covered.items(), key=lambda kv: kv[1]["seq"]):
        if (table, row_id) not in seen and table in rows:
            problems.append(f"audit event {ev['seq']} records {table} row {row_id}, which is missing from the export")
    for table in ("sf_step_record", "sf_run_event"):
        ns = sorted(int(r["n"]) for r in rows.get(table, []) if isinstance(r.get("n"), int))
        for want, got in zip(range(1, len(ns) + 1), ns, strict=True):
            if want != got:
                problems.append(f"{table}: position {want} is missing (a row was removed from the export)")
                break


def _check_signatures(doc: dict[str, Any], problems: list[str]) -> None:
    rows = doc.get("rows") or {}
    runs = {r.get("id"): r for r in rows.get("sf_run", [])}
    records = rows.get("sf_step_record", [])
    for sig in rows.get("sf_signature", []):
        run = runs.get(sig.get("run_id"))
        carrying = [r for r in records if r.get("signature_id") == sig.get("id")]
        if run is None or not carrying:
            problems.append(f"sf_signature row {sig.get('id')}: the run or step record it signs is not in the export")
            continue
        for rec in carrying:
            try:
                data = json.loads(rec.get("data_json") or "null")
            except ValueError:
                problems.append(f"sf_step_record row {rec.get('id')}: data_json is not JSON")
                continue
            signed = {
                "run_id": run["id"],
                "sop_sha256": run.get("sop_sha256"),
                "step_id": sig.get("step_id"),
                "data": data,
                "signer_id": sig.get("user_id"),
                "printed_name": sig.get("printed_name"),
                "meaning": sig.get("meaning"),
                "statement": sig.get("statement"),
                "signed_at": sig.get("signed_at"),
            }
            if rec.get("step_id") != sig.get("step_id") or _sha256(signed) != sig.get("signed_sha256"):
                problems.append(
                    f"sf_signature row {sig.get('id')}: its hash does not match the data it signed "
                    f"(step record {rec.get('id')})"
                )


def _same(
    problems: list[str], where: str, shown: dict[str, Any], row: dict[str, Any] | None, pairs: dict[str, Any]
) -> None:
    """``shown[k]`` must equal ``pairs[k](row)`` (or ``row[pairs[k]]``) for every key shown."""
    if row is None:
        problems.append(f"{where}: names a row that is not in the export")
        return
    for key, source in pairs.items():
        if key not in shown:
            continue
        want = source(row) if callable(source) else row.get(source)
        if shown[key] != want:
            problems.append(f"{where}.{key}: says {shown[key]!r}, the recorded row says {want!r}")


def _json(field: str) -> Any:
    return lambda row: json.loads(row[field]) if row.get(field) is not None else None


_SIG = {
    "id": "id",
    "printed_name": "printed_name",
    "meaning": "meaning",
    "statement": "statement",
    "signed_at": "signed_at",
    "sha256": "signed_sha256",
}
_REC = {
    "n": "n",
    "step_id": "step_id",
    "status": "status",
    "at": "at",
    "data": _json("data_json"),
    "reason": "reason",
    "supersedes": "supersedes_id",
    "task_run_id": "task_run_id",
}


def _check_readable(doc: dict[str, Any], problems: list[str]) -> None:
    rows = doc.get("rows") or {}
    by_id = {table: {r.get("id"): r for r in table_rows} for table, table_rows in rows.items()}
    recs, sigs = by_id.get("sf_step_record", {}), by_id.get("sf_signature", {})

    def sig_check(where: str, shown: dict[str, Any] | None, sig_id: Any = None) -> None:
        if shown is not None:
            _same(problems, where, shown, sigs.get(shown.get("id")), _SIG)
            if sig_id is not None and shown.get("id") != sig_id:
                problems.append(f"{where}.id: says {shown.get('id')!r}, the recorded row says {sig_id!r}")

    run = doc.get("run") or {}
    _same(
        problems,
        "run",
        run,
        by_id.get("sf_run", {}).get(run.get("id")),
        {
            "institution": "institution",
            "sop_id": "sop_id",
            "sop_version": "sop_version",
            "sop_sha256": "sop_sha256",
            "schema_version": "schema_version",
            "params": _json("params_json"),
            "product": _json("product_json"),
            "started_at": "started_at",
            "flow_run_id": "flow_run_id",
        },
    )
    for i, h in enumerate(doc.get("history") or []):
        rec = recs.get(h.get("id"))
        _same(problems, f"history[{i}]", h, rec, _REC)
        sig_check(f"history[{i}].signature", h.get("signature"), rec.get("signature_id") if rec else None)
    newest: dict[str, dict[str, Any]] = {}
    for rec in sorted(recs.values(), key=lambda r: r.get("n") or 0):
        newest[rec.get("step_id")] = rec
    for i, st in enumerate(doc.get("steps") or []):
        rec = newest.get(st.get("id"))
        if rec is None:
            if st.get("status") != "not reached":
                problems.append(
                    f"steps[{i}] ({st.get('id')}): says {st.get('status')!r}, but no record of it is exported"
                )
            continue
        _same(
            problems,
            f"steps[{i}] ({st.get('id')})",
            st,
            rec,
            {"status": "status", "at": "at", "data": _json("data_json")},
        )
        sig_check(f"steps[{i}] ({st.get('id')}).signature", st.get("signature"))
        for j, c in enumerate(st.get("corrections") or []):
            where = f"steps[{i}] ({st.get('id')}).corrections[{j}]"
            new, old = recs.get(c.get("record_id")), recs.get(c.get("supersedes"))
            _same(problems, where, c, new, {"at": "at", "reason": "reason", "supersedes": "supersedes_id"})
            sig_check(f"{where}.signature", c.get("signature"), new.get("signature_id") if new else None)
            if new is not None and old is not None:
                new_data, old_data = json.loads(new["data_json"]), json.loads(old["data_json"])
                for name, change in (c.get("changes") or {}).items():
                    if change.get("old") != old_data.get(name) or change.get("new") != new_data.get(name):
                        problems.append(
                            f"{where}.changes.{name}: says {change.get('old')!r} → {change.get('new')!r}, "
                            f"the recorded rows say {old_data.get(name)!r} → {new_data.get(name)!r}"
                        )
    simple = {
        "run_events": ("sf_run_event", {"n": "n", "status": "status", "detail": "detail", "at": "at"}),
        "deviations": (
            "sf_deviation",
            {
                "step_id": "step_id",
                "classification": "classification",
                "description": "description",
                "quarantine": "quarantine",
                "opened_at": "opened_at",
            },
        ),
        "documents": (
            "sf_document",
            {
                "step_id": "step_id",
                "template": "template",
                "path": "path",
                "sha256": "sha256",
                "rendered_at": "rendered_at",
            },
        ),
        "escalations": (
            "sf_escalation",
            {
                "step_id": "step_id",
                "kind": "kind",
                "to_role": "to_role",
                "at": "at",
                "waiting_since": "waiting_since",
                "deviation_id": "deviation_id",
                "deliveries": _json("deliveries_json"),
            },
        ),
    }
    for section, (table, pairs) in simple.items():
        for i, entry in enumerate(doc.get(section) or []):
            _same(problems, f"{section}[{i}]", entry, by_id.get(table, {}).get(entry.get("id")), pairs)


def verify_export(doc: dict[str, Any], keys: dict[str, bytes] | None = None) -> list[str]:
    """Every problem found in an exported record, the first mismatch first; empty when it verifies.
    ``keys``: the installation's public keys by id (None: check the checkpoint against the key it names)."""
    problems: list[str] = []
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("audit_events"), list)
        or not isinstance(doc.get("rows"), dict)
    ):
        return [
            "not a sopflow record export: 'audit_events' and 'rows' are missing (export with `sopflow record RUN --json`)"
        ]
    covered = _check_events(doc, problems)
    _check_rows(doc, covered, problems)
    _check_signatures(doc, problems)
    _check_readable(doc, problems)
    _check_export_checkpoint(doc, keys, problems)
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python export.py FILE [--key KEY|KEYFILE]``: print OK or every problem; exit 1 when the export does not verify."""
    args = list(sys.argv[1:] if argv is None else argv)
    keys: dict[str, bytes] | None = None
    if len(args) == 3 and args[1] == "--key":
        try:
            keys = parse_public_keys(_read_key_arg(args[2]))
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"error: --key {args[2]}: {exc}\n")
            return 1
        args = args[:1]
    if len(args) != 1:
        sys.stderr.write("usage: python export.py RECORD.json [--key PUBLIC_KEY_OR_FILE]\n")
        return 2
    try:
        with open(args[0], encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"error: {args[0]}: {exc}\n")
        return 1
    problems = verify_export(doc, keys)
    for p in problems:
        sys.stderr.write(f"verify-export: {p}\n")
    if problems:
        return 1
    sys.stdout.write(
        f"verify-export: OK ({len(doc['audit_events'])} audit events, "
        f"{sum(len(v) for v in doc['rows'].values())} rows)\n"
    )
    return 0


def _read_key_arg(arg: str) -> str:
    """``--key``: a key itself (base64, as ``sopflow audit key`` prints it) or a file of keys."""
    import os

    if os.path.exists(arg):
        with open(arg, encoding="utf-8") as f:
            return f.read()
    return arg


if __name__ == "__main__":
    sys.exit(main())
