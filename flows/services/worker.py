"""The service floor: the worker process. It runs ``run-sop`` flow runs in sopflow's warm
executor (``flows.engine.executor``) together with every floor's periodic jobs: the engine's own
(recover orphans, repair lost resumes, escalations, deadlines) and this floor's change-control
sweep (``flows.services.sweeps``), which the engine never imports.

``python -m flows.services.worker`` (``sopflow server start`` starts it).
"""

from __future__ import annotations

import logging
import signal

from flows.config import Settings
from flows.engine.env import apply_prefect_env
from flows.services.server import ready_file
from flows.services.sweeps import sweep

__all__ = ["change_control_sweep", "main"]

log = logging.getLogger("sopflow.worker")


def change_control_sweep(settings: Settings) -> int:
    """Issue versions whose change control completed, make due ones Effective, send reminders."""
    return sum(sweep(settings).values())


class _SuspendedIsNotAnError(logging.Filter):
    """Prefect logs every suspension at a human step as ERROR ("Finished in state Suspended"):
    that is how every gate waits, so it is logged here at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and "Finished in state Suspended" in record.getMessage():
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("prefect.flow_runs").addFilter(_SuspendedIsNotAnError())
    settings = apply_prefect_env()
    # Prefect reads its settings when it is imported: the executor (which imports it) comes after them.
    from flows.engine.executor import Executor

    ex = Executor(settings=settings, jobs=[("change_control", change_control_sweep)])

    def _stop(*_: object) -> None:
        ex.stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    ex.serve(ready_file(settings))


if __name__ == "__main__":
    main()
