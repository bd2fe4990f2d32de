"""Notifications end to end: apprise delivers over real HTTP on loopback to ``LocalReceiver``
(``json://``); a failed channel is reported, never raised; a bad config names its file."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.cli.receiver import LocalReceiver
from flows.errors import ConfigError
from flows.outputs.notify import Delivery, channels_for, load_channels, notify
from tests.waiting import LIMIT


@pytest.fixture
def rx() -> Iterator[LocalReceiver]:
    with LocalReceiver() as receiver:
        yield receiver


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "notify.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_notify_delivers_title_and_body_to_the_role(tmp_path: Path, rx: LocalReceiver) -> None:
    path = _config(tmp_path, f"demo_hospital:\n  physician: ['{rx.url('physician')}']\n  qa: ['{rx.url('qa')}']\n")
    channels = load_channels(path)

    deliveries = notify(
        channels,
        "demo_hospital",
        ["physician"],
        "Dose accepted",
        "Dose COI-2026-0001 (Yikaida, lot LOT-77) accepted <and> in stock. 已入库",
    )

    assert deliveries == [Delivery(role="physician", channel=f"json://127.0.0.1:{rx.port}", ok=True)]
    message = rx.wait_for(lambda m: m["path"] == "/physician", timeout=LIMIT)
    assert message is not None
    assert message["title"] == "Dose accepted"
    assert message["message"] == "Dose COI-2026-0001 (Yikaida, lot LOT-77) accepted <and> in stock. 已入库"
    assert [m["path"] for m in rx.messages] == ["/physician"]  # qa was not addressed


def test_notify_star_role_receives_every_message_once(tmp_path: Path, rx: LocalReceiver) -> None:
    path = _config(tmp_path, f"demo_hospital:\n  physician: '{rx.url('physician')}'\n  '*': ['{rx.url('all')}']\n")
    channels = load_channels(path)

    deliveries = notify(channels, "demo_hospital", ["physician", "nurse"], "Dose accepted", "in stock")

    assert [(d.role, d.ok) for d in deliveries] == [("physician", True), ("physician", True)]
    assert rx.wait_for(lambda m: m["path"] == "/all", timeout=LIMIT) is not None
    assert sorted(m["path"] for m in rx.messages) == ["/all", "/physician"]


def test_notify_star_role_receives_for_a_role_without_channels(rx: LocalReceiver) -> None:
    channels = {"demo_hospital": {"*": [rx.url("all")]}}

    deliveries = notify(channels, "demo_hospital", ["nurse"], "Infusion due", "bed 12")

    assert deliveries == [Delivery(role="nurse", channel=f"json://127.0.0.1:{rx.port}", ok=True)]
    message = rx.wait_for(lambda m: m["path"] == "/all", timeout=LIMIT)
    assert message is not None
    assert (message["title"], message["message"]) == ("Infusion due", "bed 12")


def test_notify_unreachable_channel_returns_not_ok_without_raising(rx: LocalReceiver) -> None:
    dead = f"json://127.0.0.1:{_closed_port()}/physician"
    channels = {"demo_hospital": {"physician": [dead, rx.url("physician")]}}

    deliveries = notify(channels, "demo_hospital", ["physician"], "Dose accepted", "in stock")

    assert [d.ok for d in deliveries] == [False, True]  # the failure does not stop the next channel
    assert deliveries[0].channel == f"json://{dead.split('://')[1].split('/')[0]}"
    assert rx.wait_for(lambda m: m["path"] == "/physician", timeout=LIMIT) is not None


def test_notify_url_apprise_cannot_use_returns_not_ok() -> None:
    deliveries = notify({"h": {"qa": ["not-a-channel"]}}, "h", ["qa"], "t", "b")

    assert [(d.role, d.ok) for d in deliveries] == [("qa", False)]


def test_notify_nobody_configured_delivers_nothing() -> None:
    assert notify({}, "demo_hospital", ["qa"], "t", "b") == []
    assert channels_for({"demo_hospital": {"qa": ["json://h/"]}}, "other", "qa") == []


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("dingtalk://SECRETTOKEN123/", "dingtalk://***"),
        ("tgram://123456789:SECRETBOT/42", "tgram://***"),
        ("wecombot://SECRETKEY", "wecombot://***"),
        ("mailto://user:SECRETpass@example.org", "mailto://example.org"),
        ("json://user:SECRETpass@127.0.0.1:8765/path?token=SECRET", "json://127.0.0.1:8765"),
    ],
)
def test_notify_delivery_channel_hides_tokens(url: str, shown: str) -> None:
    # Checked on the redaction itself: delivering to these would send requests to real services.
    from flows.outputs.notify import _redact

    assert _redact(url) == shown


def test_notify_load_channels_missing_file_is_empty(tmp_path: Path) -> None:
    assert load_channels(tmp_path / "absent.yaml") == {}


def test_notify_load_channels_bad_yaml_names_the_file(tmp_path: Path) -> None:
    path = _config(tmp_path, "demo_hospital:\n  qa: [json://127.0.0.1/\n    nurse: ]\n")

    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_channels(path)

    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- json://127.0.0.1/\n", "expected a mapping institution -> role -> list of apprise URLs"),
        ("demo_hospital: [json://127.0.0.1/]\n", "demo_hospital: expected a mapping role -> list of apprise URLs"),
        ("demo_hospital:\n  qa: {url: json://127.0.0.1/}\n", "demo_hospital.qa: expected a list of apprise URLs"),
        ("demo_hospital:\n  qa:\n", "demo_hospital.qa: expected a list of apprise URLs"),
        ("demo_hospital:\n  qa: [1, 2]\n", "demo_hospital.qa: expected a list of apprise URLs"),
    ],
)
def test_notify_load_channels_wrong_shape_names_file_and_place(tmp_path: Path, text: str, message: str) -> None:
    path = _config(tmp_path, text)

    with pytest.raises(ConfigError) as info:
        load_channels(path)

    assert str(info.value) == f"{path}: {message}"


def test_notify_load_channels_accepts_a_single_url(tmp_path: Path) -> None:
    path = _config(tmp_path, "demo_hospital:\n  qa: json://127.0.0.1:9/\n  '*': []\n")

    assert load_channels(path) == {"demo_hospital": {"qa": ["json://127.0.0.1:9/"], "*": []}}
