"""Edge: web sessions, server-side and shared, and their CSRF tokens.

The browser holds only a random token (``secrets.token_urlsafe(32)``) in an HttpOnly,
SameSite=Strict cookie (``Secure`` too when the page came over HTTPS). The session itself is a
row in sopflow's database (``flows.services.web_sessions``, keyed by the token's sha256), so every
``sopflow web`` process behind a proxy serves it and a restart signs nobody out. A session ends at
logout, or after ``SOPFLOW_WEB_IDLE_MINUTES`` without a request (idle timeout, noticed by whichever
process sees it first, audited once). Signing in replaces the token (no session fixation). Every
form carries the session's CSRF token in a hidden field, and every POST is refused (403, nothing
written) unless it matches.

Signing is never covered by the session: every signature asks for the password again
(21 CFR 11.200(a)(1)(ii), signatures outside one continuous controlled session).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flows.services import web_sessions as db

__all__ = ["COOKIE", "SessionStore", "WebSession"]

COOKIE = "sopflow_session"
TOUCH_EVERY = 5.0
"""A request moves ``last_seen`` on when it is older than this (seconds): fewer writes, the same timeout."""
SWEEP_EVERY = 60.0
"""How often (seconds) a process looks for sessions nobody came back to."""


@dataclass
class WebSession:
    token: str
    csrf: str
    language: str
    username: str | None = None
    printed_name: str | None = None
    last_seen: float = field(default_factory=time.time)
    here: str = "/inbox"
    """The page last shown (the language switch returns to it)."""
    flash: list[tuple[str, str]] = field(default_factory=list)
    """Messages for the next page: (kind, text) with kind ``ok`` or ``error``."""
    saved: tuple[Any, ...] = ()
    """What the database holds of language, page and messages (``SessionStore.save`` writes changes)."""

    @property
    def who(self) -> str:
        """The signed-in user's name: for routes behind ``Web.user``, which signs the visitor in first."""
        if self.username is None:
            raise RuntimeError("no one is signed in on this session")
        return self.username

    def csrf_ok(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf.encode(), str(token).encode())

    def state(self) -> tuple[Any, ...]:
        return self.language, self.here, tuple(self.flash)


class SessionStore:
    """Sessions by token, in the database at ``database_url`` (``bind`` sets it when the app starts)."""

    def __init__(
        self, idle_seconds: float, clock: Callable[[], float] = time.time, database_url: str | None = None
    ) -> None:
        self.idle_seconds = idle_seconds
        self._clock = clock
        self.database_url = database_url
        self._last_sweep: float | None = None
        self._lock = threading.Lock()
        if database_url:
            db.prepare(database_url)

    def bind(self, database_url: str) -> None:
        """Use ``database_url`` unless the store was given one."""
        if not self.database_url:
            self.database_url = database_url
            db.prepare(database_url)

    @property
    def _url(self) -> str:
        if not self.database_url:
            raise RuntimeError("the session store has no database (SessionStore.bind)")
        return self.database_url

    def _now(self) -> float:
        return float(self._clock())

    def _session(self, token: str, row: dict[str, Any]) -> WebSession:
        ws = WebSession(
            token=token,
            csrf=row["csrf"],
            language=row["language"],
            username=row["username"],
            printed_name=row["printed_name"],
            last_seen=row["last_seen"],
            here=row["here"],
            flash=list(row["flash"]),
        )
        ws.saved = ws.state()
        return ws

    def _create(self, language: str, username: str | None = None, printed_name: str | None = None) -> WebSession:
        now = self._now()
        ws = WebSession(
            token=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            language=language,
            username=username,
            printed_name=printed_name,
            last_seen=now,
        )
        db.create(
            self._url, db.token_key(ws.token), ws.csrf, language, now, username=username, printed_name=printed_name
        )
        ws.saved = ws.state()
        return ws

    def new(self, language: str) -> WebSession:
        """An anonymous session (it carries the login form's CSRF token and the chosen language)."""
        return self._create(language)

    def get(self, token: str | None, *, touch: bool = True) -> tuple[WebSession | None, WebSession | None]:
        """(live session, expired session): the session for this token (touched now unless
        ``touch=False``: the inbox's own refresh is no sign of a person at the screen), or the one
        the idle timeout has just ended (this call ended it; the caller audits it)."""
        if not token:
            return None, None
        key = db.token_key(token)
        row = db.load(self._url, key)
        if row is None or row["ended_at"] is not None:
            return None, None
        now = self._now()
        if now - row["last_seen"] > self.idle_seconds:
            ended = db.end(self._url, key, now, "idle")
            return None, (self._session(token, ended) if ended else None)
        if touch and now - row["last_seen"] >= TOUCH_EVERY:
            db.touch(self._url, key, now)
            row["last_seen"] = now
        return self._session(token, row), None

    def sign_in(self, old: WebSession, username: str, printed_name: str, language: str) -> WebSession:
        """A fresh token and CSRF token for a signed-in user; the anonymous session ends."""
        db.end(self._url, db.token_key(old.token), self._now(), "signed_in")
        return self._create(language, username, printed_name)

    def end(self, token: str) -> WebSession | None:
        """End the session at sign-out; the session when this call ended it."""
        row = db.end(self._url, db.token_key(token), self._now(), "logout")
        return self._session(token, row) if row else None

    def save(self, ws: WebSession) -> None:
        """Write what a request changed (language, page, messages) for the next request, on any process."""
        if ws.state() != ws.saved:
            db.save(self._url, db.token_key(ws.token), ws.language, ws.here, list(ws.flash))
            ws.saved = ws.state()

    def sweep(self) -> list[WebSession]:
        """End (once, whichever process comes first) every session past the idle timeout and return
        them; at most every ``SWEEP_EVERY`` seconds per process."""
        now = self._now()
        with self._lock:
            if self._last_sweep is not None and now - self._last_sweep < SWEEP_EVERY:
                return []
            self._last_sweep = now
        gone = []
        for key in db.idle_since(self._url, now - self.idle_seconds):
            row = db.end(self._url, key, now, "idle")
            if row is not None:
                gone.append(self._session("", row))
        db.purge(self._url, now)
        return gone
