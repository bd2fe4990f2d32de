# ruff: noqa: RUF001  (Chinese text uses full-width punctuation)
"""The service floor's message catalogue: the words of its refusals and problems in another language
(issue 14). The floor raises in English, and that text stays exactly as it is for the CLI, the logs
and the tests; a page in another language shows ``translate(message, language)``.

Each entry is keyed by the English message with ``{name}`` where a value goes (a value is matched as
it stands and shown as it stands: ids, numbers, user names); ``{+name}`` is a value that is itself a
message and is translated in turn (``user 'li.wei': {+rest}``). A message no entry matches is shown
as written. ``tests/test_phrases.py`` checks that every entry's translation keeps its values, and
that the refusals people meet on pages come out with no English left.
"""

from __future__ import annotations

import re
from functools import cache

__all__ = ["MESSAGES", "translate"]

MESSAGES: dict[str, dict[str, str]] = {
    "zh": {
        # sign-in
        "user {user}: wrong user name or password": "用户 {user}：用户名或密码错误",
        "user {user}: the account is disabled; a QA officer must enable it": "用户 {user}：账户已停用，须由质量管理员启用",
        "user {user}: account locked after {n} failed sign-ins; a QA officer must unlock it (sopflow user unlock {again} --as QA_USER)": "用户 {user}：连续 {n} 次登录失败，账户已锁定；须由质量管理员解锁（sopflow user unlock {again} --as QA_USER）",
        "user {user}: the password was reset by a QA officer; set your own first (sopflow user passwd {again})": "用户 {user}：密码已由质量管理员重置，请先设置您自己的密码（sopflow user passwd {again}）",
        "user {user}: {+rest}": "用户 {user}：{rest}",
        "wrong user name or password, or the account may not sign in now; if you are sure of your password, ask a QA officer (they see the account's state)": "用户名或密码错误，或该账户目前不能登录；如确定密码无误，请联系质量管理员（其可查看账户状态）",
        "too many failed sign-ins from this address; wait {seconds} seconds, then try again": "此地址登录失败次数过多；请等待 {seconds} 秒后再试",
        # who may sign
        "step {step} may only be signed by role {role} of {institution}": "步骤 {step} 只能由 {institution} 的角色 {role} 签署",
        "only staff trained on {sop} v{version} at {institution} may sign step {step}; user {user} is not trained on {sop2} v{version2} ({hint})": "只有接受过 {sop} 第 {version} 版培训的 {institution} 人员可以签署步骤 {step}；用户 {user} 未接受 {sop2} 第 {version2} 版培训（{hint}）",
        "step {step} verifies step {other}: the person who performed {again} may not verify it": "步骤 {step} 复核步骤 {other}：执行 {again} 的人不能复核它",
        "steps {group} must be signed by different people; you signed {other} already": "步骤 {group} 须由不同的人签署；您已签署 {other}",
        "the account {user} is disabled": "账户 {user} 已停用",
        "you verified step {step}: its verifier may not correct it": "您复核了步骤 {step}：复核人不能更正它",
        "the author of a change may not {what} it: {sop} v{version} was written or submitted by you (separation of duties)": "变更的作者不能{what}：{sop} 第 {version} 版由您编写或提交（职责分离）",
        "step 'review' of this change may only be signed by its named reviewer {reviewer}": "本变更的审核步骤只能由指定审核人 {reviewer} 签署",
        # signing
        "step {step}: the values differ from the ones you reviewed; review them again before signing": "步骤 {step}：数值与您核对过的不同；请重新核对后再签署",
        "step {step} of run {run} is not waiting for input (it is {state})": "运行 {run} 的步骤 {step} 不在等待录入（当前为 {state}）",
        "step {step} of run {run} was signed by someone else meanwhile": "运行 {run} 的步骤 {step} 已被他人签署",
        "run {run} is {state}: none of its steps can be signed any more": "运行 {run} 已{state}：其步骤均不能再签署",
        "a reason is required to reject": "拒绝时必须填写理由",
        "step {step} of run {run} cannot be corrected: it is {state}; only a done step can be corrected": "运行 {run} 的步骤 {step} 不能更正：当前为 {state}；只有已完成的步骤可以更正",
        "{where}: a correction needs a reason (--reason): why the signed entry was wrong": "{where}：更正需要理由：已签署的录入为何有误",
        "{where}: nothing to correct: the values given equal the current ones": "{where}：无需更正：所填数值与当前数值相同",
        "{where}: nothing to correct: give the corrected values with --set": "{where}：无需更正：请填写更正后的数值",
        "a decision cannot be corrected: it has decided the run's course; open a deviation instead": "决定不能更正：它已决定运行的走向；请改为提出偏差",
        # field values
        "{value} is below the minimum {limit}": "{value} 低于下限 {limit}",
        "{value} is above the maximum {limit}": "{value} 高于上限 {limit}",
        "{value} is not a number": "{value} 不是数字",
        "{value} is not a finite number": "{value} 不是有限数",
        "a value is required": "必须填写",
        "a value is required ({label})": "必须填写（{label}）",
        "{value} has no time zone; add an offset like +08:00 (e.g. 2026-11-03T09:30+08:00)": "{value} 没有时区；请加上时差，如 +08:00（例如 2026-11-03T09:30+08:00）",
        "{value} is not an ISO 8601 date and time like 2026-11-03T09:30+08:00": "{value} 不是 ISO 8601 日期时间，应如 2026-11-03T09:30+08:00",
        "{value} does not match the required pattern {pattern}": "{value} 不符合规定格式 {pattern}",
        "is {n} characters long; the maximum is {limit}": "长度为 {n} 个字符；最多 {limit} 个",
        "{value} is not a yes/no value; use true/false, yes/no or 1/0": "{value} 不是“是/否”值",
        "{value} is not one of the choices. {+rest}": "{value} 不在可选项中。{rest}",
        "{value} is not one of the choices.": "{value} 不在可选项中。",
        "{value} is not a product in the catalogue. {+rest}": "{value} 不是产品目录中的产品。{rest}",
        "Did you mean {choice}?": "您是否指 {choice}？",
        "Choices: {choices}.": "可选项：{choices}。",
        "the value does not match the required pattern {pattern}": "该值不符合规定格式 {pattern}",
        # reading and starting
        "user {user} holds no role at {institution} and may not read its runs or documents": "用户 {user} 在 {institution} 没有角色，不能查看其运行或文件",
        "user {user} holds no role at {institution} and may not start its runs": "用户 {user} 在 {institution} 没有角色，不能启动其运行",
        "{sop} may only be started by role {roles} of {institution}; user {user} holds {held}": "{sop} 只能由 {institution} 的角色 {roles} 启动；用户 {user} 的角色为 {held}",
        "{sop}: cannot start: {+rest}": "{sop}：不能启动：{rest}",
        "dose {coi} is quarantined by deviation {deviation} ({classification}: {description}) until QA signs its disposition": "产品 {coi} 因偏差 {deviation}（{classification}：{description}）被隔离，直至质量管理员签署处置",
        "no run {run}; `sopflow runs` lists them": "没有运行 {run}",
        "no such run among the runs you may read; the runs list shows them": "在您可查看的运行中没有此运行；运行列表列出了它们",
        "no such document among the documents you may read": "在您可查看的文件中没有此文件",
        "no such deviation among the deviations you may read": "在您可查看的偏差中没有此偏差",
        # deviations raised by hand (flows.services.deviations)
        "user {user} may not raise a deviation at {institution}: that takes a role there": "用户 {user} 不能在 {institution} 提出偏差：需要在该机构担任角色",
        "user {user} may not quarantine a dose at {institution}: that takes role {role} there": "用户 {user} 不能在 {institution} 隔离产品：需要该机构的角色 {role}",
        "describe the deviation: what happened, where and when": "请描述偏差：发生了什么、在哪里、何时",
        "classification {value}: expected minor, major or critical": "分级 {value}：应为 minor、major 或 critical",
        "no deviation {deviation}": "没有偏差 {deviation}",
        # the chain of identity (flows.record.chain)
        "run {run} ({sop}) ended {status}: {detail}": "运行 {run}（{sop}）以“{status}”结束：{detail}",
        "run {run} ({sop}) ended {status}": "运行 {run}（{sop}）以“{status}”结束",
        "run {run} ({sop}) has not ended (it is {status})": "运行 {run}（{sop}）尚未结束（当前为{status}）",
        "deviation {deviation} on run {run} ({sop}) is {status} and quarantines the dose": "运行 {run}（{sop}）的偏差 {deviation} 为{status}，产品被隔离",
        "deviation {deviation} on run {run} ({sop}) is {status}": "运行 {run}（{sop}）的偏差 {deviation} 为{status}",
        "no completed {stage} run for {coi}": "{coi} 没有已完成的{stage}运行",
        "the {stage} run started before the {previous} run": "{stage}运行早于{previous}运行开始",
        "no run carries COI {coi}": "没有运行带有身份链编号 {coi}",
        # accounts and training
        "user {user} may not {purpose} at {where}: that takes role {role} there": "用户 {user} 不能在 {where} {purpose}：需要该机构的角色 {role}",
        "user {user} may not {verb} their own account; another QA officer must": "用户 {user} 不能对自己的账户执行此操作（{verb}）；须由另一位质量管理员执行",
        # a version that cannot be signed yet; a run held by a deviation (issue 15)
        "{sop} v{version} waits to become effective: too few active people trained on it to sign its steps (trained/needed: {what}); record their training with {hint}": "{sop} 第 {version} 版等待生效：接受过该版培训、可签署其步骤的在职人员不足（已培训/所需：{what}）；请记录其培训：{hint}",
        "{cls} deviation {dev} ({description}) is open; the run completes only once role {role} signs its disposition": "{cls} 偏差 {dev}（{description}）未关闭；须由角色 {role} 签署处置后运行才能完成",
    }
}
"""Language → English message (with ``{name}`` for values) → the message in that language."""

