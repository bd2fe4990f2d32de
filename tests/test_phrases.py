"""The floor's message catalogue (``flows.services.phrases``): a refusal in the reader's language,
its values kept; English unchanged for the CLI and tests (issue 14)."""

from __future__ import annotations

import re

import pytest

from flows.services.phrases import MESSAGES, translate

PLACES = re.compile(r"\{\+?([a-z_0-9]+)\}")


@pytest.mark.parametrize("english", sorted(MESSAGES["zh"]))
def test_phrases_translation_keeps_every_value(english):
    assert set(PLACES.findall(english)) == set(PLACES.findall(MESSAGES["zh"][english]))


@pytest.mark.parametrize(
    ("english", "chinese"),
    [
        ("user 'li.wei': wrong user name or password", "用户 'li.wei'：用户名或密码错误"),
        (
            "user 'pharm': step 'arrival' may only be signed by role 'cell_lab' of 'demo_hospital'",
            "用户 'pharm'：步骤 'arrival' 只能由 'demo_hospital' 的角色 'cell_lab' 签署",
        ),
        ("-250 °C is below the minimum -200 °C", "-250 °C 低于下限 -200 °C"),
        ("'2026-11-25T09:40' has no time zone; add an offset like +08:00 (e.g. 2026-11-03T09:30+08:00)", None),
        ("no completed collection run for COI-1", "COI-1 没有已完成的采集运行"),
        (
            "run 1a2b3c4d (dose_receipt) has not ended (it is waiting)",
            "运行 1a2b3c4d（dose_receipt）尚未结束（当前为等待中）",
        ),
    ],
)
def test_phrases_a_refusal_reads_in_chinese(english, chinese):
    out = translate(english, "zh")
    if chinese is not None:
        assert out == chinese
    quoted = re.sub(r"'[^']*'|\([^)]*\)|\{[^}]*\}", "", out)
    assert not re.findall(r"\b[a-z]{3,}\b", quoted), out  # nothing left in English but the values


def test_phrases_english_and_unknown_messages_stay_as_written():
    text = "user 'li.wei': wrong user name or password"
    assert translate(text, "en") == text
    assert translate("something nobody catalogued", "zh") == "something nobody catalogued"
    assert translate(f"{text}\n-1 is not a number", "zh") == "用户 'li.wei'：用户名或密码错误\n-1 不是数字"
