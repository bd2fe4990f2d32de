"""How ``sopflow web`` is served: uvicorn's options, with every TCP connection's Nagle turned off.

uvicorn's own ``--workers N`` path binds the listening socket itself with ``proto`` left at 0
(``Config.bind_socket``), and asyncio turns ``TCP_NODELAY`` on for an accepted connection only
when its socket says ``IPPROTO_TCP``: so with more than one worker every response on a kept-alive
connection went out as two segments (head, then body) with Nagle on, and the body waited for the
browser's delayed ACK, ~40 ms on Linux, on every page after a connection's first (measured: 52 ms
a sequential inbox page with 2 workers, 6-9 ms with 1; uvicorn issue #3149, open). The protocol
here sets ``TCP_NODELAY`` itself whatever the listener, so any number of workers serves as one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["NoDelayH11Protocol", "uvicorn_options"]

_TCP = {socket.AF_INET, socket.AF_INET6}


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with ``TCP_NODELAY`` set on each TCP connection it is handed."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in _TCP:
            with contextlib.suppress(OSError):  # a connection already gone: h11 finds out itself
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


def uvicorn_options(*, host: str, port: int, workers: int, trusted_proxies: str) -> dict[str, Any]:
    """``uvicorn.run``'s keyword arguments for ``sopflow web`` (but the app).

    ``http`` is the class by its import path: each worker process imports it there.
    proxy_headers: a TLS proxy's X-Forwarded-Proto makes the cookie Secure and turns HSTS on, and
    its X-Forwarded-For is the client sign-ins are counted for; both believed only from
    ``trusted_proxies``."""
    return {
        "factory": workers > 1,
        "workers": workers,
        "host": host,
        "port": port,
        "http": f"{__name__}:NoDelayH11Protocol",
        "proxy_headers": True,
        "forwarded_allow_ips": trusted_proxies,
        "log_level": "warning",
    }
