"""Configuration: where sopflow keeps its data and which servers it talks to.

Everything comes from environment variables (prefix ``SOPFLOW_``) with an embedded default:
one data directory (``SOPFLOW_HOME``, default ``~/.sopflow``) holding the SQLite database,
the local Prefect server's database, persisted task results, rendered documents and logs.

    SOPFLOW_HOME              data directory                         ~/.sopflow
    SOPFLOW_DATABASE_URL      sopflow's records (SQLAlchemy URL)     sqlite:///$HOME/sopflow.db
    SOPFLOW_PREFECT_API_URL   an external Prefect server's API URL   (unset: local server)
    SOPFLOW_PREFECT_PORT      port of the local Prefect server       4200
    SOPFLOW_PREFECT_DATABASE_URL  the local Prefect server's database  sqlite+aiosqlite:///$HOME/prefect/prefect.db
    SOPFLOW_SOPS_DIR          SOP definitions                        <repo>/sops
    SOPFLOW_TEMPLATES_DIR     document templates                     <repo>/templates
    SOPFLOW_POLL_SECONDS      executor poll interval when busy       0.05
    SOPFLOW_POLL_MAX_SECONDS  executor poll interval when idle       1.0
    SOPFLOW_NOTIFY_CONFIG     apprise URLs per institution and role  $HOME/notify.yaml
    SOPFLOW_LOCKOUT_THRESHOLD consecutive failed sign-ins that lock an account  5
    SOPFLOW_WEB_IDLE_MINUTES  a web session ends after this long without a request  15
    SOPFLOW_FUTURE_SKEW_MINUTES  how far ahead of the clock a recorded time may be   5

Stdlib only: the CLI imports this on start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flows.errors import ConfigError

__all__ = ["REPO_ROOT", "Settings", "get_settings"]

REPO_ROOT = Path(__file__).resolve().parent.parent


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
    """Consecutive failed sign-ins that lock an account until a QA officer unlocks it."""
    web_idle_minutes: float = 15.0
    future_skew_minutes: float = 5.0
    """How far ahead of the clock a recorded time may be (clocks differ); a later one is refused."""
    """A web session ends after this many minutes without a request (signing always asks the password)."""

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
        return self.home / "results"

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


def get_settings() -> Settings:
    """Read the settings from the environment (cheap; call it where needed)."""
    home = Path(os.environ.get("SOPFLOW_HOME") or Path.home() / ".sopflow").expanduser().resolve()
    port = _float("SOPFLOW_PREFECT_PORT", 4200)
    if not port.is_integer() or not 0 < port < 65536:
        raise ConfigError(f"SOPFLOW_PREFECT_PORT: expected a port number, got {port!r}")
    lockout = _float("SOPFLOW_LOCKOUT_THRESHOLD", 5)
    if not lockout.is_integer() or lockout < 1:
        raise ConfigError(f"SOPFLOW_LOCKOUT_THRESHOLD: expected a whole number of at least 1, got {lockout!r}")
    idle = _float("SOPFLOW_WEB_IDLE_MINUTES", 15)
    skew = _float("SOPFLOW_FUTURE_SKEW_MINUTES", 5)
    if skew < 0:
        raise ConfigError(f"SOPFLOW_FUTURE_SKEW_MINUTES: expected minutes, 0 or more, got {skew!r}")
    if idle <= 0:
        raise ConfigError(f"SOPFLOW_WEB_IDLE_MINUTES: expected a positive number of minutes, got {idle!r}")
    return Settings(
        home=home,
        database_url=os.environ.get("SOPFLOW_DATABASE_URL") or f"sqlite:///{home / 'sopflow.db'}",
        prefect_api_url=os.environ.get("SOPFLOW_PREFECT_API_URL") or None,
        prefect_port=int(port),
        prefect_database_url=os.environ.get("SOPFLOW_PREFECT_DATABASE_URL")
        or f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}",
        sops_dir=Path(os.environ.get("SOPFLOW_SOPS_DIR") or REPO_ROOT / "sops"),
        templates_dir=Path(os.environ.get("SOPFLOW_TEMPLATES_DIR") or REPO_ROOT / "templates"),
        poll_seconds=_float("SOPFLOW_POLL_SECONDS", 0.05),
        poll_max_seconds=_float("SOPFLOW_POLL_MAX_SECONDS", 1.0),
        notify_config=Path(os.environ.get("SOPFLOW_NOTIFY_CONFIG") or home / "notify.yaml"),
        lockout_threshold=int(lockout),
        web_idle_minutes=idle,
        future_skew_minutes=skew,
    )
