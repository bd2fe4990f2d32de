"""A run as operators see it in Prefect's UI: its name, tags and document artifacts, as PNGs.

    python bench/ui_screenshot.py [--out docs]

Plays ``sopflow demo --keep`` in a temporary home (its own Prefect server and worker), then opens
the page of the accepted receipt's flow run in headless Chromium (Debian's ``/usr/bin/chromium``,
through Playwright) and saves ``prefect-ui-run.png`` (the run: name, tags, parameters) and
``prefect-ui-artifacts.png`` (its artifacts tab: the receipt's HTML and PDF) under ``--out``.
Everything is stopped and removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sopflow-ui-"))
    port = _free_port()
    env = {**os.environ, "SOPFLOW_HOME": str(tmp), "SOPFLOW_PREFECT_PORT": str(port)}
    for key in ("SOPFLOW_DATABASE_URL", "SOPFLOW_PREFECT_API_URL", "SOPFLOW_NOTIFY_CONFIG", "PREFECT_API_URL"):
        env.pop(key, None)
    sopflow = [sys.executable, "-m", "flows"]
    try:
        subprocess.run([*sopflow, "demo", "--keep"], env=env, check=True, cwd=REPO, timeout=1200)  # noqa: S603
        from sqlalchemy import create_engine, text

        engine = create_engine(f"sqlite:///{tmp / 'sopflow.db'}")
        with engine.connect() as conn:
            flow_run_id, name = conn.execute(
                text(
                    "SELECT r.flow_run_id, r.sop_id FROM sf_run r JOIN sf_document d ON d.run_id = r.id "
                    "WHERE r.sop_id = 'dose_receipt' ORDER BY r.started_at LIMIT 1"
                )
            ).one()
        engine.dispose()
        from playwright.sync_api import sync_playwright

        args.out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/runs/flow-run/{flow_run_id}", wait_until="networkidle")
            page.get_by_text(f"{name}-", exact=False).first.wait_for(timeout=60_000)
            time.sleep(1.5)  # let the timeline and tags finish drawing (a picture, not a test)
            page.screenshot(path=str(args.out / "prefect-ui-run.png"), full_page=True)
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("dose-receipt-receipt-record", exact=False).first.wait_for(timeout=60_000)
            time.sleep(1.0)
            page.screenshot(path=str(args.out / "prefect-ui-artifacts.png"), full_page=True)
            browser.close()
        print(f"saved {args.out / 'prefect-ui-run.png'} and {args.out / 'prefect-ui-artifacts.png'}")
    finally:
        subprocess.run([*sopflow, "server", "stop"], env=env, cwd=REPO, timeout=120, check=False)  # noqa: S603
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
