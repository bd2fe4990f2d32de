"""Administration: users and role grants, checked against the institutions' definitions."""

from __future__ import annotations

from flows.config import Settings
from flows.errors import RecordError
from flows.record.db import init_db, write_session
from flows.record.users import add_user as _add_user
from flows.record.users import grant_role
from flows.sop.catalog import Catalog

__all__ = ["add_user"]


def add_user(settings: Settings, username: str, printed_name: str, password: str,
             grants: list[tuple[str, str]], *, actor: str = "admin") -> str:
    """Create a user and grant roles; every role must exist in its institution.

    Raises:
        SopNotFoundError: unknown institution. RecordError: unknown role, bad or taken username.
    """
    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    for inst_id, role in grants:
        inst = catalog.institution(inst_id)
        if role not in inst.spec.roles:
            import difflib

            close = difflib.get_close_matches(role, list(inst.spec.roles), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Roles: {', '.join(sorted(inst.spec.roles))}."
            raise RecordError(f"institution {inst_id!r} has no role {role!r}.{hint}")
    init_db(settings.database_url)
    with write_session(settings.database_url) as s:
        user = _add_user(s, username, printed_name, password, actor=actor)
        for inst_id, role in grants:
            grant_role(s, user, inst_id, role, actor=actor)
        return user.id
