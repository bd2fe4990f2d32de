"""The service floor: integration tokens, for other hospital systems (HIS/LIS, barcode stations,
the pharmacy system) that call the JSON API (``flows.web.api``).

A token belongs to one institution and acts as one service account there (a sopflow user holding
the role the SOPs' ``start_roles`` need, trained on nothing, so it can sign nothing), for the
actions it was given (``SCOPES``). Only its sha256 is stored (``ApiToken``); the token itself is
shown once, when created. A QA officer of the institution creates and revokes tokens (``--as``,
re-authenticated); a revocation is an ``ApiTokenRevocation`` row, and from then on every use is
refused. ``authenticate`` checks a presented token and the scope of the action; ``audit_use``
records every use (``api.<action>``, actor the service account, object the token); every refusal
is audited (``api.<action>.refused``; an unknown token under actor ``unauthenticated``).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from sqlmodel import col, select

from flows.config import Settings
from flows.errors import AuthenticationError, NotFoundError, RecordError, did_you_mean
from flows.record import accounts, ledger
from flows.record.db import init_db, read_session, write_session
from flows.record.tables import ApiToken, ApiTokenRevocation, User, utcnow
from flows.record.users import current_grants, find_user
from flows.services import guard
from flows.services.guard import Officer

__all__ = [
    "PREFIX",
    "SCOPES",
    "ApiClient",
    "audit_use",
    "authenticate",
    "create_token",
    "find_account",
    "list_tokens",
    "revoke_token",
    "token_key",
]

SCOPES = {
    "runs:read": "list the institution's runs and read a run's status (no parameters)",
    "records:read": "read a run's quality record (parameters and entered values: patient data)",
    "inbox:read": "read what waits on a named user of the institution",
    "chain:read": "read the chain of identity of a dose",
    "runs:start": "start a run as the token's service account (its roles and the SOP's start_roles decide)",
    "identifiers:validate": "check a scanned DIN (ISBT 128) or COI against a product's coi_pattern",
}
"""Every action a token may be given; nothing signs for a person."""
PREFIX = "sopflow_"
"""Tokens start with this, so secret scanners and people recognise them."""


@dataclass(frozen=True)
class ApiClient:
    """An authenticated token: which one, its institution, its service account, what it may do."""

    token_id: str
    name: str
    institution: str
    account_id: str
    account: str
    scopes: frozenset[str]


def token_key(presented: str) -> str:
    """What is stored of a token, and what identifies it in logs and limits: its sha256."""
    return ledger.sha256_hex(presented.encode())


def _scopes(scopes: list[str]) -> list[str]:
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        hint = did_you_mean(bad[0], sorted(SCOPES), "Scopes") or f"Scopes: {', '.join(sorted(SCOPES))}."
        raise RecordError(f"--scope: unknown scope {bad[0]!r}. {hint}")
    if not scopes:
        raise RecordError(f"--scope: give at least one of {', '.join(sorted(SCOPES))}")
    return sorted(set(scopes))


def create_token(
    settings: Settings, name: str, institution: str, account: str, scopes: list[str], officer: Officer
) -> tuple[str, str]:
    """A new token for ``account`` at ``institution``; returns (token id, the token, shown only now).

    Raises:
        RecordError: no name, unknown scope, an account without a role there or disabled.
        NotFoundError, AuthenticationError, NotAuthorizedError
    """
    if not name.strip():
        raise RecordError("--name: a token needs a name saying which system holds it")
    chosen = _scopes(scopes)
    who = guard.require_officer(
        settings,
        officer,
        {institution},
        action="api.token.create",
        target=account,
        purpose="create API tokens",
        nobody="a QA officer of the institution creates tokens: --as QA_USER",
    )
    secret = PREFIX + secrets.token_urlsafe(32)
    with write_session(settings.database_url) as s:
        user = guard.target_user(s, account)
        if not current_grants(s, user_id=user.id, institution=institution):
            raise RecordError(
                f"account {account!r} holds no role at {institution!r}: give the service account the role "
                "its runs need (sopflow user grant) first"
            )
        if not accounts.is_active(s, user.id):
            raise RecordError(f"account {account!r} is disabled")
        row = ApiToken(
            name=name.strip(),
            institution=institution,
            account_id=user.id,
            scopes_json=json.dumps(chosen),
            token_sha256=token_key(secret),
            created_by=who.id,
            created_at=utcnow(),
        )
        ledger.append(s, row, actor=who.id, action="api.token.create")
        return row.id, secret


def revoke_token(settings: Settings, token_id: str, officer: Officer, reason: str) -> None:
    """Withdraw a token (an ``ApiTokenRevocation`` row); every later use is refused.

    Raises:
        RecordError: no reason, revoked already. NotFoundError, AuthenticationError, NotAuthorizedError
    """
    if not reason.strip():
        raise RecordError("--reason: a revocation needs a reason (it is kept in the record)")
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        token = _find(s, token_id)
    who = guard.require_officer(
        settings,
        officer,
        {token.institution},
        action="api.token.revoke",
        target=token.id,
        purpose="revoke API tokens",
        nobody="a QA officer of the institution revokes tokens: --as QA_USER",
    )
    with write_session(settings.database_url) as s:
        if s.exec(select(ApiTokenRevocation).where(ApiTokenRevocation.token_id == token.id)).first():
            raise RecordError(f"token {token.id} ({token.name}) is revoked already")
        row = ApiTokenRevocation(token_id=token.id, revoked_by=who.id, reason=reason.strip(), revoked_at=utcnow())
        ledger.append(s, row, actor=who.id, action="api.token.revoke", reason=reason.strip())


def _find(session: Any, token_id: str) -> ApiToken:
    token: ApiToken | None = session.get(ApiToken, token_id)
    if token is None and len(token_id) >= 6:
        matches = list(session.exec(select(ApiToken).where(col(ApiToken.id).startswith(token_id)).limit(2)))
        token = matches[0] if len(matches) == 1 else None
    if token is None:
        raise NotFoundError(f"no API token {token_id!r}; `sopflow token list` lists them")
    return token


def list_tokens(settings: Settings, institution: str | None = None) -> list[dict[str, Any]]:
    """Every token (never the token itself): name, institution, account, scopes, created, revoked."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        revoked = {r.token_id: r for r in s.exec(select(ApiTokenRevocation))}
        names = {u.id: u.username for u in s.exec(select(User))}
        query = select(ApiToken).order_by(col(ApiToken.created_at))
        if institution:
            query = query.where(ApiToken.institution == institution)
        return [
            {
                "id": t.id,
                "name": t.name,
                "institution": t.institution,
                "account": names.get(t.account_id, t.account_id),
                "scopes": json.loads(t.scopes_json),
                "created_at": t.created_at,
                "created_by": names.get(t.created_by, t.created_by),
                "revoked_at": revoked[t.id].revoked_at if t.id in revoked else None,
                "revoked_reason": revoked[t.id].reason if t.id in revoked else None,
            }
            for t in s.exec(query)
        ]


