"""The service floor's guard: sign-in, every "who may" rule, and the one refuse-and-audit helper.

Every service that acts for a person asks here; no other module of the floor (and nothing in the
CLI or the web) decides who may do what. The rules, each a function that returns the problem in
words (or None) so a caller can show it before anyone signs:

    start_problem       start a run: a role at the institution, one the SOP's ``start_roles`` admits
    signer_problem      sign a step: role, training on the run's version, separation of duties.
                        The rule itself lives in ``flows.record.state`` because the flow re-checks
                        every signature before it goes on; the guard asks that same function.
    corrector_problem   correct a signed entry: may sign it, and did not verify it
    reader_problem      read an institution's runs, documents and SOPs: any role there.
                        ``readable_run`` / ``may_read``: whoever may not is told the thing does not
                        exist (``NO_SUCH_RUN``, the web's 404), never that it exists and is not theirs
    deviation_problem   raise a deviation by hand on a run of an institution: any role there; to
                        quarantine the dose with it, role ``qa`` there
    role_problem        act in change control: hold the named role at the institution
    officer_problem     add users or record training at institutions: role ``qa`` at each
    over_problem        disable, enable, unlock or reset another account: ``qa`` where they hold a role
    first_account       only the very first account is created without a QA officer (bootstrap)
    require_admin       the installation administrator (sets up institutions): whoever holds the
                        key file whose sha256 is the newest ``AdminKey`` row, readable by its owner only

``sign_in`` authenticates (argon2), audited: ``auth.ok``, or ``auth.failed`` / ``auth.refused``.
Failures count per account and client (``Channel``, ``flows.services.throttle``): from a channel
that already knows the account (its own web session, the command line) the threshold-th locks the
account; from an anonymous client (the sign-in page) it makes that client wait, and every refusal
there reads the same (``SIGN_IN_REFUSED``). The design: docs/security.md.
``refuse`` writes the ``<action>.refused`` audit event, under the actor's id (``unauthenticated``
when nobody signed in), and returns the ``NotAuthorizedError`` to raise. The ``require_*``
helpers sign in, ask a rule and refuse in one call.
"""

from __future__ import annotations

import getpass
import hmac
import math
import socket
import time
from contextvars import ContextVar
from dataclasses import dataclass

from sqlmodel import Session, col, select

from flows.config import Settings
from flows.errors import AuthenticationError, NotAuthorizedError, NotFoundError, ThrottledError, did_you_mean
from flows.record import accounts, ledger
from flows.record.db import init_db, read_session, write_session
from flows.record.state import signer_problem
from flows.record.tables import AdminKey, Signature, SopRun, User
from flows.record.users import current_grants, find_user, roles_of
from flows.record.versions import ADMIN_ROLE
from flows.services import throttle
from flows.sop.model import HumanStepSpec, SopDefinition, VerifyStepSpec

__all__ = [
    "ADMIN",
    "ADMIN_ROLE",
    "NO_SUCH_DEVIATION",
    "NO_SUCH_DOCUMENT",
    "NO_SUCH_RUN",
    "OFFICER_ROLE",
    "SIGN_IN_REFUSED",
    "THROTTLED",
    "UNAUTHENTICATED",
    "Admin",
    "Channel",
    "Officer",
    "corrector_problem",
    "current_channel",
    "deviation_problem",
    "first_account",
    "institutions_of",
    "local_channel",
    "lookup_run",
    "may_read",
    "officer_problem",
    "over_problem",
    "readable_run",
    "reader_problem",
    "refuse",
    "require_admin",
    "require_officer",
    "require_officer_over",
    "require_role",
    "require_sop_admin",
    "role_problem",
    "set_channel",
    "sign_in",
    "signer_problem",
    "start_problem",
    "target_user",
]

OFFICER_ROLE = "qa"
"""The role that adds users, records training and unlocks, disables, enables and resets accounts."""
ADMIN = "admin"
"""The actor of what the installation administrator does (the OS user and host are in the payload)."""
UNAUTHENTICATED = "unauthenticated"
"""The actor of a refusal when nobody signed in (the audit event still says what was tried)."""


@dataclass(frozen=True)
class Officer:
    """Who acts: a user name and the password they re-authenticate with."""

    username: str
    password: str


