# ruff: noqa: RUF001  (Chinese text uses full-width punctuation)
"""Stage 4 (edge): what a notification says, per channel and in the institution's language (issue 14).

A ``Message`` names what waits (or went wrong), for which dose (product, COI, lot), for whom (the
role's label), due when (in the institution's zone), and links to the step's page on the web app
(``SOPFLOW_WEB_URL``; without it, the command that lists it). ``render(channel)`` writes it for one
channel, and the URL's apprise scheme decides which (``channel_of``):

    mail      ``mailto://``, ``mailtos://``: a subject and an HTML body (a table of the facts, a link)
    wecom     ``wecomrobot(s)://`` (sopflow's WeCom robot), ``wecombot://``: WeCom's markdown
    dingtalk  ``dingtalkrobot(s)://`` (sopflow's), ``dingtalk://``: DingTalk's markdown (title + text)
    webhook   anything else (``json://``, ``form://``, …): the title and plain lines of text

Entered text never becomes markup: every value is escaped for HTML in mail and for markdown in
WeCom and DingTalk. The patient id is left out of every message (it leaves the hospital's network
on WeCom and DingTalk). Must not import prefect.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from flows.sop.model import HOLDING_CLASSES

__all__ = ["CHANNELS", "TEXTS", "Message", "Rendered", "channel_of", "message", "message_from_json"]

Channel = Literal["mail", "wecom", "dingtalk", "webhook"]
CHANNELS: dict[str, Channel] = {
    "mailto": "mail",
    "mailtos": "mail",
    "wecomrobot": "wecom",
    "wecomrobots": "wecom",
    "wecombot": "wecom",
    "dingtalk": "dingtalk",
    "dingtalkrobot": "dingtalk",
    "dingtalkrobots": "dingtalk",
}
"""apprise URL scheme → the channel whose template a message is written in (else ``webhook``)."""

TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "waiting": "Waiting on you: {step}",
        "overdue": "Overdue for {waited}: {step}",
        "deadline": "Deadline {state}: {step}",
        "notify": "{step}",
        "lead.waiting": "{step} waits for {role} to sign.",
        "lead.overdue": "{step} has waited {waited} for {role} to sign; its time limit is {limit}.",
        "lead.deadline": "{step}: the time limit of {limit} is {state}. A {classification} deviation has been opened; the run goes on.",
        "lead.notify": "{text}",
        "deviation_opened": "A {classification} deviation has been opened.",
        "holds": "The run cannot complete until QA signs the deviation's disposition.",
        "product": "Product",
        "coi": "COI",
        "lot": "Lot",
        "sop": "SOP",
        "for": "For",
        "due": "Due",
        "run": "Run",
        "no_limit": "no time limit",
        "open": "Open the step",
        "open_run": "Open the run",
        "cli": "`sopflow inbox` lists it.",
        "breached": "breached",
        "overdue_state": "overdue",
    },
    "zh": {
        "waiting": "待您处理：{step}",
        "overdue": "已超时 {waited}：{step}",
        "deadline": "时限{state}：{step}",
        "notify": "{step}",
        "lead.waiting": "“{step}”等待{role}签署。",
        "lead.overdue": "“{step}”已等待{role}签署 {waited}，时限为 {limit}。",
        "lead.deadline": "“{step}”{state}时限（{limit}）。已提出{classification}偏差，运行继续进行。",
        "lead.notify": "{text}",
        "deviation_opened": "已提出{classification}偏差。",
        "holds": "质量保证人员签署偏差处置之前，运行不能完成。",
        "product": "产品",
        "coi": "身份链编号",
        "lot": "批号",
        "sop": "SOP",
        "for": "处理人",
        "due": "截止",
        "run": "运行",
        "no_limit": "无时限",
        "open": "打开此步骤",
        "open_run": "打开此运行",
        "cli": "可用 `sopflow inbox` 查看。",
        "breached": "已超出",
        "overdue_state": "已逾期",
    },
}
"""Each message's words in each language; ``{name}`` is a fact of the message."""

CLASSIFICATIONS = {"zh": {"minor": "轻微", "major": "重大", "critical": "严重"}}


@dataclass(frozen=True)
class Rendered:
    """One message for one channel: ``body_format`` is apprise's (``text``, ``html``, ``markdown``)."""

    title: str
    body: str
    body_format: str


