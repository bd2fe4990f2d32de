"""Stage 2: the environment every Prefect client and server that sopflow starts runs with.

Prefect reads its settings from the environment when it is imported, so ``prefect_env`` must be
applied before the first ``import prefect`` in a process (``apply_prefect_env`` does that for the
current process; ``flows.services.server`` passes it to the processes it starts). Stdlib only.
"""

from __future__ import annotations

import os

from flows.config import Settings, get_settings

__all__ = ["apply_prefect_env", "prefect_env"]


def prefect_env(settings: Settings) -> dict[str, str]:
    """Prefect settings for sopflow: our server, our result storage, nothing sent outside."""
    env = {
        "PREFECT_API_URL": settings.api_url,
        "PREFECT_HOME": str(settings.prefect_home),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(settings.results_dir),
        # Several workers on several hosts: results where every one of them reaches them, a shared
        # folder (SOPFLOW_RESULTS_STORAGE=/mnt/…) or a storage block (block:TYPE/NAME).
        **({"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": settings.results_block} if settings.results_block else {}),
        # Telemetry and analytics off: nothing leaves the hospital's machines.
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
    }
    if settings.embedded_prefect:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = settings.prefect_database_url
        env["PREFECT_SERVER_API_HOST"] = "127.0.0.1"
        env["PREFECT_SERVER_API_PORT"] = str(settings.prefect_port)
    return env


def apply_prefect_env(settings: Settings | None = None) -> Settings:
    """Set the Prefect environment in this process (before Prefect is imported)."""
    settings = settings or get_settings()
    for key, value in prefect_env(settings).items():
        if key in ("PREFECT_LOGGING_LEVEL",):
            os.environ.setdefault(key, value)
        else:
            os.environ[key] = value
    if settings.results_block is None:
        settings.results_dir.mkdir(parents=True, exist_ok=True)
    return settings