@dataclass(frozen=True)
class Admin:
    """The installation administrator, authenticated by the key file: which key, and who ran the command."""

    key_id: str
    os_user: str
    host: str


# -- sign-in and refusal --------------------------------------------------------------------------
SIGN_IN_REFUSED = (
    "wrong user name or password, or the account may not sign in now; "
    "if you are sure of your password, ask a QA officer (they see the account's state)"
)
"""What an anonymous client (the sign-in page) is told of every refused sign-in: unknown name,
wrong password, locked or disabled account alike, so it learns nothing of which accounts exist.
The owner learns why from a QA officer (the People page and ``sopflow user list`` show locked
and disabled accounts) or the audit log (``auth.failed``, ``auth.refused`` with the reason)."""
THROTTLED = "too many failed sign-ins from this address; wait {seconds} seconds, then try again"


@dataclass(frozen=True)
class Channel:
    """Where a sign-in comes from: ``client`` (``ip:ADDRESS`` for the web, ``local:USER@HOST`` for the
    command line), and whether the channel already knows who is there: ``local`` (the server's
    command line, inside the installation) or ``session_of`` (a web session that user signed in).

    Failures are counted per account and client (``flows.services.throttle``). From a channel that
    knows the account, ``lockout_threshold`` of them lock it, and the messages say why; from an
    anonymous one (the sign-in page, or a session of someone else) they make that client wait, never
    lock the account, and every refusal reads ``SIGN_IN_REFUSED``."""

    client: str
    local: bool = False
    session_of: str | None = None

    def knows(self, username: str) -> bool:
        return self.local or self.session_of == username


_channel: ContextVar[Channel | None] = ContextVar("sopflow_sign_in_channel", default=None)


def local_channel() -> Channel:
    return Channel(client=f"local:{getpass.getuser()}@{socket.gethostname()}", local=True)


def set_channel(channel: Channel) -> None:
    """The channel of the sign-ins that follow in this context (the web sets one per request)."""
    _channel.set(channel)


def current_channel() -> Channel:
    """The context's channel; without one (the CLI, scripts), the local command line."""
    return _channel.get() or local_channel()


def sign_in(settings: Settings, username: str, password: str, purpose: str, *, allow_temporary: bool = False) -> User:
    """Authenticate, audited: ``auth.ok``, or ``auth.failed`` / ``auth.refused`` and perhaps a lock
    or a wait (``Channel``: per account and client; ``flows.services.throttle``).

    The password is checked outside the write lock (argon2 is slow on purpose); the account's
    state is checked again inside it. A lock or a wait is written in its own transaction, so it
    stays although the sign-in fails. A client that must wait is refused before the password is
    checked. Returns the user detached from any session.

    Raises:
        ThrottledError: the client must wait.
        AuthenticationError: unknown user, wrong password, disabled or locked account.
    """
    init_db(settings.database_url)
    channel = current_channel()
    known = channel.knows(username)
    pair, client = throttle.pair_key(username, channel.client), throttle.client_key(channel.client)
    if not known:
        with read_session(settings.database_url) as s:
            wait = throttle.wait_for(s, [pair, client], time.time())
        if wait > 0:
            raise ThrottledError(THROTTLED.format(seconds=math.ceil(wait)), wait)
    with read_session(settings.database_url) as s:
        result = accounts.check_credentials(s, username, password)
        if isinstance(result, User):
            s.expunge(result)
    with write_session(settings.database_url) as s:
        if isinstance(result, User):
            if not accounts.is_active(s, result.id):
                result = accounts.Refusal(
                    "disabled", f"user {username!r}: the account is disabled; a QA officer must enable it"
                )
            elif accounts.is_locked(s, result.id):
                result = accounts.Refusal("locked", accounts.lock_message(s, result))
            elif not allow_temporary and accounts.must_change_password(s, result.id):
                result = accounts.Refusal(
                    "temporary",
                    f"user {username!r}: the password was reset by a QA officer; "
                    f"set your own first (sopflow user passwd {username})",
                )
            else:
                accounts.record_success(s, result, purpose)
                throttle.forget(s, pair)
                return result
        accounts.record_failure(s, username, result, purpose, channel.client)
        message = result.message
        now = time.time()
        if result.kind == "temporary":
            pass  # the password was right: its owner is told to set their own
        elif known:
            if result.kind in ("password", "unknown"):
                failures = throttle.count_failure(
                    s, pair, now, limit=settings.lockout_threshold, backoff=settings.sign_in_backoff_seconds
                )
                user = find_user(s, username)
                if failures >= settings.lockout_threshold and user is not None and not accounts.is_locked(s, user.id):
                    lock = accounts.lock(s, user, failures, settings.lockout_threshold, channel.client)
                    throttle.forget_account(s, username)
                    message = f"{message}; {lock}"
        else:  # an anonymous client: one message, whatever the reason; the client waits, the account does not lock
            throttle.count_failure(
                s, pair, now, limit=settings.lockout_threshold, backoff=settings.sign_in_backoff_seconds
            )
            throttle.count_failure(
                s,
                client,
                now,
                limit=settings.client_failure_limit,
                backoff=settings.sign_in_backoff_seconds,
                window=throttle.WINDOW,
            )
            message = SIGN_IN_REFUSED
    raise AuthenticationError(message)


