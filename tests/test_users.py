"""Users, role grants and authentication (argon2). Each ``add_user`` hashes a password (slow on
purpose), so these tests create few users and run on SQLite only, except the grant test."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import select

from flows.errors import AuthenticationError, RecordError
from flows.record import accounts, ledger, users
from flows.record.db import init_db, read_session, write_session
from flows.record.tables import AuditEvent, User, utcnow


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'users.db'}"
    init_db(url)
    return url


def test_users_add_and_authenticate(url: str) -> None:
    with write_session(url) as s:
        added = users.add_user(s, "ana.li", "  Ana Li  ", "correct horse 7", actor="admin")
        added_id = added.id

    with read_session(url) as s:
        user = accounts.authenticate(s, "ana.li", "correct horse 7")
        events = list(s.exec(select(AuditEvent)))
        report = ledger.verify_chain(s)
    assert user.id == added_id
    assert user.printed_name == "Ana Li"
    assert user.created_by == "admin"
    assert user.password_hash.startswith("$argon2")
    assert "correct horse 7" not in user.password_hash
    assert [(e.action, e.actor, e.object_id) for e in events] == [("user.create", "admin", added_id)]
    assert report.ok, report.problems


def test_users_wrong_password_and_unknown_user_give_the_same_message(url: str) -> None:
    with read_session(url) as s, pytest.raises(AuthenticationError) as unknown:
        accounts.authenticate(s, "bo", "correct horse 7")
    with write_session(url) as s:
        users.add_user(s, "bo", "Bo Wang", "correct horse 7", actor="admin")

    with read_session(url) as s, pytest.raises(AuthenticationError) as wrong:
        accounts.authenticate(s, "bo", "Correct horse 7")

    assert str(unknown.value) == str(wrong.value) == "user 'bo': wrong user name or password"


def test_users_authenticate_refuses_empty_password(url: str) -> None:
    with write_session(url) as s:
        users.add_user(s, "cy", "Cy Zhao", "correct horse 7", actor="admin")

    with read_session(url) as s, pytest.raises(AuthenticationError, match="wrong user name or password"):
        accounts.authenticate(s, "cy", "")


@pytest.mark.parametrize(
    ("username", "printed", "password", "message"),
    [
        ("Ana", "Ana Li", "correct horse 7", "username 'Ana': use 2-40 lowercase letters"),
        ("1ana", "Ana Li", "correct horse 7", "username '1ana': use 2-40 lowercase letters"),
        ("a", "Ana Li", "correct horse 7", "username 'a': use 2-40 lowercase letters"),
        ("ana li", "Ana Li", "correct horse 7", "username 'ana li': use 2-40 lowercase letters"),
        ("a" * 41, "Ana Li", "correct horse 7", "use 2-40 lowercase letters"),
        ("ana", "   ", "correct horse 7", "user 'ana': a printed name is required"),
        ("ana", "Ana Li", "short", "user 'ana': the password must have at least 8 characters"),
    ],
)
def test_users_add_user_refuses_bad_input(url: str, username: str, printed: str, password: str, message: str) -> None:
    with pytest.raises(RecordError) as info, write_session(url) as s:
        users.add_user(s, username, printed, password, actor="admin")

    assert message in str(info.value)
    with read_session(url) as s:
        assert s.exec(select(User)).first() is None
        assert s.exec(select(AuditEvent)).first() is None


def test_users_add_user_refuses_duplicate_username(url: str) -> None:
    with write_session(url) as s:
        users.add_user(s, "dee", "Dee Sun", "correct horse 7", actor="admin")

    with pytest.raises(RecordError) as info, write_session(url) as s:
        users.add_user(s, "dee", "Another Dee", "correct horse 8", actor="admin")

    assert str(info.value) == "user 'dee' exists already; accounts are never shared or reused"
    with read_session(url) as s:
        assert [u.printed_name for u in s.exec(select(User))] == ["Dee Sun"]


def test_users_grant_role_per_institution(db_url: str) -> None:
    with write_session(db_url) as s:  # one hash on each database: the grant is what is tested
        user = User(
            username="eve",
            printed_name="Eve Qian",
            password_hash=users.hash_password("correct horse 7"),
            created_at=utcnow(),
            created_by="admin",
        )
        ledger.append(s, user, actor="admin", action="user.create")
        users.grant_role(s, user, "demo_hospital", "pharmacist", actor="admin")
        users.grant_role(s, user, "demo_hospital", "qa", actor="admin")
        users.grant_role(s, user, "demo_hospital", "qa", actor="admin")  # granted twice: still one role
        users.grant_role(s, user, "other_hospital", "nurse", actor="admin")
        user_id = user.id

    with read_session(db_url) as s:
        assert users.roles_of(s, user_id, "demo_hospital") == {"pharmacist", "qa"}
        assert users.roles_of(s, user_id, "other_hospital") == {"nurse"}
        assert users.roles_of(s, user_id, "third_hospital") == set()
        assert users.roles_of(s, "no-such-user", "demo_hospital") == set()
        actions = [e.action for e in s.exec(select(AuditEvent))]
        report = ledger.verify_chain(s)
    assert actions == ["user.create"] + ["role.grant"] * 4
    assert report.ok, report.problems
