"""Stage 3: the SOP revision a run is pinned to, parsed once per process.

``stored_sop`` reads back the definition a run started on, from the ``SopVersion`` text stored
then; ``version_definition`` parses one version's text. They live apart from
``flows.record.versions`` (which re-exports them) because the current-state tables
(``flows.record.current``), written by the ledger itself, need a run's SOP (its COI parameter)
and must not import the modules that write through the ledger. Must not import prefect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlmodel import Session

from flows.errors import RecordError
from flows.record.tables import SopRun, SopVersion

if TYPE_CHECKING:  # parsed only when a version is read: the chain's walk and the light reads never do
    from flows.sop.model import SopDefinition

__all__ = ["pinned_sop", "stored_sop", "version_definition"]


def version_definition(version: SopVersion) -> SopDefinition:
    import yaml

    from flows.sop.model import SopDefinition

    return SopDefinition.model_validate(yaml.safe_load(version.text))


_PARSED: dict[tuple[str, str], SopDefinition] = {}
"""Parsed SOP versions by (version row id, sha256): a version's text never changes and a
definition is frozen, so each is parsed once per process (sweeps, the inbox and every gate read them)."""


def stored_sop(session: Session, run: SopRun) -> SopDefinition:
    """The SOP revision a run is pinned to, from the text stored when it started."""
    return pinned_sop(session, run.sop_version_id, run.sop_sha256, run_id=run.id)


def pinned_sop(session: Session, version_id: str, sha256: str, *, run_id: str = "") -> SopDefinition:
    """The SOP revision stored as version ``version_id`` for runs that pinned its text's ``sha256``
    (what ``stored_sop`` reads; a sweep asks once per pin, not once per run)."""
    cached = _PARSED.get((version_id, sha256))
    if cached is not None:
        return cached
    version = session.get(SopVersion, version_id)
    if version is None:
        who = f"run {run_id}" if run_id else f"a run pinned to {version_id}"
        raise RecordError(f"{who}: its SOP version {version_id} is missing from the record")
    sop = version_definition(version)
    if version.sha256 == sha256:  # only a text the run's own hash vouches for is kept
        _PARSED[(version_id, sha256)] = sop
    return sop
