"""The dose receipt of sops/demo_hospital/dose_receipt.yaml, run through two peers of sopflow, with
the same work at every step (bench/engine.py, part 3, interleaves them with sopflow's own run).

Every engine does, per step of the receipt:

    arrival, identity_verification, qa_acceptance   a signer authenticates (argon2, sopflow's own
                                                    hash) and the engine records the signed data
    transit_temperature, identity_matches           the SOP's check expression (sopflow's sandbox)
    receipt_record                                  the same template rendered to HTML and PDF
                                                    (WeasyPrint), from the same record content
    tell_ward                                       one apprise message to a local json:// receiver

and keeps its state durable in its own way:

- SpiffWorkflow 3 (core specs, human steps ``manual``): the whole workflow serialized to JSON and
  saved in a SQLite row after every step, as an application embedding it would.
- DBOS Transact 3 on SQLite: a ``@DBOS.workflow`` whose steps are ``@DBOS.step`` and whose human
  steps wait in ``DBOS.recv`` for the signed data the driver sends (``DBOS.send``); default settings.

Human time is excluded by construction: the driver signs each step as soon as it waits.
Install the peers with ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HUMAN = {
    "arrival": {
        "arrived_at": "2026-11-25T01:40:00+00:00",
        "courier": "SF 1234",
        "shipper_id": "DS-0042",
        "seal_intact": True,
        "logger_max_c": -171.5,
        "transit_hours": 18.5,
    },
    "identity_verification": {"coi_matches": True, "documents": "complete"},
    "qa_acceptance": {"decision": "approve", "reason": None},
}
CHECKS = {
    "transit_temperature": "arrival.logger_max_c <= product.storage_max_c and arrival.seal_intact",
    "identity_matches": "identity_verification.coi_matches and identity_verification.documents == 'complete'",
}
STEPS = [
    ("arrival", "human"),
    ("transit_temperature", "check"),
    ("identity_verification", "human"),
    ("identity_matches", "check"),
    ("qa_acceptance", "human"),
    ("receipt_record", "document"),
    ("tell_ward", "notify"),
]


@dataclass
class Work:
    """What each step does, the same for every engine (see the module docstring)."""

    password_hash: str
    password: str
    product: dict[str, Any]
    render: Callable[[], tuple[str, bytes]]
    """Renders the receipt (HTML, PDF) from the same record content sopflow's run rendered."""
    notify_url: str

    def sign(self, step: str) -> dict[str, Any]:
        from flows.record.users import verify_password

        if not verify_password(self.password_hash, self.password):
            raise RuntimeError("the bench signer's password did not verify")
        data = HUMAN[step]
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        return {**data, "signed_sha256": digest}

    def check(self, step: str, done: dict[str, Any]) -> bool:
        from flows.sop.expressions import evaluate_check

        return bool(evaluate_check(CHECKS[step], {"product": self.product, **done}))

    def document(self) -> dict[str, Any]:
        html, pdf = self.render()
        return {"sha256": hashlib.sha256(html.encode()).hexdigest(), "pdf_sha256": hashlib.sha256(pdf).hexdigest()}

    def notify(self, tag: str) -> bool:
        from flows.outputs.notify import deliver

        return deliver(self.notify_url, "[dose_receipt] Tell the ward", f"Dose {tag} accepted and in stock")


# -- SpiffWorkflow -------------------------------------------------------------------------------
def spiff_receipt(work: Work, store: Path, tag: str) -> float:
    """One receipt through SpiffWorkflow, saved to SQLite after every step; returns seconds."""
    from SpiffWorkflow.serializer.json import JSONSerializer
    from SpiffWorkflow.specs.Simple import Simple
    from SpiffWorkflow.specs.WorkflowSpec import WorkflowSpec
    from SpiffWorkflow.util.task import TaskState
    from SpiffWorkflow.workflow import Workflow

    t0 = time.perf_counter()
    spec = WorkflowSpec(name="dose_receipt", addstart=True)
    prev = spec.start
    for name, kind in STEPS:
        task = Simple(spec, name)
        task.manual = kind == "human"
        prev.connect(task)
        prev = task
    db = sqlite3.connect(store)
    db.execute("CREATE TABLE IF NOT EXISTS workflow (id TEXT PRIMARY KEY, state TEXT)")
    ser = JSONSerializer()
    wf = Workflow(spec)
    done: dict[str, Any] = {}

    def save() -> None:
        db.execute(
            "INSERT OR REPLACE INTO workflow VALUES (?, ?)", (tag, ser.serialize_workflow(wf, include_spec=True))
        )
        db.commit()

    save()
    while not wf.is_completed():
        ready = wf.get_tasks(state=TaskState.READY)
        if not ready:
            break
        task = ready[0]
        name = task.task_spec.name
        kind = dict(STEPS).get(name)
        if kind == "human":
            done[name] = work.sign(name)
        elif kind == "check" and not work.check(name, done):
            raise RuntimeError(f"spiff: {name} failed")
        elif kind == "document":
            done[name] = work.document()
        elif kind == "notify":
            work.notify(tag)
        task.set_data(**{name: done.get(name)})
        task.run()
        save()
        wf = ser.deserialize_workflow(db.execute("SELECT state FROM workflow WHERE id = ?", (tag,)).fetchone()[0])
    db.close()
    return time.perf_counter() - t0


# -- DBOS --------------------------------------------------------------------------------------------
class DbosReceipt:
    """DBOS Transact on SQLite, launched once; ``run`` drives one receipt and returns seconds."""

    def __init__(self, work: Work, folder: Path) -> None:
        from dbos import DBOS, DBOSConfig

        self.work = work
        config: DBOSConfig = {"name": "sopflow-bench", "system_database_url": f"sqlite:///{folder / 'dbos.db'}"}
        DBOS(config=config)

        @DBOS.step()
        def check(step: str, done: dict[str, Any]) -> bool:
            return work.check(step, done)

        @DBOS.step()
        def document() -> dict[str, Any]:
            return work.document()

        @DBOS.step()
        def notify(tag: str) -> bool:
            return work.notify(tag)

        @DBOS.workflow()
        def receipt(tag: str) -> dict[str, Any]:
            done: dict[str, Any] = {}
            for name, kind in STEPS:
                if kind == "human":
                    DBOS.set_event("waiting", name)
                    done[name] = DBOS.recv(name, timeout_seconds=120)
                elif kind == "check" and not check(name, done):
                    raise RuntimeError(f"dbos: {name} failed")
                elif kind == "document":
                    done[name] = document()
                elif kind == "notify":
                    notify(tag)
            return done

        self.dbos, self.receipt = DBOS, receipt
        DBOS.launch()

    def run(self, tag: str) -> float:
        dbos = self.dbos
        t0 = time.perf_counter()
        handle = dbos.start_workflow(self.receipt, tag)
        wf = handle.get_workflow_id()
        for name, kind in STEPS:
            if kind != "human":
                continue
            while dbos.get_event(wf, "waiting", timeout_seconds=60) != name:
                time.sleep(0.005)
            dbos.send(wf, self.work.sign(name), name)
        handle.get_result()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.dbos.destroy()