def refuse(
    settings: Settings, actor: str, action: str, object_type: str, object_id: str, problem: str
) -> NotAuthorizedError:
    """Audit a refusal (``<action>.refused``, the problem as payload and reason) and return the
    ``NotAuthorizedError`` the caller raises. ``actor`` is the signed-in user's id, or
    ``UNAUTHENTICATED``."""
    with write_session(settings.database_url) as s:
        ledger.audit(
            s,
            actor=actor,
            action=f"{action}.refused",
            object_type=object_type,
            object_id=object_id,
            payload={"problem": problem},
            reason=problem,
        )
    return NotAuthorizedError(problem)


# -- who holds what ---------------------------------------------------------------------------------
def institutions_of(session: Session, user_id: str, role: str | None = None) -> set[str]:
    """The institutions where the user holds a role (``role``, when given) now."""
    return {g.institution for g in current_grants(session, user_id=user_id, role=role)}


def target_user(session: Session, username: str) -> User:
    """The account another action is about, detached. Raises NotFoundError (with "did you mean")."""
    user = find_user(session, username)
    if user is None:
        names = list(session.exec(select(User.username)))
        hint = did_you_mean(username, names) or "`sopflow user list` lists them."
        raise NotFoundError(f"no user {username!r}. {hint}")
    session.expunge(user)
    return user


# -- the rules ----------------------------------------------------------------------------------------
def start_problem(session: Session, user: User, institution: str, sop: SopDefinition) -> str | None:
    """Why ``user`` may not start a run of ``sop`` at ``institution``, or None."""
    held = roles_of(session, user.id, institution)
    if not held:
        return f"user {user.username!r} holds no role at {institution!r} and may not start its runs"
    if sop.start_roles and not set(sop.start_roles) & held:
        return (
            f"{sop.id} may only be started by role {' or '.join(map(repr, sop.start_roles))} of "
            f"{institution!r}; user {user.username!r} holds {', '.join(map(repr, sorted(held)))}"
        )
    return None


def corrector_problem(
    session: Session, run: SopRun, sop: SopDefinition, step: HumanStepSpec, user_id: str
) -> str | None:
    """Why ``user_id`` may not correct ``step``: they may not sign it, or they verified it."""
    problem = signer_problem(session, run, sop, step, user_id)
    if problem is not None:
        return problem
    verifiers = [st.id for st in sop.steps if isinstance(st, VerifyStepSpec) and st.of == step.id]
    signed = session.exec(
        select(Signature.id).where(
            Signature.run_id == run.id, col(Signature.step_id).in_(verifiers), Signature.user_id == user_id
        )
    ).first()
    if verifiers and signed is not None:
        return f"you verified step {step.id!r}: its verifier may not correct it"
    return None


def reader_problem(session: Session, username: str, institution: str) -> str | None:
    """Why ``username`` may not read ``institution``'s runs, documents and SOPs (no role there)."""
    user = find_user(session, username)
    if user is not None and institution in institutions_of(session, user.id):
        return None
    return f"user {username!r} holds no role at {institution!r} and may not read its runs or documents"


