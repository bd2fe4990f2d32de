"""Accounts: lockout after consecutive failed sign-ins, locked and disabled accounts refused, unlock,
disable/enable and password changes by the right people only, each refusal audited. The record
layer runs on SQLite and PostgreSQL (``db_url``); the submit path and the CLI run for real."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from sqlmodel import col, select

from flows.config import Settings, get_settings
from flows.errors import AuthenticationError, NotAuthorizedError, RecordError
from flows.record import accounts, ledger, users
from flows.record.db import read_session, write_session
from flows.record.tables import AuditEvent, UserEvent
from flows.services import accounts as account_service
from flows.services import guard, training
from flows.services.guard import UNAUTHENTICATED, Officer

PW = "correct horse 7"
QA_PW = "qa officer pw 1"


def _settings(db_url: str, threshold: int = 3) -> Settings:
    return replace(get_settings(), database_url=db_url, lockout_threshold=threshold)


@pytest.fixture
def staff(db_url: str) -> Settings:
    """ana (cell_lab), bo (pharmacist), qa.one (qa) at demo_hospital; far.qa (qa) only at other_hospital."""
    settings = _settings(db_url)
    account_service.add_user(settings, "qa.one", "Qian An", QA_PW, [("demo_hospital", "qa")])  # the first account
    qa = Officer("qa.one", QA_PW)
    account_service.add_user(settings, "ana", "Ana Li", PW, [("demo_hospital", "cell_lab")], officer=qa)
    account_service.add_user(settings, "bo", "Bo Wang", PW, [("demo_hospital", "pharmacist")], officer=qa)
    with write_session(db_url) as s:  # an institution without a folder under sops/: grant directly
        far = users.add_user(s, "far.qa", "Fa Run", QA_PW, actor="admin")
        users.grant_role(s, far, "other_hospital", "qa", actor="admin")
    return settings


def _events(settings: Settings, after: int = 0) -> list[AuditEvent]:
    with read_session(settings.database_url) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.seq > after).order_by(col(AuditEvent.seq))))


def _head(settings: Settings) -> int:
    events = _events(settings)
    return events[-1].seq if events else 0


def _state(settings: Settings, username: str) -> tuple[bool, bool]:
    with read_session(settings.database_url) as s:
        user = users.find_user(s, username)
        assert user is not None
        return accounts.is_active(s, user.id), accounts.is_locked(s, user.id)


def _fail(settings: Settings, username: str, times: int) -> list[str]:
    messages = []
    for _ in range(times):
        with pytest.raises(AuthenticationError) as info:
            guard.sign_in(settings, username, "wrong password", "test")
        messages.append(str(info.value))
    return messages


def _chain_ok(settings: Settings) -> None:
    with read_session(settings.database_url) as s:
        report = ledger.verify_chain(s)
    assert report.ok, report.problems


def test_accounts_wrong_password_threshold_times_locks_the_account(staff: Settings) -> None:
    start = _head(staff)

    messages = _fail(staff, "ana", 3)

    assert messages[:2] == ["user 'ana': wrong user name or password"] * 2
    assert messages[2].startswith(
        "user 'ana': wrong user name or password; account locked after 3 failed sign-ins; a QA officer must unlock it"
    )
    assert _state(staff, "ana") == (True, True)  # written although every sign-in failed
    events = _events(staff, start)
    assert [(e.action, e.object_type) for e in events] == [("auth.failed", "sf_user")] * 3 + [
        ("user.locked", "sf_user_event")
    ]
    assert [e.object_id for e in events[:3]] == ["ana"] * 3
    lock = json.loads(events[3].payload_json)["row"]
    assert (lock["kind"], lock["actor"], json.loads(lock["data_json"])) == (
        "locked",
        "system",
        {"failures": 3, "threshold": 3, "client": guard.local_channel().client},  # the command line, here
    )
    assert events[3].reason == "3 consecutive failed sign-ins (threshold 3)"
    _chain_ok(staff)


def test_accounts_locked_account_refuses_the_right_password(staff: Settings) -> None:
    _fail(staff, "ana", 3)
    start = _head(staff)

    with pytest.raises(AuthenticationError) as info:
        guard.sign_in(staff, "ana", PW, "sign run/arrival")
    with read_session(staff.database_url) as s, pytest.raises(AuthenticationError) as read_only:
        accounts.authenticate(s, "ana", PW)

    assert str(info.value) == (
        "user 'ana': account locked after 3 failed sign-ins; a QA officer must unlock it "
        "(sopflow user unlock ana --as QA_USER)"
    )
    assert str(read_only.value) == str(info.value)
    [event] = _events(staff, start)
    assert (event.action, event.object_id, event.reason) == ("auth.refused", "ana", str(info.value))
    assert json.loads(event.payload_json) == {
        "purpose": "sign run/arrival",
        "problem": "locked",
        "client": guard.local_channel().client,
    }


def test_accounts_failures_count_only_since_the_last_successful_sign_in(staff: Settings) -> None:
    _fail(staff, "ana", 2)
    guard.sign_in(staff, "ana", PW, "test")
    _fail(staff, "ana", 2)

    assert _state(staff, "ana") == (True, False)
    assert [e.action for e in _events(staff) if e.object_id == "ana"][-5:] == [
        "auth.failed",
        "auth.failed",
        "auth.ok",
        "auth.failed",
        "auth.failed",
    ]
    _fail(staff, "ana", 1)
    assert _state(staff, "ana") == (True, True)


def test_accounts_unknown_user_failures_are_audited_and_lock_nothing(staff: Settings) -> None:
    start = _head(staff)

    messages = _fail(staff, "nobody", 4)

    assert set(messages) == {"user 'nobody': wrong user name or password"}
    assert [e.action for e in _events(staff, start)] == ["auth.failed"] * 4


def test_accounts_unlock_by_qa_officer_is_audited_and_starts_the_count_again(staff: Settings) -> None:
    _fail(staff, "ana", 3)
    start = _head(staff)

    account_service.unlock_user(staff, "ana", Officer("qa.one", QA_PW), reason="called the help desk")

    assert _state(staff, "ana") == (True, False)
    events = _events(staff, start)
    assert [e.action for e in events] == ["auth.ok", "user.unlocked"]
    row = json.loads(events[1].payload_json)["row"]
    with read_session(staff.database_url) as s:
        officer = users.find_user(s, "qa.one")
        assert officer is not None
        assert (row["kind"], row["actor"], events[1].actor, events[1].reason) == (
            "unlocked",
            officer.id,
            officer.id,
            "called the help desk",
        )
    assert guard.sign_in(staff, "ana", PW, "test").username == "ana"
    _fail(staff, "ana", 2)  # fewer than the threshold since the unlock (and the sign-in)
    assert _state(staff, "ana") == (True, False)
    _chain_ok(staff)


def test_accounts_unlock_without_failures_since_is_a_reset_point(staff: Settings) -> None:
    _fail(staff, "ana", 3)
    account_service.unlock_user(staff, "ana", Officer("qa.one", QA_PW))

    _fail(staff, "ana", 2)  # the 3 before the unlock do not count

    assert _state(staff, "ana") == (True, False)


def test_accounts_unlock_by_non_qa_user_is_refused_and_audited(staff: Settings) -> None:
    _fail(staff, "ana", 3)
    start = _head(staff)

    with pytest.raises(NotAuthorizedError) as info:
        account_service.unlock_user(staff, "ana", Officer("bo", PW))

    assert str(info.value) == (
        "user 'bo' may not unlock 'ana': that takes role 'qa' at an institution where 'ana' "
        "holds a role (demo_hospital)"
    )
    assert _state(staff, "ana") == (True, True)
    events = _events(staff, start)
    assert [e.action for e in events] == ["auth.ok", "user.unlock.refused"]
    assert (events[1].object_id, events[1].reason) == ("ana", str(info.value))


def test_accounts_qa_officer_of_another_institution_may_not_unlock(staff: Settings) -> None:
    _fail(staff, "ana", 3)

    with pytest.raises(NotAuthorizedError, match=re.escape("user 'far.qa' may not unlock 'ana'")):
        account_service.unlock_user(staff, "ana", Officer("far.qa", QA_PW))

    assert _state(staff, "ana") == (True, True)


def test_accounts_unlock_with_the_officers_wrong_password_is_refused(staff: Settings) -> None:
    _fail(staff, "ana", 3)

    with pytest.raises(AuthenticationError, match=re.escape("user 'qa.one': wrong user name or password")):
        account_service.unlock_user(staff, "ana", Officer("qa.one", "not it at all"))

    assert _state(staff, "ana") == (True, True)


def test_accounts_unlock_of_an_account_that_is_not_locked_is_refused(staff: Settings) -> None:
    with pytest.raises(RecordError, match="user 'ana' is not locked"):
        account_service.unlock_user(staff, "ana", Officer("qa.one", QA_PW))


def test_accounts_disabled_account_is_refused_even_with_the_right_password(staff: Settings) -> None:
    account_service.disable_user(staff, "ana", Officer("qa.one", QA_PW), reason="left the unit")
    start = _head(staff)

    with pytest.raises(AuthenticationError) as info:
        guard.sign_in(staff, "ana", PW, "test")

    assert str(info.value) == "user 'ana': the account is disabled; a QA officer must enable it"
    [event] = _events(staff, start)
    assert (event.action, json.loads(event.payload_json)["problem"]) == ("auth.refused", "disabled")
    assert _state(staff, "ana") == (False, False)
    account_service.enable_user(staff, "ana", Officer("qa.one", QA_PW))
    assert guard.sign_in(staff, "ana", PW, "test").username == "ana"
    with read_session(staff.database_url) as s:
        kinds = [e.kind for e in s.exec(select(UserEvent).order_by(col(UserEvent.n)))]
    assert kinds == ["disabled", "enabled"]
    _chain_ok(staff)


def test_accounts_disable_by_non_qa_user_and_of_oneself_is_refused(staff: Settings) -> None:
    with pytest.raises(NotAuthorizedError, match="user 'bo' may not disable 'ana'"):
        account_service.disable_user(staff, "ana", Officer("bo", PW))
    with pytest.raises(
        NotAuthorizedError, match=re.escape("user 'qa.one' may not disable their own account; another QA officer must")
    ):
        account_service.disable_user(staff, "qa.one", Officer("qa.one", QA_PW))

    assert _state(staff, "ana") == (True, False)
    assert _state(staff, "qa.one") == (True, False)
    assert [e.action for e in _events(staff) if e.action.endswith(".refused")] == ["user.disable.refused"] * 2


def test_accounts_disabled_username_is_never_reused(staff: Settings) -> None:
    account_service.disable_user(staff, "ana", Officer("qa.one", QA_PW))

    with pytest.raises(RecordError) as info:
        account_service.add_user(
            staff,
            "ana",
            "Another Ana",
            "another pw 123",
            [("demo_hospital", "cell_lab")],
            officer=Officer("qa.one", QA_PW),
        )

    assert str(info.value) == "user 'ana' exists already; accounts are never shared or reused"


def test_accounts_second_account_without_a_qa_officer_is_refused_and_audited(staff: Settings) -> None:
    """Issue 10: "once one account exists, a QA officer adds users" was a rule of the CLI only; the
    service floor refuses it for every caller (the web, a script), and the refusal is audited."""
    head = _head(staff)
    with pytest.raises(NotAuthorizedError) as info:
        account_service.add_user(staff, "eve", "Eve Outside", "eve's password 1", [("demo_hospital", "qa")])

    assert str(info.value) == account_service.NEED_OFFICER
    [refused] = _events(staff, head)
    assert (refused.action, refused.actor, refused.object_id, refused.reason) == (
        "user.add.refused",
        UNAUTHENTICATED,
        "eve",
        str(info.value),
    )
    with read_session(staff.database_url) as s:
        assert users.find_user(s, "eve") is None
    _chain_ok(staff)


def test_accounts_first_account_needs_nobody_and_later_ones_a_qa_officer_of_their_institutions(db_url: str) -> None:
    settings = _settings(db_url)
    assert not account_service.has_users(settings)
    account_service.add_user(settings, "first.qa", "First QA", QA_PW, [("demo_hospital", "qa")])
    assert account_service.has_users(settings)

    with pytest.raises(NotAuthorizedError, match="may not add users with roles at 'shenjiang_hospital'"):
        account_service.add_user(
            settings, "zhou", "Zhou", PW, [("shenjiang_hospital", "qa")], officer=Officer("first.qa", QA_PW)
        )
    account_service.add_user(
        settings, "ana", "Ana Li", PW, [("demo_hospital", "cell_lab")], officer=Officer("first.qa", QA_PW)
    )

    with read_session(settings.database_url) as s:
        first = users.find_user(s, "first.qa")
        ana = users.find_user(s, "ana")
        refusals = list(s.exec(select(AuditEvent).where(AuditEvent.action == "user.add.refused")))
    assert first is not None
    assert ana is not None
    assert (first.created_by, ana.created_by) == ("bootstrap", first.id)
    assert [(r.actor, r.object_id) for r in refusals] == [(first.id, "zhou")]


def test_accounts_password_change_with_the_old_password(staff: Settings) -> None:
    account_service.change_password(staff, "ana", "a new secret 9", old_password=PW)

    with pytest.raises(AuthenticationError, match="wrong user name or password"):
        guard.sign_in(staff, "ana", PW, "test")
    assert guard.sign_in(staff, "ana", "a new secret 9", "test").username == "ana"
    with read_session(staff.database_url) as s:
        user = users.find_user(s, "ana")
        assert user is not None
        assert user.password_hash != accounts.password_hash(s, user)  # the User row is never updated
        [event] = s.exec(select(UserEvent))
    assert event.kind == "password_set"
    assert json.loads(event.data_json)["hash"].startswith("$argon2")
    assert "a new secret 9" not in event.data_json
    _chain_ok(staff)


def test_accounts_password_change_with_a_wrong_old_password_is_refused_and_counts(staff: Settings) -> None:
    with pytest.raises(AuthenticationError, match="wrong user name or password"):
        account_service.change_password(staff, "ana", "a new secret 9", old_password="wrong password")

    assert guard.sign_in(staff, "ana", PW, "test").username == "ana"
    assert [e.action for e in _events(staff) if e.object_id == "ana"][-2:] == ["auth.failed", "auth.ok"]


@pytest.mark.parametrize(
    ("new", "message"),
    [
        ("short", "user 'ana': the password must have at least 8 characters"),
        (PW, "user 'ana': the new password must differ from the current one"),
    ],
)
def test_accounts_password_change_refuses_a_bad_new_password(staff: Settings, new: str, message: str) -> None:
    with pytest.raises(RecordError) as info:
        account_service.change_password(staff, "ana", new, old_password=PW)

    assert str(info.value) == message


def test_accounts_password_reset_by_qa_officer_and_not_by_others(staff: Settings) -> None:
    with pytest.raises(NotAuthorizedError, match="user 'bo' may not set the password of 'ana'"):
        account_service.change_password(staff, "ana", "reset secret 1", officer=Officer("bo", PW))
    account_service.change_password(staff, "ana", "reset secret 1", officer=Officer("qa.one", QA_PW))

    # The officer knows the reset password: it signs nothing until ana sets her own.
    with pytest.raises(AuthenticationError, match="the password was reset by a QA officer; set your own first"):
        guard.sign_in(staff, "ana", "reset secret 1", "sign")
    account_service.change_password(staff, "ana", "ana's own secret", old_password="reset secret 1")
    assert guard.sign_in(staff, "ana", "ana's own secret", "sign").username == "ana"


def test_accounts_password_change_starts_the_count_again(staff: Settings) -> None:
    _fail(staff, "ana", 2)
    account_service.change_password(staff, "ana", "reset secret 1", officer=Officer("qa.one", QA_PW))

    _fail(staff, "ana", 2)

    assert _state(staff, "ana") == (True, False)


def test_accounts_list_users_shows_state(staff: Settings) -> None:
    _fail(staff, "ana", 3)
    account_service.disable_user(staff, "bo", Officer("qa.one", QA_PW))

    rows = {r["username"]: r for r in account_service.list_users(staff)}

    assert (rows["ana"]["active"], rows["ana"]["locked"]) == (True, True)
    assert (rows["bo"]["active"], rows["bo"]["locked"]) == (False, False)
    assert rows["qa.one"]["roles"] == ["demo_hospital:qa"]
    assert list(rows) == sorted(rows)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_accounts_locked_signer_is_refused_at_submit(engine: Settings) -> None:
    from flows.services import signing as signing_service
    from tests.fixtures_engine import ARRIVAL, PASSWORD, start_receipt, wait_for

    qa = Officer("qa", PASSWORD)
    account_service.add_user(engine, "locked.tech", "Lo Ke", PASSWORD, [("demo_hospital", "cell_lab")], officer=qa)
    training.grant_training(
        engine, "locked.tech", "demo_hospital", "dose_receipt", 1, trainer="Test Trainer", officer=qa
    )
    run_id = start_receipt(engine, coi="COI-LOCK-0001")
    wait_for(engine, run_id, step="arrival")
    for _ in range(engine.lockout_threshold):
        with pytest.raises(AuthenticationError):
            signing_service.submit_step(engine, run_id, "arrival", "locked.tech", "not the password", ARRIVAL)

    with pytest.raises(AuthenticationError, match="account locked after 5 failed sign-ins"):
        signing_service.submit_step(engine, run_id, "arrival", "locked.tech", PASSWORD, ARRIVAL)

    rec = wait_for(engine, run_id, step="arrival")
    assert {s["id"]: s["status"] for s in rec["steps"]}["arrival"] == "waiting"
    with read_session(engine.database_url) as s:
        last = s.exec(select(AuditEvent).order_by(col(AuditEvent.seq).desc())).first()
    assert last is not None
    assert (last.action, last.object_id) == ("auth.refused", "locked.tech")


@pytest.mark.slow
def test_accounts_cli_prints_one_red_line_for_a_refused_unlock(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOPFLOW_")}
    env.update({"SOPFLOW_HOME": str(tmp_path / "home"), "COLUMNS": "200", "SOPFLOW_LOCKOUT_THRESHOLD": "2"})

    def cli(*args: str, password: str = PW, new: str = PW) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flows", *args],
            env={**env, "SOPFLOW_PASSWORD": password, "SOPFLOW_NEW_PASSWORD": new},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert (
        cli("user", "add", "qa.one", "--name", "Qian An", "--role", "demo_hospital:qa").returncode == 0
    )  # the first: bootstrap
    unattended = cli("user", "add", "ana", "--name", "Ana Li", "--role", "demo_hospital:cell_lab")
    assert unattended.returncode == 1
    assert "a QA officer of the user's institutions adds users: --as QA_USER" in unattended.stderr
    assert (
        cli("user", "add", "ana", "--name", "Ana Li", "--role", "demo_hospital:cell_lab", "--as", "qa.one").returncode
        == 0
    )
    first = cli("user", "passwd", "ana", password="wrong password", new="new secret 12")
    locked = cli("user", "passwd", "ana", password="wrong password", new="new secret 12")
    refused = cli("user", "unlock", "ana", "--as", "ana")
    unlocked = cli("user", "unlock", "ana", "--as", "qa.one")
    listed = cli("user", "list")

    assert first.returncode == 1
    assert first.stderr.strip().splitlines() == ["error: user 'ana': wrong user name or password"]
    assert locked.returncode == 1
    assert "account locked after 2 failed sign-ins" in locked.stderr
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "error: user 'ana': account locked after 2 failed sign-ins; a QA officer must unlock it "
        "(sopflow user unlock ana --as QA_USER)"
    ]
    assert "Traceback" not in refused.stderr + locked.stderr
    assert unlocked.returncode == 0, unlocked.stderr
    assert "user ana unlocked" in unlocked.stdout
    assert "ana                  active" in listed.stdout
