"""Stage 4 (edge): notifications through apprise, addressed to an institution's roles.

Channels are configuration, not SOP text (their URLs carry tokens): ``SOPFLOW_NOTIFY_CONFIG``
(default ``$SOPFLOW_HOME/notify.yaml``) maps institution -> role -> apprise URLs; the role ``"*"``
receives every message of that institution::

    demo_hospital:
      pharmacist: ["mailto://user:pass@example.org", "json://127.0.0.1:8765/"]
      "*": ["dingtalk://token/"]

A failed delivery never blocks a record: ``notify`` returns what was delivered and what failed,
and the caller records both. The engine's outbox (``flows.engine.outbox``) records each message
before delivery and delivers it channel by channel: ``targets`` lists a message's channels (each
once), ``deliver`` hands it to one, ``channel_id`` names a channel without its token. Must not
import prefect.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows.errors import ConfigError
from flows.outputs.messages import Message, channel_of

__all__ = [
    "Delivery",
    "Target",
    "channel_id",
    "channels_for",
    "deliver",
    "load_channels",
    "notify",
    "redact",
    "targets",
]


@dataclass(frozen=True)
class Delivery:
    role: str
    channel: str
    """The URL's scheme and host only: the rest may hold a token."""
    ok: bool

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "channel": self.channel, "ok": self.ok}


def load_channels(path: Path) -> dict[str, dict[str, list[str]]]:
    if not path.exists():
        return {}
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping institution -> role -> list of apprise URLs")
    out: dict[str, dict[str, list[str]]] = {}
    for inst, roles in raw.items():
        if not isinstance(roles, dict):
            raise ConfigError(f"{path}: {inst}: expected a mapping role -> list of apprise URLs")
        out[str(inst)] = {}
        for role, urls in roles.items():
            if isinstance(urls, str):
                urls = [urls]
            if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
                raise ConfigError(f"{path}: {inst}.{role}: expected a list of apprise URLs")
            out[str(inst)][str(role)] = urls
    return out


def channels_for(channels: dict[str, dict[str, list[str]]], institution: str, role: str) -> list[str]:
    inst = channels.get(institution, {})
    return [*inst.get(role, []), *inst.get("*", [])]


_HOST_SCHEMES = frozenset({"json", "jsons", "xml", "xmls", "form", "forms", "http", "https", "mailto", "mailtos"})
"""apprise schemes whose first URL part is a host name. Most others (dingtalk://, wecombot://,
tgram://, discord://...) put a token there, so only their scheme is shown."""


def redact(url: str) -> str:
    """The URL's scheme, and its host where the scheme has one: never a token."""
    return _redact(url)


def channel_id(url: str) -> str:
    """A channel's identity in the record: the sha256 of its URL (the URL itself may hold a token)."""
    return hashlib.sha256(url.encode()).hexdigest()


@dataclass(frozen=True)
class Target:
    role: str
    url: str


def targets(
    channels: dict[str, dict[str, list[str]]], institution: str, roles: tuple[str, ...] | list[str]
) -> list[Target]:
    """Every channel of the roles, each once (a channel of several roles, or of ``"*"``, gets a message once)."""
    out: list[Target] = []
    seen: set[str] = set()
    for role in roles:
        for url in channels_for(channels, institution, role):
            if url not in seen:
                seen.add(url)
                out.append(Target(role, url))
    return out


def deliver(url: str, title: str, body: str | Message) -> bool:
    """Hand one message to one channel; True when apprise says it was accepted. A ``Message`` is
    written the way the channel reads it (mail: subject and HTML; WeCom, DingTalk: their markdown)."""
    import apprise  # imported here: it loads its plugins on import

    from flows.outputs.robots import register_robots

    register_robots()
    ap = apprise.Apprise()
    if isinstance(body, str):
        return bool(ap.add(url)) and bool(ap.notify(body=body, title=title))
    written = body.render(channel_of(url))
    return bool(ap.add(url)) and bool(
        ap.notify(body=written.body, title=written.title, body_format=written.body_format)
    )


def _redact(url: str) -> str:
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in _HOST_SCHEMES:
        return f"{scheme}://***"
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}://{host}"


def notify(
    channels: dict[str, dict[str, list[str]]],
    institution: str,
    roles: tuple[str, ...] | list[str],
    title: str,
    body: str | Message,
) -> list[Delivery]:
    """Send one message to every channel of each role, once per channel; returns one Delivery per channel.
    A ``Message`` is written for each channel its URL names (``flows.outputs.messages``)."""
    return [
        Delivery(role=t.role, channel=_redact(t.url), ok=deliver(t.url, title, body))
        for t in targets(channels, institution, roles)
    ]
