"""Configuration: where sopflow keeps its data and which servers it talks to.

Everything comes from environment variables (prefix ``SOPFLOW_``) with an embedded default:
one data directory (``SOPFLOW_HOME``, default ``~/.sopflow``) holding the SQLite database,
the local Prefect server's database, persisted task results, rendered documents and logs.

    SOPFLOW_HOME              data directory                         ~/.sopflow
    SOPFLOW_DATABASE_URL      sopflow's records (SQLAlchemy URL)     sqlite:///$HOME/sopflow.db
    SOPFLOW_PREFECT_API_URL   an external Prefect server's API URL   (unset: local server)
    SOPFLOW_PREFECT_PORT      port of the local Prefect server       4200
    SOPFLOW_PREFECT_DATABASE_URL  the local Prefect server's database  sqlite+aiosqlite:///$HOME/prefect/prefect.db
    SOPFLOW_SOPS_DIR          SOP definitions                        the built-in library (<repo>/sops)
    SOPFLOW_TEMPLATES_DIR     document templates                     the built-in templates (<repo>/templates)
    SOPFLOW_POLL_SECONDS      executor poll interval when busy       0.05
    SOPFLOW_POLL_MAX_SECONDS  executor poll interval when idle       1.0
    SOPFLOW_NOTIFY_CONFIG     apprise URLs per institution and role  $HOME/notify.yaml
    SOPFLOW_LOCKOUT_THRESHOLD consecutive failed sign-ins of an account from one client before it
                              locks (or, from an anonymous client, before that client waits)  5
    SOPFLOW_SIGN_IN_BACKOFF_SECONDS  the first wait, doubling per further failure (at most 1 h)  60
    SOPFLOW_CLIENT_FAILURE_LIMIT  failed sign-ins from one client, any accounts, before it waits  20
    SOPFLOW_TRUSTED_PROXIES   addresses whose X-Forwarded-For/-Proto the web believes  127.0.0.1
    SOPFLOW_WEB_IDLE_MINUTES  a web session ends after this long without a request  15
    SOPFLOW_FUTURE_SKEW_MINUTES  how far ahead of the clock a recorded time may be   5
    SOPFLOW_RESULTS_STORAGE   Prefect's result storage: a folder every worker reaches, or block:TYPE/NAME  $HOME/results
    SOPFLOW_ADMIN_KEY_FILE    the installation administrator's key   $HOME/admin.key
    SOPFLOW_API_RATE          API requests a token may make per minute, per web process  120
    SOPFLOW_AUDIT_KEY_FILE    the private key that signs audit checkpoints (mode 600)   $HOME/audit.key
    SOPFLOW_AUDIT_PUBLIC_KEYS every public key that ever signed checkpoints here    $HOME/audit-keys.pub
    SOPFLOW_CHECKPOINT_EVENTS a signed checkpoint after this many audit events   1000
    SOPFLOW_CHECKPOINT_MINUTES  ... or after this many minutes with new events  60
    SOPFLOW_DB_POOL_SIZE      database connections a process keeps open (per database)   10
    SOPFLOW_DB_MAX_OVERFLOW   connections it may open beyond those at busy moments        30
    SOPFLOW_DB_POOL_TIMEOUT   seconds a request waits for a free connection before failing  30

Stdlib only: the CLI imports this on start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flows.errors import ConfigError

__all__ = ["PACKAGE_LIBRARY", "REPO_ROOT", "DbPool", "Settings", "bundled_dir", "db_pool", "get_settings"]

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_LIBRARY = Path(__file__).resolve().parent / "library"
"""Where an installed wheel keeps the built-in SOP library and document templates (``pyproject.toml``
maps the repository's ``sops/`` and ``templates/`` to ``flows/library/sops`` and ``flows/library/templates``)."""


def bundled_dir(name: str) -> Path:
    """The built-in ``sops`` or ``templates`` folder: the installed package's copy when there is one
    (a wheel), else the checkout's own folder (a clone, an editable install)."""
    packaged = PACKAGE_LIBRARY / name
    return packaged if packaged.is_dir() else REPO_ROOT / name


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    prefect_api_url: str | None
    prefect_port: int
    prefect_database_url: str
    sops_dir: Path
    templates_dir: Path
    poll_seconds: float
    poll_max_seconds: float
    notify_config: Path
    lockout_threshold: int = 5
    """Consecutive failed sign-ins of an account from one client: from a channel that already knows
    the account (its own web session, the command line) they lock it until a QA officer unlocks it;
    from an anonymous client (the sign-in page) that client waits (``flows.services.guard.sign_in``)."""
    sign_in_backoff_seconds: float = 60.0
    """The first wait of a client after too many failed sign-ins; it doubles with each further one."""
    client_failure_limit: int = 20
    """Failed sign-ins from one anonymous client, whatever the accounts, before it waits."""
    trusted_proxies: str = "127.0.0.1"
    """Comma-separated addresses (or ``*``) of the TLS proxies whose ``X-Forwarded-For`` and
    ``X-Forwarded-Proto`` ``sopflow web`` believes (uvicorn's ``forwarded_allow_ips``)."""
    web_idle_minutes: float = 15.0
    """A web session ends after this many minutes without a request (signing always asks the password)."""
    future_skew_minutes: float = 5.0
    """How far ahead of the clock a recorded time may be (clocks differ); a later one is refused."""
    web_url: str | None = None
    """The web app's address as people reach it (``SOPFLOW_WEB_URL``): notifications link to the step there."""
    results_storage: str | None = None
    """Prefect's result storage: None (``$SOPFLOW_HOME/results``), a folder, or ``block:TYPE/NAME``."""
    admin_key_file: Path | None = None
    """The installation administrator's key file (None: ``$SOPFLOW_HOME/admin.key``)."""
    api_rate_per_minute: int = 120
    """Requests one API token may make per minute in one web process; more are refused (429)."""
    audit_key_file: Path | None = None
    """The Ed25519 private key that signs checkpoints of the audit chain (None: ``$SOPFLOW_HOME/audit.key``)."""
    audit_public_keys_file: Path | None = None
    """Every public key that signed checkpoints here, one a line (None: ``$SOPFLOW_HOME/audit-keys.pub``)."""
    checkpoint_events: int = 1000
    """The worker writes a signed checkpoint once this many events follow the newest one."""
    checkpoint_minutes: float = 60.0
    """... or once the newest one is this many minutes old and events follow it."""

    @property
    def embedded_prefect(self) -> bool:
        """True when sopflow runs its own local Prefect server."""
        return self.prefect_api_url is None

    @property
    def api_url(self) -> str:
        return self.prefect_api_url or f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def results_dir(self) -> Path:
        """Where task and flow results are kept when the storage is a folder (the default: under the home)."""
        if self.results_storage and not self.results_storage.startswith("block:"):
            return Path(self.results_storage)
        return self.home / "results"

    @property
    def results_block(self) -> str | None:
        """The Prefect block (``TYPE/NAME``, e.g. ``local-file-system/sopflow-results``) results go to, if any."""
        if self.results_storage and self.results_storage.startswith("block:"):
            return self.results_storage.removeprefix("block:")
        return None

    @property
    def admin_key_path(self) -> Path:
        return self.admin_key_file or self.home / "admin.key"

    @property
    def audit_key_path(self) -> Path:
        return self.audit_key_file or self.home / "audit.key"

    @property
    def audit_public_keys_path(self) -> Path:
        return self.audit_public_keys_file or self.home / "audit-keys.pub"

    @property
    def audit_verified_path(self) -> Path:
        """The newest checkpoint ``audit verify`` found good here: where ``--incremental`` starts."""
        return self.home / "audit-verified.json"

    @property
    def documents_dir(self) -> Path:
        return self.home / "documents"

    @property
    def run_dir(self) -> Path:
        """pid files and logs of the processes sopflow starts."""
        return self.home / "run"


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return float(default)
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None


@dataclass(frozen=True)
class DbPool:
    """How many database connections one process holds (SQLAlchemy's ``QueuePool``): ``size`` kept
    open, up to ``overflow`` more when busy, and a request waits ``timeout`` seconds for one. The
    web app runs its requests in ``size`` threads (flows.web.app), each holding at most one
    connection at a time, so 20 signed-in users refreshing at once never wait for a connection;
    the overflow covers a process's other threads."""

    size: int = 10
    overflow: int = 30
    timeout: float = 30.0


def db_pool() -> DbPool:
    """The connection pool from ``SOPFLOW_DB_POOL_SIZE``, ``SOPFLOW_DB_MAX_OVERFLOW`` and ``SOPFLOW_DB_POOL_TIMEOUT``.

    Raises:
        ConfigError: a value is not a whole number of at least 1 (0 or more for the overflow), or not positive seconds.
    """
    size = _float("SOPFLOW_DB_POOL_SIZE", DbPool.size)
    overflow = _float("SOPFLOW_DB_MAX_OVERFLOW", DbPool.overflow)
    timeout = _float("SOPFLOW_DB_POOL_TIMEOUT", DbPool.timeout)
    if size < 1 or size != int(size):
        raise ConfigError(f"SOPFLOW_DB_POOL_SIZE: expected a whole number of connections, at least 1, got {size!r}")
    if overflow < 0 or overflow != int(overflow):
        raise ConfigError(
            f"SOPFLOW_DB_MAX_OVERFLOW: expected a whole number of connections, 0 or more, got {overflow!r}"
        )
    if timeout <= 0:
        raise ConfigError(f"SOPFLOW_DB_POOL_TIMEOUT: expected seconds, more than 0, got {timeout!r}")
    return DbPool(int(size), int(overflow), timeout)


def get_settings() -> Settings:
    """Read the settings from the environment (cheap; call it where needed)."""
    home = Path(os.environ.get("SOPFLOW_HOME") or Path.home() / ".sopflow").expanduser().resolve()
    port = _float("SOPFLOW_PREFECT_PORT", 4200)
    if not port.is_integer() or not 0 < port < 65536:
        raise ConfigError(f"SOPFLOW_PREFECT_PORT: expected a port number, got {port!r}")
    lockout = _float("SOPFLOW_LOCKOUT_THRESHOLD", 5)
    if not lockout.is_integer() or lockout < 1:
        raise ConfigError(f"SOPFLOW_LOCKOUT_THRESHOLD: expected a whole number of at least 1, got {lockout!r}")
    backoff = _float("SOPFLOW_SIGN_IN_BACKOFF_SECONDS", 60)
    if not 0 < backoff <= 3600:
        raise ConfigError(
            f"SOPFLOW_SIGN_IN_BACKOFF_SECONDS: expected seconds, more than 0 and at most 3600, got {backoff!r}"
        )
    client_limit = _float("SOPFLOW_CLIENT_FAILURE_LIMIT", 20)
    if not client_limit.is_integer() or client_limit < 1:
        raise ConfigError(f"SOPFLOW_CLIENT_FAILURE_LIMIT: expected a whole number of at least 1, got {client_limit!r}")
    idle = _float("SOPFLOW_WEB_IDLE_MINUTES", 15)
    skew = _float("SOPFLOW_FUTURE_SKEW_MINUTES", 5)
    if skew < 0:
        raise ConfigError(f"SOPFLOW_FUTURE_SKEW_MINUTES: expected minutes, 0 or more, got {skew!r}")
    if idle <= 0:
        raise ConfigError(f"SOPFLOW_WEB_IDLE_MINUTES: expected a positive number of minutes, got {idle!r}")
    results = os.environ.get("SOPFLOW_RESULTS_STORAGE") or None
    if results and results.startswith("block:") and "/" not in results.removeprefix("block:").strip("/"):
        raise ConfigError(
            f"SOPFLOW_RESULTS_STORAGE: expected a folder or block:TYPE/NAME "
            f"(e.g. block:local-file-system/sopflow-results), got {results!r}"
        )
    rate = _float("SOPFLOW_API_RATE", 120)
    if not rate.is_integer() or rate < 1:
        raise ConfigError(f"SOPFLOW_API_RATE: expected a whole number of requests per minute, got {rate!r}")
    key_file = os.environ.get("SOPFLOW_ADMIN_KEY_FILE")
    audit_key = os.environ.get("SOPFLOW_AUDIT_KEY_FILE")
    audit_pub = os.environ.get("SOPFLOW_AUDIT_PUBLIC_KEYS")
    cp_events = _float("SOPFLOW_CHECKPOINT_EVENTS", 1000)
    if not cp_events.is_integer() or cp_events < 1:
        raise ConfigError(f"SOPFLOW_CHECKPOINT_EVENTS: expected a whole number of events, 1 or more, got {cp_events!r}")
    cp_minutes = _float("SOPFLOW_CHECKPOINT_MINUTES", 60)
    if cp_minutes <= 0:
        raise ConfigError(f"SOPFLOW_CHECKPOINT_MINUTES: expected a positive number of minutes, got {cp_minutes!r}")
    return Settings(
        home=home,
        database_url=os.environ.get("SOPFLOW_DATABASE_URL") or f"sqlite:///{home / 'sopflow.db'}",
        prefect_api_url=os.environ.get("SOPFLOW_PREFECT_API_URL") or None,
        prefect_port=int(port),
        prefect_database_url=os.environ.get("SOPFLOW_PREFECT_DATABASE_URL")
        or f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}",
        sops_dir=Path(os.environ.get("SOPFLOW_SOPS_DIR") or bundled_dir("sops")),
        templates_dir=Path(os.environ.get("SOPFLOW_TEMPLATES_DIR") or bundled_dir("templates")),
        poll_seconds=_float("SOPFLOW_POLL_SECONDS", 0.05),
        poll_max_seconds=_float("SOPFLOW_POLL_MAX_SECONDS", 1.0),
        notify_config=Path(os.environ.get("SOPFLOW_NOTIFY_CONFIG") or home / "notify.yaml"),
        lockout_threshold=int(lockout),
        sign_in_backoff_seconds=backoff,
        client_failure_limit=int(client_limit),
        trusted_proxies=(os.environ.get("SOPFLOW_TRUSTED_PROXIES") or "127.0.0.1").strip(),
        web_idle_minutes=idle,
        future_skew_minutes=skew,
        web_url=_web_url(),
        results_storage=results,
        admin_key_file=Path(key_file).expanduser() if key_file else None,
        api_rate_per_minute=int(rate),
        audit_key_file=Path(audit_key).expanduser() if audit_key else None,
        audit_public_keys_file=Path(audit_pub).expanduser() if audit_pub else None,
        checkpoint_events=int(cp_events),
        checkpoint_minutes=cp_minutes,
    )


def _web_url() -> str | None:
    value = (os.environ.get("SOPFLOW_WEB_URL") or "").strip()
    if value and not value.startswith(("http://", "https://")):
        raise ConfigError(f"SOPFLOW_WEB_URL: expected an http:// or https:// address, got {value!r}")
    return value.rstrip("/") or None