STATES: dict[str, dict[str, str]] = {
    "zh": {
        "waiting": "等待中",
        "running": "进行中",
        "scheduled": "已排程",
        "completed": "已完成",
        "rejected": "已拒收",
        "stopped": "已停止",
        "failed": "失败",
        "held": "暂停",
        "open": "未处置",
        "dispositioned": "已处置",
        "closed": "已关闭",
        "done": "已完成",
        "signed": "已签署",
        "collection": "采集",
        "receipt": "接收",
        "storage": "储存",
        "infusion": "输注",
        "not reached yet": "尚未到达",
    }
}
"""Words a value placeholder named ``status``, ``state``, ``stage`` or ``previous`` holds, by language."""
_STATE_KEYS = frozenset({"status", "state", "stage", "previous"})

_PLACE = re.compile(r"\{(\+?)([a-z_0-9]+)\}")


@cache
def _compiled(language: str) -> list[tuple[re.Pattern[str], str, frozenset[str]]]:
    out = []
    for english, other in MESSAGES.get(language, {}).items():
        pattern, recursive, pos = "", set(), 0
        for m in _PLACE.finditer(english):
            pattern += re.escape(english[pos : m.start()]) + f"(?P<{m.group(2)}>.+?)"
            if m.group(1):
                recursive.add(m.group(2))
            pos = m.end()
        pattern += re.escape(english[pos:])
        out.append((re.compile(pattern, re.S), other, frozenset(recursive)))
    # Longer English first: a specific message wins over a general one it also matches.
    out.sort(key=lambda entry: -len(entry[0].pattern))
    return out


def _one(text: str, language: str, depth: int) -> str:
    for pattern, other, recursive in _compiled(language):
        m = pattern.fullmatch(text)
        if m is None:
            continue
        states = STATES.get(language, {})
        values = {
            k: (
                _one(v, language, depth + 1)
                if k in recursive and depth < 4
                else states.get(v, v)
                if k in _STATE_KEYS
                else v
            )
            for k, v in m.groupdict().items()
        }
        return other.format(**values)
    return text


def translate(message: str, language: str | None) -> str:
    """``message`` in ``language`` when the catalogue has it (each line on its own), else as written."""
    if not language or language == "en" or language not in MESSAGES:
        return message
    return "\n".join(_one(line, language, 0) for line in message.split("\n"))