def authenticate(settings: Settings, presented: str | None, action: str, scope: str, path: str) -> ApiClient:
    """The client a presented token belongs to, if it is known, not revoked, its account active, and
    ``scope`` is one of its scopes. Every refusal is audited (``api.<action>.refused``).

    Raises:
        AuthenticationError: no token, unknown, revoked, or its account disabled.
        NotAuthorizedError: the scope is not the token's.
    """
    if not presented:
        raise AuthenticationError("no API token: send it as 'Authorization: Bearer <token>'")
    init_db(settings.database_url)
    digest = token_key(presented)
    with read_session(settings.database_url) as s:
        token = s.exec(select(ApiToken).where(ApiToken.token_sha256 == digest)).first()
        revoked = token and s.exec(select(ApiTokenRevocation).where(ApiTokenRevocation.token_id == token.id)).first()
        user = s.get(User, token.account_id) if token else None
        active = user is not None and accounts.is_active(s, user.id)
    if token is None or user is None:
        guard.refuse(settings, guard.UNAUTHENTICATED, f"api.{action}", "sf_api_token", digest[:12], "unknown token")
        raise AuthenticationError("unknown API token")
    problem = (f"token {token.id} ({token.name}) was revoked" if revoked else None) or (
        None if active else f"the token's account {user.username!r} is disabled"
    )
    if problem:
        guard.refuse(settings, guard.UNAUTHENTICATED, f"api.{action}", "sf_api_token", token.id, problem)
        raise AuthenticationError(problem)
    client = ApiClient(
        token.id, token.name, token.institution, user.id, user.username, frozenset(json.loads(token.scopes_json))
    )
    if scope not in client.scopes:
        raise guard.refuse(
            settings,
            user.id,
            f"api.{action}",
            "sf_api_token",
            token.id,
            f"token {token.name!r} may not {action.replace('.', ' ')} ({path}): that takes scope {scope!r}; "
            f"it has {', '.join(sorted(client.scopes))}",
        )
    return client


def audit_use(
    settings: Settings, client: ApiClient, action: str, object_type: str, object_id: str, **payload: Any
) -> None:
    """Record one use of a token (``api.<action>``, by its service account)."""
    with write_session(settings.database_url) as s:
        ledger.audit(
            s,
            actor=client.account_id,
            action=f"api.{action}",
            object_type=object_type,
            object_id=object_id,
            payload={"token": client.token_id, "institution": client.institution, **payload},
        )


def find_account(settings: Settings, client: ApiClient) -> User:
    """The token's service account, detached (for starting runs as it)."""
    with read_session(settings.database_url) as s:
        user = find_user(s, client.account)
        if user is None:
            raise NotFoundError(f"no account {client.account!r}")
        s.expunge(user)
        return user
