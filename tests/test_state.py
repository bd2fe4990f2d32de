"""Current state out of the append-only record (newest by position ``n``, never by clock) and
``signer_problem``: role, verifier is not the performer, distinct signers. Both databases."""

from __future__ import annotations

from datetime import timedelta

from flows.record import ledger, state
from flows.record.db import read_session, write_session
from flows.record.tables import RunEvent, utcnow
from tests.conftest import FIXED_AT, MakeRun


def test_state_newest_record_wins_by_position_not_clock(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s, users=("ana",))
        made.record(s, "arrival", "waiting", at=FIXED_AT + timedelta(hours=2))
        made.record(
            s, "arrival", "signed", {"seal_intact": True}, user="ana", sign=True, at=FIXED_AT + timedelta(hours=1)
        )
        made.record(s, "arrival", "done", {"seal_intact": True}, user="ana", at=FIXED_AT)  # clock went backwards
        made.record(s, "transit_temperature", "failed", {"passed": False}, at=FIXED_AT - timedelta(days=1))
        for n, (status, hours) in enumerate([("scheduled", 5), ("running", 0)], start=1):
            ledger.append(
                s,
                RunEvent(run_id=made.run.id, n=n, status=status, at=FIXED_AT + timedelta(hours=hours)),
                actor="system",
            )
        run_id = made.run.id

    with read_session(db_url) as s:
        states = state.step_states(s, run_id)
        status = state.run_status(s, run_id)
        assert {k: r.status for k, r in states.items()} == {"arrival": "done", "transit_temperature": "failed"}
        assert state.step_data(states["arrival"]) == {"seal_intact": True}
        assert state.next_n(s, type(states["arrival"]), run_id) == 5
        assert state.next_n(s, RunEvent, run_id) == 3
        assert state.next_n(s, RunEvent, "no-such-run") == 1
    assert status is not None
    assert status.status == "running"


def test_state_refused_count_counts_refusals_of_one_step(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s, users=("ana",))
        for _ in range(2):
            made.record(s, "arrival", "refused", {"problem": "forged"})
        made.record(s, "qa_acceptance", "refused", {"problem": "forged"})
        run_id = made.run.id

    with read_session(db_url) as s:
        assert state.refused_count(s, run_id, "arrival") == 2
        assert state.refused_count(s, run_id, "identity_verification") == 0


def test_state_signer_problem_missing_role(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "waiting")

        problem = state.signer_problem(s, made.run, made.sop, made.human("arrival"), made.users["bo"].id)
        allowed = state.signer_problem(s, made.run, made.sop, made.human("arrival"), made.users["ana"].id)

    assert problem == "step 'arrival' may only be signed by role 'cell_lab' of 'demo_hospital'"
    assert allowed is None


def test_state_signer_problem_disabled_account(db_url: str, make_run: MakeRun) -> None:
    """A signature by an account disabled before the flow accepted it is refused when the flow re-checks it."""
    from flows.record.accounts import append_account_event

    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "waiting")
        ana = made.users["ana"]
        assert state.signer_problem(s, made.run, made.sop, made.human("arrival"), ana.id) is None
        append_account_event(s, ana, "disabled", actor="test", reason="left the unit")
        problem = state.signer_problem(s, made.run, made.sop, made.human("arrival"), ana.id)

    assert problem == "the account 'ana' is disabled"


def test_state_signer_problem_role_of_another_institution_does_not_count(db_url: str, make_run: MakeRun) -> None:
    from flows.record.users import grant_role

    with write_session(db_url) as s:
        made = make_run(s)
        grant_role(s, made.users["bo"], "other_hospital", "cell_lab", actor="system")

        problem = state.signer_problem(s, made.run, made.sop, made.human("arrival"), made.users["bo"].id)

    assert problem == "step 'arrival' may only be signed by role 'cell_lab' of 'demo_hospital'"


def test_state_signer_problem_verifier_is_the_performer(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s)
        signed = made.record(s, "arrival", "signed", {"seal_intact": True}, user="ana", sign=True)
        made.record(s, "arrival", "done", {"seal_intact": True}, user="ana", signature_id=signed.signature_id)
        verify = made.human("identity_verification")

        own = state.signer_problem(s, made.run, made.sop, verify, made.users["ana"].id)
        other = state.signer_problem(s, made.run, made.sop, verify, made.users["bo"].id)

    assert own == (
        "step 'identity_verification' verifies step 'arrival': the person who performed 'arrival' may not verify it"
    )
    assert other is None


def test_state_signer_problem_distinct_signers_group(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "signed", {"seal_intact": True}, user="ana", sign=True)
        qa = made.human("qa_acceptance")

        same = state.signer_problem(s, made.run, made.sop, qa, made.users["ana"].id)

    assert same == ("steps 'arrival', 'qa_acceptance' must be signed by different people; you signed 'arrival' already")


def test_state_signer_problem_distinct_signers_allows_another_person(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "signed", {"seal_intact": True}, user="bo", sign=True)  # roles are not checked here

        problem = state.signer_problem(s, made.run, made.sop, made.human("qa_acceptance"), made.users["ana"].id)

    assert problem is None


def test_state_signer_problem_distinct_signers_counts_every_signature_of_the_group(
    db_url: str, make_run: MakeRun
) -> None:
    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "signed", {"seal_intact": True}, user="ana", sign=True)
        made.record(s, "arrival", "signed", {"seal_intact": True}, user="bo", sign=True, reason="corrected")

        problem = state.signer_problem(s, made.run, made.sop, made.human("qa_acceptance"), made.users["ana"].id)

    assert problem is not None
    assert "you signed 'arrival' already" in problem


def test_state_signed_but_suspended_lists_only_newest_signed_records(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s)
        arrival = made.record(
            s, "arrival", "signed", {"seal_intact": True}, user="ana", sign=True, at=utcnow() - timedelta(minutes=10)
        )
        made.record(
            s,
            "identity_verification",
            "signed",
            {"coi_matches": True},
            user="bo",
            sign=True,
            at=utcnow() - timedelta(minutes=10),
        )
        made.record(s, "identity_verification", "done", {"coi_matches": True}, user="bo")
        made.record(s, "qa_acceptance", "signed", {"decision": "accept"}, user="ana", sign=True)  # just now
        flow_run_id, sig_id = made.run.flow_run_id, arrival.signature_id

    with read_session(db_url) as s:
        stuck = state.signed_but_suspended(s, older_than=60)

    assert stuck == [(flow_run_id, "arrival", sig_id)]
