# mypy: disable-error-code="no-untyped-call,assignment,override,misc,return-value"
# (apprise's NotifyBase and URLBase are untyped or typed as None: these two subclasses follow their shape.)
"""Stage 4 (edge): apprise plugins for the group robots of WeCom (企业微信) and DingTalk (钉钉), at
the address one names (issue 14).

apprise's own ``wecombot://`` sends WeCom only plain text, and its ``dingtalk://`` posts only to
the public cloud host. These two post the robots' own markdown messages to any webhook address:
the public one, a hospital's private WeCom or DingTalk deployment, or a local receiver in the tests::

    wecomrobots://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=KEY                 WeCom robot, markdown
    dingtalkrobots://oapi.dingtalk.com/robot/send?access_token=TOKEN&secret=S  DingTalk robot, markdown,
                                                                              signed (HMAC-SHA256)

``wecomrobot://`` and ``dingtalkrobot://`` are the same over plain HTTP (a receiver on this machine). A
robot answers HTTP 200 with ``errcode`` in its JSON; anything but ``errcode: 0`` is a failed
delivery. ``register_robots()`` adds both to apprise once; ``flows.outputs.notify`` calls it.
Must not import prefect.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import requests
from apprise import NotifyFormat, NotifyType
from apprise.plugins.base import NotifyBase

__all__ = ["DingTalkRobot", "WeComRobot", "register_robots"]

WECOM_MAX_BYTES = 4096
"""WeCom refuses a markdown message longer than this (UTF-8 bytes)."""


class _Robot(NotifyBase):
    """A robot webhook at ``{scheme}://host[:port]/path?{query_name}=…``."""

    query_name = "key"
    default_path = "/"
    notify_format = NotifyFormat.MARKDOWN
    request_rate_per_sec = 0
    templates = ("{schema}://{host}/{fullpath}",)

    def __init__(self, token: str | None = None, secret: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.token = token or ""
        self.secret = secret or None
        self.fullpath = kwargs.get("fullpath") or self.default_path

    @property
    def endpoint(self) -> str:
        port = f":{self.port}" if isinstance(self.port, int) else ""
        return f"{'https' if self.secure else 'http'}://{self.host}{port}{self.fullpath}"

    @property
    def url_identifier(self) -> tuple[str, ...]:
        return (self.secure_protocol if self.secure else self.protocol, self.host or "", self.fullpath, self.token)

    def url(self, privacy: bool = False, *args: Any, **kwargs: Any) -> str:
        scheme = self.secure_protocol if self.secure else self.protocol
        token = self.pprint(self.token, privacy, safe="")
        port = f":{self.port}" if isinstance(self.port, int) else ""
        return f"{scheme}://{self.host}{port}{self.fullpath}?{self.query_name}={token}"

    def __len__(self) -> int:
        return 1

    @classmethod
    def parse_url(cls, url: str) -> dict[str, Any] | None:
        results: dict[str, Any] | None = NotifyBase.parse_url(url, verify_host=True)
        if not results:
            return results
        qsd = results.get("qsd", {})
        results["token"] = NotifyBase.unquote(qsd.get(cls.query_name, ""))
        if qsd.get("secret"):
            results["secret"] = NotifyBase.unquote(qsd["secret"])
        return results

    def _post(self, payload: dict[str, Any], params: dict[str, str]) -> bool:
        self.throttle()
        try:
            r = requests.post(
                self.endpoint,
                params=params,
                data=json.dumps(payload, ensure_ascii=False).encode("utf-8"),
                headers={"User-Agent": self.app_id, "Content-Type": "application/json; charset=utf-8"},
                verify=self.verify_certificate,
                timeout=self.request_timeout,
            )
        except requests.RequestException as exc:
            self.logger.warning("%s: could not reach %s: %s", self.service_name, self.host, exc)
            return False
        try:
            answer = r.json()
        except ValueError:
            answer = {}
        if r.status_code != 200 or answer.get("errcode") != 0:
            self.logger.warning(
                "%s refused the message: HTTP %s, errcode %r, %r",
                self.service_name,
                r.status_code,
                answer.get("errcode"),
                answer.get("errmsg"),
            )
            return False
        return True


class WeComRobot(_Robot):
    """A WeCom group robot: ``{"msgtype": "markdown", "markdown": {"content": …}}``."""

    service_name = "WeCom robot"
    protocol = "wecomrobot"
    secure_protocol = "wecomrobots"
    default_path = "/cgi-bin/webhook/send"

    def send(self, body: str, title: str = "", notify_type: NotifyType = NotifyType.INFO, **kwargs: Any) -> bool:
        # WeCom markdown has no title field: sopflow's message carries its own heading (a plain
        # string given to apprise with a title gets it as its first line).
        if title and not body.startswith("#"):
            body = f"### {title}\n{body}"
        content = body.encode("utf-8")[:WECOM_MAX_BYTES].decode("utf-8", errors="ignore")
        return self._post({"msgtype": "markdown", "markdown": {"content": content}}, {"key": self.token})


class DingTalkRobot(_Robot):
    """A DingTalk group robot: ``{"msgtype": "markdown", "markdown": {"title", "text"}}``, signed with
    the robot's secret when it has one (``timestamp`` and ``sign`` query parameters)."""

    service_name = "DingTalk robot"
    protocol = "dingtalkrobot"
    secure_protocol = "dingtalkrobots"
    default_path = "/robot/send"
    query_name = "access_token"

    def send(self, body: str, title: str = "", notify_type: NotifyType = NotifyType.INFO, **kwargs: Any) -> bool:
        heading = " ".join(title.split()) or self.app_desc
        payload = {"msgtype": "markdown", "markdown": {"title": heading, "text": f"#### {heading}\n\n{body}"}}
        params = {"access_token": self.token}
        if self.secret:
            stamp = str(round(time.time() * 1000))
            digest = hmac.new(self.secret.encode(), f"{stamp}\n{self.secret}".encode(), hashlib.sha256).digest()
            params |= {"timestamp": stamp, "sign": base64.b64encode(digest).decode()}  # requests url-encodes it once
        return self._post(payload, params)


_REGISTERED = False


def register_robots() -> None:
    """Add both robots to apprise's plugins (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from apprise.apprise import N_MGR

    for plugin in (WeComRobot, DingTalkRobot):
        N_MGR.add(plugin, schemas=[plugin.protocol, plugin.secure_protocol])
    _REGISTERED = True
