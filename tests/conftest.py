"""Shared fixtures. Engine fixtures (a real Prefect server and executor) live in
tests/fixtures_engine.py; database fixtures (SQLite and PostgreSQL) below.

``db_url`` runs a test on both databases sopflow supports: a SQLite file under ``tmp_path``,
and a database on the PostgreSQL server at 127.0.0.1:5432 created for this test session and
dropped at its end (every table emptied before each test). PostgreSQL must be running: CI starts
it; when it is not reachable the postgres tests fail with a message that says so. Deselect
them explicitly with ``-m "not postgres"``.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml
from sqlmodel import Session

from flows.record import ledger
from flows.record import users as user_store
from flows.record.db import get_engine, init_db
from flows.record.state import next_n
from flows.record.tables import (
    Signature,
    SopRun,
    SopVersion,
    StepRecord,
    User,
    new_id,
    utcnow,
)
from flows.record.training import record_training
from flows.record.versions import append_version_event
from flows.sop.model import HumanStepSpec, SopDefinition

pytest_plugins = ["tests.fixtures_engine", "tests.cluster"]

REPO = Path(__file__).resolve().parent.parent
DEMO_SOP = REPO / "sops" / "demo_hospital" / "dose_receipt.yaml"
DEMO_PRODUCTS = REPO / "sops" / "demo_hospital" / "products.yaml"
TEMPLATES = REPO / "templates"

PG_SERVER = os.environ.get("SOPFLOW_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")
"""The PostgreSQL server the postgres tests use (trust auth); database ``test`` must exist."""

PASSWORD = "correct horse 7"
"""Every factory user's password."""

FIXED_AT = datetime(2026, 11, 2, 1, 30, tzinfo=UTC)
"""A fixed aware time for rows whose time a test asserts on (09:30 in Asia/Shanghai)."""


# --------------------------------------------------------------------------- databases


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh database ``sopflow_test_<random>`` for this test session, with sopflow's tables."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    admin = create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    name = f"sopflow_test_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_SERVER}/test ({exc.orig}); the postgres tests need it "
            "(CI starts it). Start the server, or deselect them with -m 'not postgres'.",
            pytrace=False,
        )
    url = f"{PG_SERVER}/{name}"
    try:
        init_db(url)
        yield url
    finally:
        get_engine(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _empty_all(url: str) -> None:
    """Delete every row (children first). On tables this small DELETE is far faster than TRUNCATE."""
    from sqlalchemy import text
    from sqlmodel import SQLModel

    with get_engine(url).begin() as conn:
        conn.execute(text("SET LOCAL lock_timeout = '10s'"))  # a leaked transaction fails, never hangs
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty sopflow database with its tables, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'sopflow.db'}"
        init_db(url)
        yield url
        get_engine(url).dispose()
    else:
        url = request.getfixturevalue("pg_database")
        _empty_all(url)
        yield url


@pytest.fixture
def sql(db_url: str) -> Any:
    """``sql("UPDATE …", **params)``: change the database behind sopflow's back (committed at once)."""
    from sqlalchemy import text

    def run(statement: str, **params: Any) -> Any:
        with get_engine(db_url).begin() as conn:
            result = conn.execute(text(statement), params)
            return result.rowcount

    return run


# --------------------------------------------------------------------------- runs

USERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ana": ("Ana Li 李安娜", ("cell_lab", "pharmacist", "qa")),
    "bo": ("Bo Wang", ("pharmacist", "physician")),
}
"""The factory's users (password ``PASSWORD``): printed name and roles at demo_hospital."""


