"""Edge: a local notification receiver for `sopflow demo` (and the tests).

apprise delivers to it for real (``json://127.0.0.1:PORT/``): the same code path as any webhook
channel, no mock. It listens on loopback only and keeps what it received in memory.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LocalReceiver"]


class LocalReceiver:
    """``with LocalReceiver() as rx: ... rx.url ... rx.messages``"""

    def __init__(self, port: int = 0) -> None:
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class _Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    message = json.loads(body or b"{}")
                except ValueError:
                    message = {"raw": body.decode("utf-8", "replace")}
                with receiver._lock:
                    receiver.messages.append({"path": self.path, **message})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:  # keep the terminal for the demo's own output
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str = "") -> str:
        """An apprise URL that delivers here; ``path`` tells channels apart (e.g. the role)."""
        return f"json://127.0.0.1:{self.port}/{path}"

    def start(self) -> LocalReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LocalReceiver:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any] | None:
        """The first message for which ``predicate(message)`` is true, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for m in self.messages:
                    if predicate(m):
                        return m
            time.sleep(0.02)
        return None
