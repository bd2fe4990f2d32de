"""Local receivers that speak each notification channel, for apprise to deliver to for real:

- ``SmtpSink``: an SMTP server (aiosmtpd) on a loopback port, keeping every message it accepts;
- ``RobotReceiver``: an HTTP server that answers like a WeCom or a DingTalk group robot: it checks
  the robot's key (``key`` / ``access_token``), the JSON shape each accepts (``msgtype`` and its
  body; WeCom's 4096-byte limit on markdown; DingTalk's ``timestamp`` + HMAC-SHA256 ``sign`` when the
  robot has a secret, within an hour), and answers HTTP 200 with ``errcode`` 0 or the robot's error
  code, as the real ones do.
"""

from __future__ import annotations

import base64
import email
import hashlib
import hmac
import json
import threading
import time
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from aiosmtpd.controller import Controller

from tests.fixtures_engine import free_port
from tests.waiting import eventually

__all__ = ["RobotReceiver", "SmtpSink"]


class SmtpSink:
    """``with SmtpSink() as smtp: … smtp.url(to)`` → an apprise ``mailto://`` URL delivering here."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.envelopes: list[Any] = []
        self.port = free_port()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # aiosmtpd's handler hook
        self.envelopes.append(envelope)
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"

    def url(self, to: str) -> str:
        return f"mailto://127.0.0.1:{self.port}?from=sopflow@hospital.example&to={to}&mode=insecure"

    def wait(self, n: int = 1) -> list[Message]:
        eventually(lambda: len(self.messages) >= n, f"{n} mail(s) at the SMTP sink")
        return self.messages

    def __enter__(self) -> SmtpSink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()


class RobotReceiver:
    """A WeCom (``kind="wecom"``) or DingTalk (``kind="dingtalk"``) group robot on a loopback port."""

    def __init__(self, kind: str, token: str = "robotkey123", secret: str | None = None) -> None:  # noqa: S107 (a test robot)
        self.kind, self.token, self.secret = kind, token, secret
        self.accepted: list[dict[str, Any]] = []
        self.refused: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                query = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                code, message = receiver.judge(urlparse(self.path).path, query, body)
                answer = json.dumps({"errcode": code, "errmsg": message}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def judge(self, path: str, query: dict[str, str], raw: bytes) -> tuple[int, str]:
        try:
            payload = json.loads(raw.decode("utf-8"))
        except ValueError:
            return self._refuse(40001 if self.kind == "wecom" else 300001, "invalid json", {})
        if self.kind == "wecom":
            return self._wecom(path, query, payload)
        return self._dingtalk(path, query, payload)

    def _refuse(self, code: int, why: str, payload: dict[str, Any]) -> tuple[int, str]:
        self.refused.append({"errcode": code, "why": why, "payload": payload})
        return code, why

    def _wecom(self, path: str, query: dict[str, str], payload: dict[str, Any]) -> tuple[int, str]:
        if path != "/cgi-bin/webhook/send" or query.get("key") != self.token:
            return self._refuse(93000, "invalid webhook url", payload)
        kind = payload.get("msgtype")
        if kind not in ("text", "markdown") or not isinstance(payload.get(kind), dict):
            return self._refuse(40008, "invalid message type", payload)
        content = payload[kind].get("content")
        if not isinstance(content, str) or not content:
            return self._refuse(44004, "empty content", payload)
        if kind == "markdown" and len(content.encode("utf-8")) > 4096:
            return self._refuse(40058, "markdown.content exceed max length 4096", payload)
        self.accepted.append(payload)
        return 0, "ok"

    def _dingtalk(self, path: str, query: dict[str, str], payload: dict[str, Any]) -> tuple[int, str]:
        if path != "/robot/send" or query.get("access_token") != self.token:
            return self._refuse(300001, "token is not exist", payload)
        if self.secret is not None:
            stamp, sign = query.get("timestamp", ""), query.get("sign", "")
            digest = hmac.new(self.secret.encode(), f"{stamp}\n{self.secret}".encode(), hashlib.sha256).digest()
            if not stamp.isdigit() or abs(time.time() * 1000 - int(stamp)) > 3600_000:
                return self._refuse(310000, "sign not match, timestamp is expired", payload)
            if sign != base64.b64encode(digest).decode():
                return self._refuse(310000, "sign not match", payload)
        kind = payload.get("msgtype")
        if kind == "markdown":
            md = payload.get("markdown") or {}
            if not md.get("title") or not md.get("text"):
                return self._refuse(300001, "markdown.title and markdown.text are required", payload)
        elif kind != "text" or not (payload.get("text") or {}).get("content"):
            return self._refuse(300001, "invalid msgtype", payload)
        self.accepted.append(payload)
        return 0, "ok"

    def url(self, *, secret: str | None = None, token: str | None = None) -> str:
        token = token or self.token
        if self.kind == "wecom":
            return f"wecomrobot://127.0.0.1:{self.port}/cgi-bin/webhook/send?key={token}"
        tail = f"&secret={secret}" if secret else ""
        return f"dingtalkrobot://127.0.0.1:{self.port}/robot/send?access_token={token}{tail}"

    def __enter__(self) -> RobotReceiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
