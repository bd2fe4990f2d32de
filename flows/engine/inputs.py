"""Stage 2: what a resume carries into a suspended flow run (``SignedInput``), in a module of its own:
the flow suspends waiting for it (``flows.engine.run_sop``), and whatever else needs its schema
imports it from here, not from the flow's module. Imports Prefect: import this module only where
Prefect is used.
"""

from __future__ import annotations

from prefect.input import RunInput

__all__ = ["SignedInput"]


class SignedInput(RunInput):
    """What a resume carries: only the id of a Signature row sopflow wrote. Never user text."""

    signature_id: str
