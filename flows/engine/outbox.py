"""Stage 2: the outbox: every notification is recorded before it is delivered, and delivered once.

``queue`` writes an ``OutboxMessage`` under its idempotency key (what caused it: a run's step, a
waiting period, an escalation, a deadline's deviation, a reminder) inside the caller's write
transaction, so the cause and its message commit together or not at all; the same cause never
queues a second one. ``deliver`` then hands it to each channel of its roles, channel by channel,
each step an append-only ``OutboxDelivery`` row: ``attempt`` just before the channel is called,
then ``delivered`` or ``failed``. Whoever delivers holds the message's lease
(``flows.engine.leases``: the run's while its flow executes, the job's for a periodic job), so an
``attempt`` with no outcome, found by the next holder, belongs to a process that died; it is
recorded ``interrupted`` and not sent again.

So a crash at any point delivers a message at most once, and at least once while the channel is up:

    crash before the message is recorded     the cause re-runs, queues it, delivers it: once
    after it is recorded, before delivery    the run re-entering (``flush_run``) or the sweep delivers it: once
    after delivery, before it is marked      the ``attempt`` row says it was handed over: not resent; ``interrupted``

The one window where a crash loses a message is between the ``attempt`` row and the channel's
answer (milliseconds on a local relay, the network call itself elsewhere): at most once wins; the
delivery is recorded ``interrupted`` (and a notify step's record lists it so). A channel that is down gets the message
when it comes back: ``sweep_outbox`` (a periodic job of the worker) retries failed deliveries with
back-off for a day.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from flows.config import Settings
from flows.engine.faults import fault_point
from flows.engine.leases import Leases, leases_for
from flows.outputs.messages import Message, message_from_json
from flows.outputs.notify import Target, channel_id, deliver, load_channels, redact, targets
from flows.record import ledger
from flows.record.db import read_session, write_session
from flows.record.tables import OutboxDelivery, OutboxMessage, utcnow

__all__ = ["FINAL", "deliver_message", "flush_run", "notify_once", "queue", "sweep_outbox"]

log = logging.getLogger("sopflow.outbox")

FINAL = ("delivered", "interrupted", "unaddressed")
"""A channel's states after which nothing more is sent to it (``unaddressed``: the message's roles
had no channel at all when it was due; one row with no channel says so)."""
ATTEMPTS = 3
"""Tries in one delivery (0.5 s, then 1 s apart), as before the outbox."""
RETRY_FOR = timedelta(days=1)
"""How long the sweep keeps retrying a channel that failed."""
SYSTEM = "system"


def queue(
    session: Session,
    *,
    key: str,
    institution: str,
    roles: list[str] | tuple[str, ...],
    title: str,
    body: str | Message,
    lease: str,
    run_id: str | None = None,
) -> OutboxMessage:
    """Record a message (in the caller's write transaction); the one already recorded under ``key`` if any."""
    found = session.exec(select(OutboxMessage).where(OutboxMessage.key == key)).first()
    if found is not None:
        return found
    msg = OutboxMessage(
        key=key,
        run_id=run_id,
        institution=institution,
        roles_json=json.dumps(list(roles)),
        title=title,
        body=str(body),
        message_json=None if isinstance(body, str) else body.to_json(),
        lease=lease,
        at=utcnow(),
    )
    ledger.append(session, msg, actor=SYSTEM, action="notification.queue")
    return msg


def notify_once(
    settings: Settings,
    *,
    key: str,
    institution: str,
    roles: list[str] | tuple[str, ...],
    title: str,
    body: str | Message,
    lease: str,
    run_id: str | None = None,
) -> list[dict[str, Any]]:
    """Queue a message (its own transaction) and deliver it; returns one delivery per channel.

    Raises:
        ConfigError: the notification channels file is broken (the message stays queued).
    """
    fault_point("outbox.before_record", key)
    with write_session(settings.database_url) as s:
        msg = queue(
            s, key=key, institution=institution, roles=roles, title=title, body=body, lease=lease, run_id=run_id
        )
        s.expunge(msg)
    return deliver_message(settings, msg)


def _newest(session: Session, message_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The newest delivery of each channel of each message, in one query, as plain columns
    (``message_id``, ``channel_sha256``, ``status``, ``n``, ``at``): no ORM rows for what is only read."""
    out: dict[str, dict[str, Any]] = {}
    if not message_ids:
        return out
    rows = session.execute(
        sa_select(
            col(OutboxDelivery.message_id),
            col(OutboxDelivery.channel_sha256),
            col(OutboxDelivery.status),
            col(OutboxDelivery.n),
            col(OutboxDelivery.at),
        )
        .where(col(OutboxDelivery.message_id).in_(message_ids))
        .order_by(col(OutboxDelivery.n))
    )
    for row in rows:
        out.setdefault(row.message_id, {})[row.channel_sha256] = row
    return out


def _states(session: Session, message_id: str) -> dict[str, OutboxDelivery]:
    """The newest delivery row of each channel of a message."""
    newest: dict[str, OutboxDelivery] = {}
    rows = session.exec(
        select(OutboxDelivery).where(OutboxDelivery.message_id == message_id).order_by(col(OutboxDelivery.n))
    )
    for row in rows:
        newest[row.channel_sha256] = row
    return newest


def _mark(settings: Settings, msg: OutboxMessage, target: Target, status: str, *, expect: int) -> int | None:
    """Append the channel's next row (``expect`` is the ``n`` it must still be at); its n, or None
    when someone else wrote one in between."""
    cid = channel_id(target.url) if target.url else ""
    with write_session(settings.database_url) as s:
        current = _states(s, msg.id).get(cid)
        n = current.n if current is not None else 0
        if n != expect:
            return None
        row = OutboxDelivery(
            message_id=msg.id,
            channel_sha256=cid,
            channel=redact(target.url) if target.url else "",
            role=target.role,
            n=n + 1,
            status=status,
            holder=msg.lease,
            at=utcnow(),
        )
        ledger.append(s, row, actor=SYSTEM, action=f"notification.{status}")
        return n + 1


def _send(settings: Settings, msg: OutboxMessage, target: Target, n: int) -> tuple[int | None, bool]:
    """One try: ``attempt``, the channel, then its outcome. Returns (rows now, delivered)."""
    n_attempt = _mark(settings, msg, target, "attempt", expect=n)
    if n_attempt is None:
        return None, False
    ok = deliver(target.url, msg.title, message_from_json(msg.message_json) if msg.message_json else msg.body)
    fault_point("outbox.after_delivery", msg.key)
    return _mark(settings, msg, target, "delivered" if ok else "failed", expect=n_attempt), ok


def deliver_message(
    settings: Settings,
    msg: OutboxMessage,
    *,
    leases: Leases | None = None,
    retry_failed: bool = True,
    owner: str | None = None,
) -> list[dict[str, Any]]:
    """Deliver a recorded message to each of its channels not yet done; one dict per channel.

    Takes the message's lease (already held by the run or job that queued it; ``owner``: who in this
    process takes it, see ``Leases``); when someone else holds it, delivers nothing now (its holder
    or the sweep will).

    Raises:
        ConfigError: the notification channels file is broken.
    """
    leases = leases or leases_for(settings.database_url)
    fault_point("outbox.before_delivery", msg.key)
    out: list[dict[str, Any]] = []
    with leases.hold(msg.lease, owner) as mine:
        if not mine:
            log.info("notification %s: its lease %s is held elsewhere; delivered later", msg.key, msg.lease)
            return out
        found = targets(load_channels(settings.notify_config), msg.institution, json.loads(msg.roles_json))
        with read_session(settings.database_url) as s:
            states = _states(s, msg.id)
        if not found and not states:
            _mark(settings, msg, Target(role="", url=""), "unaddressed", expect=0)
        for target in found:
            state = states.get(channel_id(target.url))
            status = state.status if state is not None else None
            n = state.n if state is not None else 0
            if status == "attempt":  # we hold the lease: whoever wrote it is gone
                log.error(
                    "notification %s to %s: its delivery was interrupted; not resent", msg.key, redact(target.url)
                )
                _mark(settings, msg, target, "interrupted", expect=n)
                status = "interrupted"
            if status == "failed" and not retry_failed:
                pass
            elif status not in FINAL:
                for i in range(ATTEMPTS):
                    if i:
                        time.sleep(0.5 * i)
                    done, ok = _send(settings, msg, target, n)
                    if done is None:
                        break
                    n, status = done, "delivered" if ok else "failed"
                    if ok:
                        break
            out.append(
                {"role": target.role, "channel": redact(target.url), "ok": status == "delivered", "status": status}
            )
    return out


def flush_run(settings: Settings, run_id: str) -> int:
    """Deliver the messages of a run that a crash left undelivered (called when its flow re-enters).
    Two queries whatever the run's length: a resume late in a run costs what an early one does."""
    with read_session(settings.database_url) as s:
        msgs = {m.id: m for m in s.exec(select(OutboxMessage).where(OutboxMessage.run_id == run_id))}
        newest = _newest(s, list(msgs))
        pending = [
            m
            for mid, m in msgs.items()
            if not newest.get(mid) or any(d.status == "attempt" for d in newest[mid].values())
        ]
        for m in pending:
            s.expunge(m)
    for msg in pending:
        try:
            deliver_message(settings, msg, retry_failed=False)
        except Exception:  # a broken notify.yaml must not stop the run
            log.exception("notification %s of run %s could not be delivered", msg.key, run_id)
    return len(pending)


def sweep_outbox(settings: Settings, *, leases: Leases | None = None, older_than: float = 10.0) -> int:
    """The worker's periodic job: deliver messages nobody delivered (their holder died), and retry
    failed channels with back-off for ``RETRY_FOR``. Returns how many messages it touched."""
    leases = leases or leases_for(settings.database_url)
    now = utcnow()
    with read_session(settings.database_url) as s:
        recent = list(
            s.exec(
                select(OutboxMessage.id)
                .where(
                    col(OutboxMessage.at) >= now - RETRY_FOR,
                    col(OutboxMessage.at) <= now - timedelta(seconds=older_than),
                )
                .order_by(col(OutboxMessage.at))
            )
        )
        newest = _newest(s, recent)  # the messages themselves are read only for those left to deliver
        left = []
        for mid in recent:
            states = newest.get(mid, {})
            waiting = [d for d in states.values() if d.status not in FINAL]
            if not states or any(d.status == "attempt" or _due(d, now) for d in waiting):
                left.append(mid)
        todo = []
        if left:
            found = {m.id: m for m in s.exec(select(OutboxMessage).where(col(OutboxMessage.id).in_(left)))}
            for mid in left:
                s.expunge(found[mid])
                todo.append(found[mid])
    n = 0
    for msg in todo:
        if not leases.is_free(msg.lease):
            continue  # its run or job is executing: it delivers its own messages
        try:
            deliver_message(settings, msg, leases=leases, owner="job:outbox")
            n += 1
        except Exception:
            log.exception("notification %s could not be delivered; retrying at the next sweep", msg.key)
    return n


def _due(row: Any, now: Any) -> bool:
    """A failed channel is retried 30 s after its n-th row, doubling up to an hour."""
    return bool(
        row.status == "failed" and now - row.at >= timedelta(seconds=min(3600, 30 * 2 ** max(0, row.n // 2 - 1)))
    )