NO_SUCH_RUN = "no such run among the runs you may read; the runs list shows them"
"""The one answer for a run id (or prefix) that names no run, more than one, or a run of an
institution where the reader holds no role: a reader cannot tell them apart (the web answers 404)."""
NO_SUCH_DOCUMENT = "no such document among the documents you may read"
NO_SUCH_DEVIATION = "no such deviation among the deviations you may read"


def lookup_run(session: Session, run_id: str, among: set[str] | None = None) -> SopRun | None:
    """A run by id, or by a unique prefix of at least six characters (as ``sopflow runs`` prints them).
    ``among``: only runs of these institutions count (a prefix is unique among them), so whether a
    prefix also matches a run elsewhere makes no difference to the answer."""
    run = session.get(SopRun, run_id)
    if run is None and len(run_id) >= 6:
        query = select(SopRun).where(col(SopRun.id).startswith(run_id))
        if among is not None:
            query = query.where(col(SopRun.institution).in_(sorted(among)))
        matches = list(session.exec(query.limit(2)))
        run = matches[0] if len(matches) == 1 else None
    if run is not None and among is not None and run.institution not in among:
        return None
    return run


def readable_run(session: Session, username: str, run_id: str) -> SopRun:
    """The run ``run_id`` names, if ``username`` may read it (``reader_problem``).

    Raises:
        NotFoundError: ``NO_SUCH_RUN``, the same whether no run has that id or the run is not theirs.
    """
    user = find_user(session, username)
    run = lookup_run(session, run_id, among=institutions_of(session, user.id) if user is not None else set())
    if run is None:
        raise NotFoundError(NO_SUCH_RUN)
    return run


def may_read(session: Session, username: str, institution: str) -> bool:
    """Whether ``username`` may see anything of ``institution`` (its SOPs, versions, runs): a role there.
    Whoever may not is answered as if the page did not exist."""
    return reader_problem(session, username, institution) is None


def deviation_problem(session: Session, user: User, institution: str, *, quarantine: bool) -> str | None:
    """Why ``user`` may not raise a deviation by hand at ``institution``: anyone who works there may
    report what they saw; quarantining the dose with it takes role ``qa`` there."""
    held = roles_of(session, user.id, institution)
    if not held:
        return f"user {user.username!r} may not raise a deviation at {institution!r}: that takes a role there"
    if quarantine and OFFICER_ROLE not in held:
        return (
            f"user {user.username!r} may not quarantine a dose at {institution!r}: "
            f"that takes role {OFFICER_ROLE!r} there"
        )
    return None


def role_problem(session: Session, user: User, institution: str, role: str, purpose: str) -> str | None:
    """Why ``user`` may not ``purpose`` at ``institution``: it takes ``role`` there."""
    held = roles_of(session, user.id, institution)
    if role in held:
        return None
    return (
        f"user {user.username!r} may not {purpose} at {institution!r}: that takes role {role!r} there "
        f"(they hold {', '.join(sorted(held)) or 'no role'})"
    )


def officer_problem(session: Session, user: User, institutions: set[str], purpose: str) -> str | None:
    """Why ``user`` may not ``purpose`` at ``institutions``: it takes role ``qa`` at each of them."""
    outside = sorted(institutions - institutions_of(session, user.id, OFFICER_ROLE))
    if institutions and not outside:
        return None
    where = ", ".join(repr(i) for i in outside) if outside else "no institution"
    return f"user {user.username!r} may not {purpose} at {where}: that takes role {OFFICER_ROLE!r} there"


def over_problem(session: Session, officer: User, target: User, verb: str, *, own: bool = False) -> str | None:
    """Why ``officer`` may not ``verb`` ``target``: it takes ``qa`` where the target holds a role, and
    never on one's own account (unless ``own``: a password change of one's own)."""
    where = institutions_of(session, target.id)
    if not where & institutions_of(session, officer.id, OFFICER_ROLE):
        return (
            f"user {officer.username!r} may not {verb} {target.username!r}: that takes role {OFFICER_ROLE!r} at an "
            f"institution where {target.username!r} holds a role ({', '.join(sorted(where)) or 'none'})"
        )
    if officer.id == target.id and not own:
        return f"user {officer.username!r} may not {verb} their own account; another QA officer must"
    return None


def first_account(session: Session) -> bool:
    """True while no account exists: the first one is created without a QA officer (bootstrap)."""
    return session.exec(select(User.id).limit(1)).first() is None