@dataclass(frozen=True)
class Message:
    """A notification's facts, in one language; ``str()`` is its plain text (what the record keeps)."""

    kind: str
    language: str
    title: str
    lead: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    link: str | None = None
    link_text: str = ""
    footer: str = ""

    def __str__(self) -> str:
        return self.render("webhook").body

    def to_json(self) -> str:
        """Its facts as JSON, for the outbox: what is delivered after a crash is what was recorded."""
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    def render(self, channel: str) -> Rendered:
        if channel == "mail":
            return Rendered(f"[sopflow] {self.title}", self._html(), "html")
        if channel == "wecom":
            return Rendered(self.title, self._wecom(), "markdown")
        if channel == "dingtalk":
            return Rendered(self.title, self._dingtalk(), "markdown")
        lines = [self.lead, *(f"{k}: {v}" for k, v in self.facts)]
        lines.append(f"{self.link_text}: {self.link}" if self.link else self.footer)
        return Rendered(self.title, "\n".join(x for x in lines if x), "text")

    def _html(self) -> str:
        e = html.escape
        rows = "".join(
            f'<tr><th align="left" style="padding:2px 12px 2px 0;color:#4a4a4a">{e(k)}</th><td>{e(v)}</td></tr>'
            for k, v in self.facts
        )
        link = (
            f'<p><a href="{e(self.link)}" style="display:inline-block;padding:8px 14px;background:#0b5394;'
            f'color:#fff;text-decoration:none;border-radius:4px">{e(self.link_text)}</a></p>'
            if self.link
            else f"<p>{e(self.footer)}</p>"
        )
        lang = "zh-CN" if self.language == "zh" else "en"
        return (
            f'<!DOCTYPE html><html lang="{lang}"><body style="font-family:sans-serif">'
            f"<h2>{e(self.title)}</h2><p>{e(self.lead)}</p><table>{rows}</table>{link}</body></html>"
        )

    def _markdown_lines(self) -> list[str]:
        lines = [_md(self.lead), ""]
        lines += [f"> {_md(k)}: **{_md(v)}**" for k, v in self.facts]
        lines.append("")
        lines.append(f"[{_md(self.link_text)}]({self.link})" if self.link else _md(self.footer))
        return lines

    def _wecom(self) -> str:
        return "\n".join([f"### {_md(self.title)}", *self._markdown_lines()])

    def _dingtalk(self) -> str:
        # apprise's DingTalk plugin puts the title above the text as a heading itself.
        return "\n".join(self._markdown_lines()).replace("\n> ", "\n\n> ")


_MD_SPECIAL = re.compile(r"([\\`*_\[\]()#>|<~])")


def _md(text: str) -> str:
    """Entered text as markdown that shows it as written (no links, emphasis or headings from it)."""
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


def channel_of(url: str) -> Channel:
    """The channel an apprise URL's scheme names (``webhook`` for any other)."""
    return CHANNELS.get(url.partition("://")[0].lower(), "webhook")


def _span(value: Any, language: str) -> str:
    """A duration as people say it: 4 h 10 min / 4 小时 10 分钟 (a string passes as it is)."""
    if not isinstance(value, timedelta):
        return str(value)
    minutes = int(value.total_seconds() // 60)
    days, hours, mins = minutes // 1440, minutes % 1440 // 60, minutes % 60
    units = ("天", "小时", "分钟") if language == "zh" else ("d", "h", "min")
    parts = [f"{n} {u}" for n, u in zip((days, hours, mins), units, strict=True) if n]
    return " ".join(parts[:2]) or f"0 {units[2]}"


def _when(at: datetime | str | None, zone: str) -> str | None:
    if at is None:
        return None
    moment = datetime.fromisoformat(at) if isinstance(at, str) else at
    return moment.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M %Z")


def message(
    kind: str,
    facts: Any,
    *,
    step: str,
    step_id: str | None = None,
    role: str | None = None,
    due_at: datetime | str | None = None,
    **words: Any,
) -> Message:
    """The notification ``kind`` (``waiting``, ``overdue``, ``deadline``, ``notify``) about one run.

    ``facts``: ``flows.record.dose.RunFacts`` (language, zone, SOP title, dose, role labels, web
    address). ``words``: what the kind's sentence names (``waited``, ``limit``,
    ``classification``, ``state``, ``text``; ``waited`` and ``limit`` as ``timedelta``).
    """
    lang = facts.language if facts.language in TEXTS else "en"
    t = TEXTS[lang]
    for key in ("waited", "limit"):
        if key in words:
            words[key] = _span(words[key], lang)
    holds = kind == "deadline" and words.get("classification") in HOLDING_CLASSES  # issue 15: it holds the run
    if "classification" in words:
        words["classification"] = CLASSIFICATIONS.get(lang, {}).get(words["classification"], words["classification"])
    if "state" in words:
        words["state"] = t["overdue_state"] if words["state"] == "overdue" else t["breached"]
    role_label = facts.role(role) if role else ""
    said = {"step": step, "role": role_label, **words}
    rows: list[tuple[str, str]] = []
    dose = facts.dose
    product = (dose.get("product_zh") if lang == "zh" else None) or dose.get("product")
    for key, value in (("product", product), ("coi", dose.get("coi")), ("lot", dose.get("lot"))):
        if value:
            rows.append((t[key], str(value)))
    rows.append((t["sop"], facts.sop_title))
    if role:
        rows.append((t["for"], role_label))
    if kind in ("waiting", "overdue"):
        rows.append((t["due"], _when(due_at, facts.timezone) or t["no_limit"]))
    rows.append((t["run"], facts.run_id[:8]))
    path = f"/runs/{facts.run_id}/steps/{step_id}" if step_id else f"/runs/{facts.run_id}"
    title = t[kind].format(**said)
    coi = dose.get("coi")
    return Message(
        kind=kind,
        language=lang,
        title=f"{title} · {coi}" if coi else title,
        lead=t[f"lead.{kind}"].format(**said) + (f" {t['holds']}" if holds else ""),
        facts=rows,
        link=facts.link(path),
        link_text=t["open"] if step_id else t["open_run"],
        footer=t["cli"],
    )


def message_from_json(text: str) -> Message:
    """A ``Message`` back from ``Message.to_json``."""
    data = json.loads(text)
    data["facts"] = [tuple(pair) for pair in data.get("facts", [])]
    return Message(**data)
