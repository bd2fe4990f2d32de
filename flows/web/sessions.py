"""Edge: web sessions, server-side, and their CSRF tokens.

The browser holds only a random token (``secrets.token_urlsafe(32)``) in an HttpOnly,
SameSite=Strict cookie (``Secure`` too when the page came over HTTPS); everything else stays in
this process's memory, keyed by that token. A session ends at logout, or after
``SOPFLOW_WEB_IDLE_MINUTES`` without a request (idle timeout). Signing in replaces the token
(no session fixation). Every form carries the session's CSRF token in a hidden field, and every
POST is refused (403, nothing written) unless it matches.

Why in memory: sessions are not quality records (sign-ins and sign-outs are, in the audit chain),
and a restart that signs everybody out is safe. One ``sopflow web`` process holds them; more than
one process behind a proxy needs sticky sessions or a shared store behind the same interface.

Signing is never covered by the session: every signature asks for the password again
(21 CFR 11.200(a)(1)(ii), signatures outside one continuous controlled session).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

__all__ = ["COOKIE", "SessionStore", "WebSession"]

COOKIE = "sopflow_session"


@dataclass
class WebSession:
    token: str
    csrf: str
    language: str
    username: str | None = None
    printed_name: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    here: str = "/inbox"
    """The page last shown (the language switch returns to it)."""
    flash: list[tuple[str, str]] = field(default_factory=list)
    """Messages for the next page: (kind, text) with kind ``ok`` or ``error``."""

    @property
    def who(self) -> str:
        """The signed-in user's name: for routes behind ``Web.user``, which signs the visitor in first."""
        if self.username is None:
            raise RuntimeError("no one is signed in on this session")
        return self.username

    def csrf_ok(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf.encode(), str(token).encode())


class SessionStore:
    """Sessions by token; thread-safe (uvicorn runs sync routes in a thread pool)."""

    def __init__(self, idle_seconds: float, clock: object = time.monotonic) -> None:
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._sessions: dict[str, WebSession] = {}
        self._lock = threading.Lock()

    def _now(self) -> float:
        return float(self._clock())  # type: ignore[operator]

    def new(self, language: str) -> WebSession:
        """An anonymous session (it carries the login form's CSRF token and the chosen language)."""
        s = WebSession(
            token=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), language=language, last_seen=self._now()
        )
        with self._lock:
            self._sessions[s.token] = s
        return s

    def get(self, token: str | None, *, touch: bool = True) -> tuple[WebSession | None, WebSession | None]:
        """(live session, expired session): the session for this token (touched now unless
        ``touch=False``: the inbox's own refresh is no sign of a person at the screen), or the one
        the idle timeout has just ended (removed; the caller audits it)."""
        if not token:
            return None, None
        now = self._now()
        with self._lock:
            s = self._sessions.get(token)
            if s is None:
                return None, None
            if now - s.last_seen > self.idle_seconds:
                del self._sessions[token]
                return None, s
            if touch:
                s.last_seen = now
            return s, None

    def sign_in(self, old: WebSession, username: str, printed_name: str, language: str) -> WebSession:
        """A fresh token and CSRF token for a signed-in user; the anonymous session ends."""
        s = WebSession(
            token=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            language=language,
            username=username,
            printed_name=printed_name,
            last_seen=self._now(),
        )
        with self._lock:
            self._sessions.pop(old.token, None)
            self._sessions[s.token] = s
        return s

    def end(self, token: str) -> WebSession | None:
        with self._lock:
            return self._sessions.pop(token, None)

    def sweep(self) -> list[WebSession]:
        """Remove and return every session past the idle timeout."""
        now = self._now()
        with self._lock:
            gone = [s for s in self._sessions.values() if now - s.last_seen > self.idle_seconds]
            for s in gone:
                del self._sessions[s.token]
        return gone
