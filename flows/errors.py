"""Every error sopflow raises on purpose, in one tree.

The library raises; only ``flows.cli`` and ``flows.web`` turn these into messages for people.
Third-party errors are translated into these at the boundary (``raise … from exc``).
``did_you_mean`` is the one way a message suggests what was meant.

    FlowsError
    ├── ConfigError               a setting is missing or wrong (database URL, home folder, server)
    │   └── SchemaVersionError    the database's tables are behind the code (`sopflow db upgrade`) or ahead
    ├── SopDefinitionError        bad YAML / schema / cross-reference; .problems: list[Problem]
    ├── NotFoundError             no such run, document, user, version … (the web answers 404)
    │   └── SopNotFoundError      no SOP, institution or product by that id (with "did you mean")
    ├── SopNotEffectiveError      the SOP has no Effective version: a run cannot start on it
    ├── SopInputError             bad run parameters or step fields; .problems: list[str]
    ├── ChangeControlError        an SOP version cannot move as asked (state, number, import hashes)
    ├── ApprovalError             a signature or submission is refused
    │   ├── AuthenticationError   unknown user, wrong password, inactive account
    │   │   └── ThrottledError    too many failed sign-ins from this client: wait (the web answers 429)
    │   ├── NotAuthorizedError    who may do what says no (the web answers 403); audited by the guard
    │   ├── StepNotWaitingError   the step is not waiting for input (done, not reached, unknown)
    │   └── SignatureMismatchError a signature does not match what it claims to sign
    ├── RecordError               the quality record cannot be written or read as asked
    ├── EngineError               the Prefect side failed: server down, deployment missing, run lost
    ├── DocumentRenderError       a template failed to render (names template and variable)
    └── NotificationError         apprise could not deliver (names the role or channel)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ApprovalError",
    "AuthenticationError",
    "ChangeControlError",
    "ConfigError",
    "DocumentRenderError",
    "EngineError",
    "FlowsError",
    "NotAuthorizedError",
    "NotFoundError",
    "NotificationError",
    "Problem",
    "RecordError",
    "SchemaVersionError",
    "SignatureMismatchError",
    "SopDefinitionError",
    "SopInputError",
    "SopNotEffectiveError",
    "SopNotFoundError",
    "StepNotWaitingError",
    "ThrottledError",
    "did_you_mean",
]


class FlowsError(Exception):
    """Base of every error sopflow raises on purpose."""


class ConfigError(FlowsError):
    """A setting is missing or wrong."""


class SchemaVersionError(ConfigError):
    """The database's schema revision is not the code's: behind (``sopflow db upgrade``), ahead, or unknown."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in an SOP definition file, located as precisely as we can."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SopDefinitionError(FlowsError):
    """An SOP definition (or institution / product file) is invalid; every problem is listed."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def did_you_mean(word: str, options: Iterable[str], known: str = "Expected one of") -> str:
    """The hint after "unknown …" / "no …": ``Did you mean 'x'?`` when an option is close to
    ``word``, else ``<known>: 'a', 'b'.`` listing the options as given; ``""`` when there are none."""
    options = list(dict.fromkeys(str(o) for o in options))
    close = difflib.get_close_matches(word, options, n=1)
    if close:
        return f"Did you mean {close[0]!r}?"
    return f"{known}: {', '.join(repr(o) for o in options)}." if options else ""


class NotFoundError(FlowsError):
    """No run, document, user, SOP version … by that id or name."""


class SopNotFoundError(NotFoundError):
    """No SOP, institution or product by that id."""


class SopNotEffectiveError(FlowsError):
    """The SOP exists but no version of it is Effective now, so no run may start on it."""


class ChangeControlError(FlowsError):
    """An SOP version cannot be drafted, submitted, issued, reviewed or imported as asked."""


class SopInputError(FlowsError):
    """Run parameters or step fields do not satisfy the SOP; every problem is listed."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ApprovalError(FlowsError):
    """A submission or signature is refused."""


class AuthenticationError(ApprovalError):
    """Unknown user, wrong password or inactive account (the message never says which)."""


class ThrottledError(AuthenticationError):
    """Too many failed sign-ins from this client: it waits ``seconds`` before it may try again (the
    web answers 429 with ``Retry-After``)."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds


class NotAuthorizedError(ApprovalError):
    """The signer may not sign this step (role, separation of duties)."""


class StepNotWaitingError(ApprovalError):
    """The step does not wait for input now."""


class SignatureMismatchError(ApprovalError):
    """A signature does not match the data, run or step it claims to sign."""


class RecordError(FlowsError):
    """The quality record cannot be written or read as asked."""


class EngineError(FlowsError):
    """The Prefect side failed: server down, deployment missing, run lost."""


class DocumentRenderError(FlowsError):
    """A document template failed to render."""

    def __init__(self, template: str, message: str) -> None:
        self.template = template
        super().__init__(f"template {template!r}: {message}")


class NotificationError(FlowsError):
    """apprise could not deliver a message."""
