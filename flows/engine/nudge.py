"""Stage 2: how a process tells the workers to poll now, on this machine and on every other.

``start`` and ``submit`` (through ``flows.engine.client``) nudge after they schedule or resume a run:

- on this machine, a UDP datagram to the port the local worker wrote to ``run/executor.nudge``;
- on PostgreSQL, ``NOTIFY sopflow_wake`` on sopflow's database, which every worker, on any
  machine, ``LISTEN``s to (``Wakeup``): a worker elsewhere claims a resumed run as fast as a local one.

A nudge may name the flow run it is about: a worker that ran it last (and still has it) claims it
at once, without polling the pool first. Best effort: a missing worker is fine; every worker also
polls (``SOPFLOW_POLL_MAX_SECONDS`` at most).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
from pathlib import Path
from typing import Any

from flows.config import Settings

__all__ = ["CHANNEL", "Wakeup", "nudge", "nudge_file"]

CHANNEL = "sopflow_wake"
log = logging.getLogger("sopflow.nudge")


def nudge_file(settings: Settings) -> Path:
    """Where the local worker writes the UDP port it listens on for nudges."""
    return settings.run_dir / "executor.nudge"


def nudge(settings: Settings, flow_run_id: object = None) -> None:
    """Tell the workers to poll now, about ``flow_run_id`` when given (best effort)."""
    payload = str(flow_run_id) if flow_run_id else "poll"
    with contextlib.suppress(OSError, ValueError, IndexError):
        port = int(nudge_file(settings).read_text().split()[0])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(payload.encode(), ("127.0.0.1", port))
    if settings.database_url.startswith("postgresql"):
        from sqlalchemy import text

        from flows.record.db import get_engine

        try:
            with get_engine(settings.database_url).connect() as conn:
                conn.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload})
                conn.commit()
        except Exception:  # the record is written; a worker finds the run by polling
            log.warning("could not notify the workers", exc_info=True)


class Wakeup:
    """What a worker waits on between polls: its UDP port and, on PostgreSQL, ``LISTEN sopflow_wake``."""

    def __init__(self, settings: Settings) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.port = int(self.udp.getsockname()[1])
        self._pg: Any = None
        if settings.database_url.startswith("postgresql"):
            from flows.engine.leases import dedicated_connection

            self._pg = dedicated_connection(settings.database_url)
            with contextlib.closing(self._pg.cursor()) as cur:
                cur.execute(f"LISTEN {CHANNEL}")

    def wait(self, timeout: float) -> set[str] | None:
        """Sleep up to ``timeout``; the nudges that came (what they named: flow run ids, or
        ``poll``), or None when none did."""
        sources: list[Any] = [self.udp] + ([self._pg] if self._pg is not None else [])
        try:
            ready, _, _ = select.select(sources, [], [], timeout)
        except (OSError, ValueError):  # the LISTEN connection broke: poll on
            return None
        got: set[str] = set()
        if self.udp in ready:
            while True:
                try:
                    got.add(self.udp.recv(64).decode(errors="replace"))
                except BlockingIOError:
                    break
        if self._pg is not None and self._pg in ready:
            try:
                self._pg.poll()
                got.update(n.payload or "poll" for n in self._pg.notifies)
                self._pg.notifies.clear()
            except Exception:
                log.warning("the LISTEN connection broke; polling only", exc_info=True)
                self._pg = None
        return got or None

    def close(self) -> None:
        self.udp.close()
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.close()