# -- sign in, ask, refuse ---------------------------------------------------------------------------
def require_role(
    settings: Settings,
    who: Officer,
    institution: str,
    role: str,
    *,
    action: str,
    object_type: str,
    object_id: str,
    purpose: str,
) -> User:
    """Sign ``who`` in and check they hold ``role`` at ``institution``; refused and audited otherwise.

    Raises:
        AuthenticationError, NotAuthorizedError
    """
    user = sign_in(settings, who.username, who.password, purpose)
    with read_session(settings.database_url) as s:
        problem = role_problem(s, user, institution, role, purpose)
    if problem:
        raise refuse(settings, user.id, action, object_type, object_id, problem)
    return user


def require_officer(
    settings: Settings,
    who: Officer | None,
    institutions: set[str],
    *,
    action: str,
    target: str,
    purpose: str,
    nobody: str,
) -> User:
    """Sign ``who`` in and check they are a QA officer of every one of ``institutions``; nobody
    (``who`` None) is refused too, with the message ``nobody``. Refusals are audited against
    ``target`` (a user name).

    Raises:
        AuthenticationError, NotAuthorizedError
    """
    if who is None:
        raise refuse(settings, UNAUTHENTICATED, action, "sf_user", target, nobody)
    user = sign_in(settings, who.username, who.password, f"{action} {target}")
    with read_session(settings.database_url) as s:
        problem = officer_problem(s, user, institutions, purpose)
    if problem:
        raise refuse(settings, user.id, action, "sf_user", target, problem)
    return user


def require_officer_over(
    settings: Settings, who: Officer, target_name: str, *, action: str, verb: str, own: bool = False
) -> tuple[User, User]:
    """Sign ``who`` in and check ``over_problem``; returns (officer, target).

    Raises:
        AuthenticationError, NotAuthorizedError, NotFoundError
    """
    officer = sign_in(settings, who.username, who.password, f"{action} {target_name}")
    with read_session(settings.database_url) as s:
        target = target_user(s, target_name)
        problem = over_problem(s, officer, target, verb, own=own)
    if problem:
        raise refuse(settings, officer.id, action, "sf_user", target.username, problem)
    return officer, target


def require_sop_admin(settings: Settings, username: str, institution: str) -> None:
    """For pages that only show (the SOP editor): the user holds ``sop_admin`` at the institution.
    Saving asks again with the password (``require_role``).

    Raises:
        NotFoundError (no such user), NotAuthorizedError
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        user = target_user(s, username)
        held = roles_of(s, user.id, institution)
    if ADMIN_ROLE not in held:
        raise NotAuthorizedError(
            f"user {username!r} may not edit SOPs at {institution!r}: only its SOP administrators may create "
            f"drafts, and that takes role {ADMIN_ROLE!r} there (they hold {', '.join(sorted(held)) or 'no role'})"
        )


def require_admin(settings: Settings, *, action: str, object_type: str, object_id: str) -> Admin:
    """The installation administrator: the key in ``SOPFLOW_ADMIN_KEY_FILE`` (readable by its owner
    only) matches the newest registered ``AdminKey``. Refused and audited otherwise.

    Raises:
        NotAuthorizedError
    """
    path = settings.admin_key_path
    key, problem = "", None
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            problem = f"{path} may be read by other users (mode {mode & 0o777:o}); `chmod 600 {path}` first"
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        problem = (
            f"no installation administrator's key at {path} (SOPFLOW_ADMIN_KEY_FILE); `sopflow admin init` creates it"
        )
    except OSError as exc:
        problem = f"cannot read the installation administrator's key {path}: {exc.strerror}"
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        row = s.exec(select(AdminKey).order_by(col(AdminKey.created_at).desc()).limit(1)).first()
    if problem is None and row is None:
        problem = "no installation administrator's key is registered; `sopflow admin init` creates one"
    elif (
        problem is None and row is not None and not hmac.compare_digest(ledger.sha256_hex(key.encode()), row.key_sha256)
    ):
        problem = f"{path} is not the installation administrator's key in force"
    if problem is not None or row is None:
        raise refuse(settings, UNAUTHENTICATED, action, object_type, object_id, problem or "no key")
    return Admin(row.id, getpass.getuser(), socket.gethostname())
