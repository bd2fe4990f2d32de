"""Stage 2: how a process on this machine tells the local executor to poll now.

The executor listens on a UDP port written to ``run/executor.nudge``; ``start`` and ``submit``
(through ``flows.engine.client``) send one datagram after they schedule or resume a run, so the
executor reaches it as fast as a fast poll. Best effort: a missing or dead executor is fine, an
executor elsewhere finds the run by polling. Stdlib only.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from flows.config import Settings

__all__ = ["nudge", "nudge_file"]


def nudge_file(settings: Settings) -> Path:
    """Where the local executor writes the UDP port it listens on for nudges."""
    return settings.run_dir / "executor.nudge"


def nudge(settings: Settings) -> None:
    """Tell a local executor to poll now (best effort)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        port = int(nudge_file(settings).read_text().split()[0])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"poll", ("127.0.0.1", port))