@dataclass
class MadeRun:
    """A run of the demo dose_receipt SOP inserted through the ledger, and helpers to add to it."""

    run: SopRun
    sop: SopDefinition
    users: dict[str, User] = field(default_factory=dict)

    def human(self, step_id: str) -> HumanStepSpec:
        """The human step ``step_id`` of the run's SOP."""
        step = self.sop.step(step_id)
        assert isinstance(step, HumanStepSpec), f"{step_id} is not a human step"
        return step

    def record(
        self,
        session: Session,
        step_id: str,
        status: str = "done",
        data: dict[str, Any] | None = None,
        *,
        user: str | None = None,
        sign: bool = False,
        at: datetime | None = None,
        reason: str | None = None,
        supersedes: StepRecord | None = None,
        signature_id: str | None = None,
    ) -> StepRecord:
        """Append a StepRecord: signed by ``user`` when ``sign`` (as the submit path does), or
        carrying an existing ``signature_id`` (as the flow's accepted ``done`` record does)."""
        data = data or {}
        step = self.sop.step(step_id)
        actor = self.users[user] if user else None
        sig_id = signature_id
        if sign:
            assert actor is not None, "a signature needs a user"
            sig = Signature(
                run_id=self.run.id,
                step_id=step_id,
                user_id=actor.id,
                printed_name=actor.printed_name,
                meaning="performed",
                statement=getattr(step, "meaning", None),
                signed_at=at or utcnow(),
                signed_sha256="",
            )
            sig.signed_sha256 = ledger.sha256_hex(ledger.canonical(ledger.signed_content(self.run, step_id, data, sig)))
            ledger.append(session, sig, actor=actor.id, action="signature.create")
            sig_id = sig.id
        rec = StepRecord(
            run_id=self.run.id,
            n=next_n(session, StepRecord, self.run.id),
            step_id=step_id,
            kind=step.kind,
            status=status,
            data_json=ledger.canonical(data).decode(),
            actor_id=actor.id if actor else None,
            signature_id=sig_id,
            reason=reason,
            supersedes_id=supersedes.id if supersedes else None,
            at=at or utcnow(),
        )
        ledger.append(session, rec, actor=actor.id if actor else "system", action=f"step.{status}")
        return rec


class MakeRun(Protocol):
    def __call__(
        self, session: Session, *, users: tuple[str, ...] = ..., product: str | None = ..., trained: bool = ...
    ) -> MadeRun: ...


@cache
def _password_hash() -> str:
    return user_store.hash_password(PASSWORD)


@pytest.fixture
def make_run() -> MakeRun:
    """``make_run(session)``: users with roles (and, unless ``trained=False``, training on the demo
    SOP's version), the demo SOP's text as a SopVersion, and a SopRun.

    Everything is written through ``ledger.append`` / ``users.grant_role`` inside the caller's
    (write) session, so the audit chain covers it. Users share one argon2 hash of ``PASSWORD``
    computed once per test session (hashing costs 50-400 ms). Call it once per database.
    """

    def make(
        session: Session,
        *,
        users: tuple[str, ...] = tuple(USERS),
        product: str | None = "axi_cel",
        trained: bool = True,
    ) -> MadeRun:
        made_users: dict[str, User] = {}
        for username in users:
            printed, roles = USERS[username]
            # As users.add_user writes it, with one argon2 hash per test session (not per user).
            user = User(
                username=username,
                printed_name=printed,
                password_hash=_password_hash(),
                created_at=FIXED_AT,
                created_by="system",
            )
            ledger.append(session, user, actor="system", action="user.create")
            for role in roles:
                user_store.grant_role(session, user, "demo_hospital", role, actor="system")
            made_users[username] = user
        text = DEMO_SOP.read_text(encoding="utf-8")
        sop = SopDefinition.model_validate(yaml.safe_load(text))
        sha = ledger.sha256_hex(DEMO_SOP.read_bytes())
        version = SopVersion(
            institution="demo_hospital",
            sop_id=sop.id,
            version=sop.version,
            schema_version=sop.schema_version,
            sha256=sha,
            text=text,
            stored_at=FIXED_AT,
        )
        ledger.append(session, version, actor="system", action="sop_version.store")
        append_version_event(
            session, version, "effective", actor="system", data={"effective_at": FIXED_AT.isoformat()}, at=FIXED_AT
        )  # runs start on an Effective version (flows.record.versions)
        if trained:  # signers must be trained on the SOP version (state.signer_problem)
            for user in made_users.values():
                record_training(
                    session,
                    user,
                    "demo_hospital",
                    sop.id,
                    sop.version,
                    trained_at=FIXED_AT,
                    trainer="Trainer",
                    actor="system",
                )
        product_entry = None
        if product:
            product_entry = yaml.safe_load(DEMO_PRODUCTS.read_text(encoding="utf-8"))["products"][product]
        starter = next(iter(made_users.values()))
        run = SopRun(
            institution="demo_hospital",
            sop_version_id=version.id,
            sop_id=sop.id,
            sop_version=sop.version,
            sop_sha256=sha,
            schema_version=sop.schema_version,
            params_json=json.dumps(
                {"product": product, "coi": "COI-2026-0001", "lot": "LOT-77", "patient_id": "P12345"}, sort_keys=True
            ),
            product_json=json.dumps(product_entry, sort_keys=True) if product_entry else None,
            flow_run_id=new_id(),
            started_by=starter.id,
            started_at=FIXED_AT,
        )
        ledger.append(session, run, actor=starter.id, action="run.start")
        return MadeRun(run=run, sop=sop, users=made_users)

    return make
