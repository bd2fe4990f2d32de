"""Notifications people can act on (issue 14): what waits, for which dose, due when, with a link to
the step; written per channel and delivered by apprise for real to local receivers that speak each
channel: mail (SMTP, subject + HTML), WeCom and DingTalk group robots (their markdown JSON; DingTalk
signed), and a generic JSON webhook (plain text). Chinese for a Chinese institution."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from flows.cli.receiver import LocalReceiver
from flows.outputs.messages import channel_of, message
from flows.outputs.notify import notify
from flows.record.dose import RunFacts
from tests.receivers import RobotReceiver, SmtpSink

RUN = "3f6b2a10-1111-4222-8333-944455556666"
DUE = datetime(2026, 11, 25, 6, 0, tzinfo=UTC)  # 14:00 in Shanghai


def facts(language: str = "en", web_url: str | None = "https://sopflow.hospital.example", **dose: str) -> RunFacts:
    return RunFacts(
        run_id=RUN,
        institution="demo_hospital",
        language=language,
        timezone="Asia/Shanghai",
        sop_title="CAR-T dose receipt and acceptance" if language == "en" else "CAR-T 产品到货接收与验收",
        dose={
            "product": "Brexucabtagene autoleucel (Tecartus)",
            "product_zh": "布瑞基奥仑赛",
            "coi": "COI-KT-2026-0117",
            "lot": "LOT-A7731",
            "patient": "H2026001",
            **dose,
        },
        roles={"qa": "QA officer" if language == "en" else "质量管理员"},
        web_url=web_url,
    )


def waiting(language: str = "en", **kw):
    step = "QA acceptance into stock" if language == "en" else "药学部主任验收入库"
    return message("waiting", facts(language, **kw), step=step, step_id="qa_acceptance", role="qa", due_at=DUE)


LINK = f"https://sopflow.hospital.example/runs/{RUN}/steps/qa_acceptance"


def test_message_names_what_waits_for_which_dose_due_when_with_a_link():
    text = str(waiting())
    for shown in (
        "QA acceptance into stock",
        "COI-KT-2026-0117",
        "Tecartus",
        "LOT-A7731",
        "QA officer",
        "2026-11-25 14:00 CST",
        LINK,
    ):
        assert shown in text
    assert "H2026001" not in text  # the patient id never leaves in a notification


def test_message_without_a_web_address_names_the_command():
    text = str(waiting(web_url=None))
    assert "https://" not in text
    assert "`sopflow inbox` lists it." in text


@pytest.mark.parametrize(
    ("url", "channel"),
    [
        ("mailto://h?to=a@b", "mail"),
        ("wecomrobot://h/x?key=k", "wecom"),
        ("wecombot://k", "wecom"),
        ("dingtalk://t/", "dingtalk"),
        ("dingtalkrobots://h/robot/send?access_token=t", "dingtalk"),
        ("json://h/", "webhook"),
        ("form://h/", "webhook"),
    ],
)
def test_message_channel_is_the_urls_scheme(url, channel):
    assert channel_of(url) == channel


def test_message_mail_is_a_subject_and_html_delivered_over_smtp():
    with SmtpSink() as smtp:
        channels = {"demo_hospital": {"qa": [smtp.url("qa@hospital.example")]}}
        msg = waiting(lot="<b>LOT</b>")
        deliveries = notify(channels, "demo_hospital", ["qa"], msg.title, msg)
        assert [d.ok for d in deliveries] == [True]
        mail = smtp.wait(1)[0]
    assert mail["To"] == "qa@hospital.example"
    subject = str(email_header(mail["Subject"]))
    assert subject == "[sopflow] Waiting on you: QA acceptance into stock · COI-KT-2026-0117"
    parts = {p.get_content_type(): p.get_payload(decode=True).decode() for p in mail.walk() if not p.is_multipart()}
    html = parts["text/html"]
    assert f'href="{LINK}"' in html
    assert "&lt;b&gt;LOT&lt;/b&gt;" in html  # entered text is text, never markup
    assert "<b>LOT" not in html
    assert "2026-11-25 14:00 CST" in html


def email_header(value: str) -> str:
    from email.header import decode_header, make_header

    return str(make_header(decode_header(value)))


def test_message_wecom_robot_gets_markdown_it_accepts():
    with RobotReceiver("wecom") as robot:
        msg = waiting(lot="LOT_[x](http://evil)")
        deliveries = notify({"demo_hospital": {"qa": [robot.url()]}}, "demo_hospital", ["qa"], msg.title, msg)
        assert [d.ok for d in deliveries] == [True]
        assert deliveries[0].channel == "wecomrobot://***"
        payload = robot.accepted[0]
    assert payload["msgtype"] == "markdown"
    content = payload["markdown"]["content"]
    assert content.startswith("### Waiting on you: QA acceptance into stock · COI-KT-2026-0117")
    assert f"[Open the step]({LINK})" in content
    assert "**COI-KT-2026-0117**" in content
    assert "[x](http://evil)" not in content  # entered text cannot make a link
    assert "\\[x\\]\\(http://evil\\)" in content


def test_message_wecom_robot_with_a_wrong_key_is_a_failed_delivery():
    with RobotReceiver("wecom") as robot:
        msg = waiting()
        deliveries = notify({"h": {"qa": [robot.url(token="wrongkey")]}}, "h", ["qa"], msg.title, msg)
    assert [d.ok for d in deliveries] == [False]
    assert robot.refused[0]["errcode"] == 93000


def test_message_dingtalk_robot_gets_signed_markdown():
    with RobotReceiver("dingtalk", secret="SECabc123") as robot:
        msg = waiting("zh")
        deliveries = notify({"h": {"qa": [robot.url(secret="SECabc123")]}}, "h", ["qa"], msg.title, msg)
        assert [d.ok for d in deliveries] == [True], robot.refused
        payload = robot.accepted[0]
        bad = notify({"h": {"qa": [robot.url(secret="SECwrong")]}}, "h", ["qa"], msg.title, msg)
    assert payload["msgtype"] == "markdown"
    assert payload["markdown"]["title"] == "待您处理：药学部主任验收入库 · COI-KT-2026-0117"
    text = payload["markdown"]["text"]
    assert text.startswith("#### 待您处理：药学部主任验收入库")
    assert f"[打开此步骤]({LINK})" in text
    assert "布瑞基奥仑赛" in text
    assert [d.ok for d in bad] == [False]  # a signature the robot cannot verify is refused
    assert robot.refused[0]["why"] == "sign not match"


def test_message_generic_webhook_gets_plain_text():
    with LocalReceiver() as rx:
        msg = waiting()
        assert [d.ok for d in notify({"h": {"qa": [rx.url("qa")]}}, "h", ["qa"], msg.title, msg)] == [True]
        got = rx.wait_for(lambda m: m["path"] == "/qa")
    assert got["title"] == "Waiting on you: QA acceptance into stock · COI-KT-2026-0117"
    assert f"Open the step: {LINK}" in got["message"]
    assert "**" not in got["message"]


ALLOWED_LATIN = {
    "CAR",
    "COI",
    "KT",
    "LOT",
    "A7731",
    "SOP",
    "CST",
    "https",
    "sopflow",
    "hospital",
    "example",
    "runs",
    "steps",
    "qa_acceptance",
    "Tecartus",
    "Brexucabtagene",
    "autoleucel",
    "inbox",
}


@pytest.mark.parametrize("channel", ["mail", "wecom", "dingtalk", "webhook"])
@pytest.mark.parametrize("kind", ["waiting", "overdue", "deadline"])
def test_message_in_chinese_has_no_english_left(kind, channel):
    words = (
        {"waited": "4h", "limit": "4h"}
        if kind == "overdue"
        else {"limit": "30m", "state": "breached", "classification": "major"}
        if kind == "deadline"
        else {}
    )
    msg = message(kind, facts("zh"), step="药学部主任验收入库", step_id="qa_acceptance", role="qa", due_at=DUE, **words)
    r = msg.render(channel)
    visible = re.sub(r"<[^>]+>", " ", f"{r.title} {r.body}")
    left = {
        w
        for w in re.findall(r"\b[A-Za-z][A-Za-z0-9_]*\b", visible)
        if w not in ALLOWED_LATIN and not re.fullmatch(r"[0-9a-f]{8}|\d+[hm]?|[A-Z]{1,3}\d*", w)
    }
    left -= {
        "DOCTYPE",
        "html",
        "lang",
        "zh",
        "CN",
        "body",
        "style",
        "font",
        "family",
        "sans",
        "serif",
        "h2",
        "p",
        "table",
        "tr",
        "th",
        "td",
        "align",
        "left",
        "padding",
        "px",
        "color",
        "a",
        "href",
        "display",
        "inline",
        "block",
        "background",
        "fff",
        "text",
        "decoration",
        "none",
        "border",
        "radius",
        "b5394",
        "a4a4a",
    }
    assert not left, f"English in a Chinese {kind} message for {channel}: {sorted(left)}"
