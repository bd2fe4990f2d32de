"""The SOP library end to end: every SOP of both example institutions through its happy path and
one failure path, through the real Prefect server and executor, with the deviation each failure
must open; then the documents they rendered (HTML + PDF, Chinese text extracted from the PDF,
same record -> same bytes) and the refusal of a product whose limits are unconfirmed.

All runs start at once and are signed round-robin (the executor runs flows in threads), so the
whole library costs about as much wall time as its longest SOP.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from sqlmodel import select

from flows.config import Settings
from flows.errors import SopInputError
from flows.record.db import read_session, write_session
from flows.record.state import FINAL_STATUSES, run_status, step_states
from flows.record.tables import SopRun, User, utcnow
from flows.record.training import record_training
from flows.services import runs as runs_service
from flows.services import signing as signing_service
from flows.sop import Catalog
from tests.fixtures_engine import PASSWORD
from tests.stored import stored, stored_text
from tests.waiting import LIMIT

HOLD = re.compile(r"^deviation_[0-9a-f]{12}__disposition$")  # flows.record.deviations.hold_step_id

STALL = LIMIT
"""Seconds without any scenario moving (a signature landing, a run ending) before the set-up fails."""
# The module's set-up plays 28 runs: minutes on a busy machine; the hang guard is the stall check.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(8 * LIMIT))]

REPO = Path(__file__).resolve().parent.parent
A, B = "demo_hospital", "shenjiang_hospital"

# username: (printed name, institution, role). Separate from the engine fixture's demo staff.
STAFF = {
    "a.coord": ("Sun Li", A, "coordinator"),
    "a.doc": ("Zhao Lei", A, "physician"),
    "a.doc2": ("Qian Hao", A, "physician"),
    "a.apher": ("Zhou Yan", A, "apheresis_nurse"),
    "a.nurse": ("Wu Jing", A, "nurse"),
    "a.tech": ("Li Wei", A, "cell_lab"),
    "a.lead": ("Zheng Bo", A, "cell_lab_lead"),
    "a.pharm": ("Zhang Min", A, "pharmacist"),
    "a.qa": ("Wang Fang", A, "qa"),
    "a.qm": ("Chen Jie", A, "quality_manager"),
    "b.coord": ("孙丽", B, "coordinator"),
    "b.doc": ("赵磊", B, "physician"),
    "b.doc2": ("钱浩", B, "physician"),
    "b.tnurse": ("周燕", B, "transfusion_nurse"),
    "b.nurse": ("吴静", B, "ward_nurse"),
    "b.nurse2": ("冯雪", B, "ward_nurse"),
    "b.lab": ("郑波", B, "cell_lab"),
    "b.ptech": ("陈晨", B, "pharmacy_tech"),
    "b.pharm": ("张敏", B, "pharmacist"),
    "b.pharm2": ("刘洋", B, "pharmacist"),
    "b.dir": ("王芳", B, "pharmacy_director"),
    "b.qa": ("何静", B, "qa"),
    "b.med": ("林峰", B, "medical_affairs"),
}

# The test institution "confirms" Relma-cel's values, as the catalogue asks an institution to do
# before use (the repository's catalogue keeps them unconfirmed).
RELMA_CONFIRMED = {
    "storage_max_c": -150,
    "thaw_to_infusion_max_min": 180,
    "documents": ["CoA", "RFI"],
    "tocilizumab_doses_min": 2,
    "unconfirmed": [],
}

# Entered times lay out a scenario day: "00:00" is the day's start, a minute after every run has
# started (a recorded time may not be before its run's start), and the day runs ahead of the clock,
# which the library's settings allow (SOPFLOW_FUTURE_SKEW_MINUTES of a day). Deadlines compare the
# entered times with each other; none can come due by the clock while the scenarios play.
ZONE = ZoneInfo("Asia/Shanghai")
DAY = timedelta(hours=24)


class _Clock:
    """``T.format("09:40")``: the day's start + 9 h 40 min, ISO 8601 with the +08:00 offset."""

    def __init__(self) -> None:
        self.base = datetime.now(UTC).replace(second=0, microsecond=0)

    def start_day(self, at: datetime) -> None:
        self.base = at.replace(second=0, microsecond=0) + timedelta(minutes=1)

    def at(self, hhmm: str) -> datetime:
        h, m = (int(x) for x in hhmm.split(":"))
        return self.base + timedelta(minutes=h * 60 + m)

    def format(self, hhmm: str) -> str:
        return self.at(hhmm).astimezone(ZONE).isoformat()

    def shown(self, hhmm: str) -> str:
        """As a document shows it."""
        return self.at(hhmm).astimezone(ZONE).strftime("%Y-%m-%d %H:%M:%S %Z (UTC%z)")


T = _Clock()


def _din() -> str:
    from flows.sop.identifiers import din_check_character

    return f"W1234 26 123456 {din_check_character('W123426123456')}"


@dataclass
class Scenario:
    name: str
    institution: str
    sop: str
    params: dict[str, str]
    steps: list[tuple[str, str, dict[str, Any]]]
    status: str
    deviations: list[tuple[str, str]] = field(default_factory=list)
    starter: str = ""
    parent: str = ""
    """A deviation_capa sub-run: the name of the scenario whose failed check starts it."""
    run_id: str = ""
    done: int = 0

    def __post_init__(self) -> None:
        self.starter = self.starter or ("a.coord" if self.institution == A else "b.coord")


def _dispose(check: str, user: str, decision: str) -> tuple[str, str, dict[str, Any]]:
    values = {"decision": decision}
    if decision == "reject":
        values["reason"] = "not acceptable"
    return (f"{check}__disposition", user, values)


def _patient(inst: str, n: int, product: str | None = None) -> dict[str, str]:
    return {
        "product": product or ("tecartus" if inst == A else "relma_cel"),
        "coi": f"COI-LIB-{inst[0].upper()}{n:03d}",
        "patient_id": f"H{inst[0].upper()}{n:04d}",
    }


# ---- WF1 apheresis collection
def _apheresis(
    inst: str, n: int, *, volume: str = "120", label_ok: str = "yes"
) -> list[tuple[str, str, dict[str, Any]]]:
    p = "a" if inst == A else "b"
    collector = "a.apher" if inst == A else "b.tnurse"
    checker = "a.nurse" if inst == A else "b.nurse"
    packer = "a.tech" if inst == A else "b.lab"
    return [
        (
            "order",
            f"{p}.coord",
            {"consent_on_file": "yes", "mah_enrolment_ref": f"ENR-{n}", "planned_collection": T.format("08:00")},
        ),
        ("order_approval", f"{p}.doc", {"decision": "approve"}),
        ("pre_collection", collector, {"infection_screen": "yes", "counts_acceptable": "yes", "weight_kg": "62"}),
        (
            "collection",
            collector,
            {
                "started_at": T.format("08:30"),
                "ended_at": T.format("12:10"),
                "volume_ml": volume,
                "bag_din": _din(),
                "adverse_events": "mild hypocalcaemia <b>treated</b>",
            },
        ),
        ("label_check", checker, {"label_matches_order": label_ok, "label_matches_wristband": "yes"}),
        (
            "packaging",
            packer,
            {
                "shipper_id": "SH-77",
                "seal_no": "SEAL-1",
                "logger_id": "LG-9",
                "secondary_container_sealed": "yes",
                "courier": "World Courier AWB 555",
                "handed_over_at": T.format("13:00"),
            },
        ),
        ("release_to_courier", "a.lead" if inst == A else "b.doc2", {"decision": "approve"}),
    ]


# ---- WF2 dose receipt
def _receipt(inst: str, *, logger: str = "-171.5", coi_matches: str = "yes") -> list[tuple[str, str, dict[str, Any]]]:
    arrival = {
        "arrived_at": T.format("09:40"),
        "courier": "SF 1234",
        "shipper_id": "DS-0042",
        "seal_intact": "yes",
        "logger_max_c": logger,
        "transit_hours": "18.5",
    }
    verify = {"coi_matches": coi_matches, "documents": "complete"}
    if inst == A:
        return [
            ("arrival", "a.tech", arrival),
            ("identity_verification", "a.pharm", verify),
            ("qa_acceptance", "a.qa", {"decision": "approve"}),
        ]
    return [
        ("arrival", "b.ptech", arrival),
        ("identity_verification", "b.pharm", {**verify, "not_expired": "yes"}),
        ("storage_transfer", "b.ptech", {"tank_position": "T2/R3/P5", "out_of_vapour_min": "2"}),
        ("acceptance", "b.dir", {"decision": "approve"}),
    ]


# ---- WF3 storage
def _daily(inst: str, *, temperature: str = "-185", level: str = "80") -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (
            "daily_check",
            "a.tech" if inst == A else "b.ptech",
            {
                "checked_at": T.format("07:30"),
                "temperature_c": temperature,
                "ln2_level_pct": level,
                "alarm_test_ok": "yes",
                "backup_tank_ready": "yes",
            },
        )
    ]


def _alarm(inst: str, *, max_temp: str = "-172") -> list[tuple[str, str, dict[str, Any]]]:
    who = "a.tech" if inst == A else "b.ptech"
    return [
        (
            "acknowledge",
            who,
            {"alarm_at": T.format("02:10"), "acknowledged_at": T.format("02:16"), "cause": "lid not closed"},
        ),
        ("transfer", who, {"max_temperature_c": max_temp, "doses_moved": "0", "restored_at": T.format("02:30")}),
    ]


# ---- WF4 readiness
def _readiness(inst: str, *, released: str = "yes", toci: str = "2") -> list[tuple[str, str, dict[str, Any]]]:
    p = "a" if inst == A else "b"
    steps = [
        ("dose_status", "a.tech" if inst == A else "b.pharm", {"released": released, "tank_position": "T1/R2/P3"}),
        ("ld_start", f"{p}.doc", {"decision": "approve"}),
        (
            "ld_record",
            "a.nurse" if inst == A else "b.nurse",
            {"ld_regimen": "flu_cy", "ld_end": T.format("10:00"), "infusion_day": "2", "weight_kg": "62"},
        ),
        (
            "tocilizumab",
            "a.pharm" if inst == A else "b.pharm",
            {"doses_on_site": toci, "tocilizumab_lot": "TOC-881", "premedication_ordered": "yes"},
        ),
        ("go_no_go", f"{p}.doc2", {"decision": "approve"}),
    ]
    if inst == B:
        steps.append(("dispense", "b.pharm2", {"dispensed_at": T.format("08:00"), "ward": "血液科 12 病区"}))
    return steps


# ---- WF5 infusion
def _infusion(
    inst: str, coi: str, *, bag_coi: str | None = None, late: bool = False
) -> list[tuple[str, str, dict[str, Any]]]:
    nurse = "a.nurse" if inst == A else "b.nurse"
    return [
        (
            "retrieval",
            "a.tech" if inst == A else "b.pharm",
            {"out_of_tank_at": T.format("09:00"), "shipper_id": "DS-7", "handed_over_at": T.format("09:20")},
        ),
        ("handover", nurse, {"shipper_closed": "yes"}),
        (
            "bedside_id",
            nurse,
            {
                "patient_states_identity": "yes",
                "wristband_matches": "yes",
                "bag_coi": bag_coi or coi,
                "rfi_matches": "yes",
            },
        ),
        ("bedside_id_verify", "a.doc" if inst == A else "b.nurse2", {"identity_confirmed": "yes"}),
        (
            "thaw",
            "a.tech" if inst == A else "b.nurse",
            {
                "device": "dry_thawer",
                "thaw_start": T.format("09:40"),
                "thaw_end": T.format("09:44"),
                "bag_intact": "yes",
            },
        ),
        (
            "infusion_given",
            nurse,
            {
                "infusion_start": T.format("09:50"),
                "infusion_end": T.format("13:00" if late else "10:05"),
                "volume_ml": "68",
                "rate_ml_min": "10",
                "leukodepleting_filter": "no",
                "vitals_stable": "yes",
            },
        ),
        ("infusion_sign_off", "a.doc" if inst == A else "b.doc", {"decision": "approve"}),
    ]


# ---- WF6 deviation and CAPA: the sub-run a failed check starts
def _capa(inst: str, *, disposition: str = "approve", effective: str = "yes") -> list[tuple[str, str, dict[str, Any]]]:
    qa = "a.qa" if inst == A else "b.qa"
    closer = "a.qm" if inst == A else "b.med"
    steps = [
        ("containment", qa, {"found_at": T.format("11:00"), "action": "quarantined", "location": "QT-1"}),
        (
            "mah_notice",
            qa,
            {"notified_at": T.format("12:00"), "contact": "MAH QA desk", "mah_reference": "MAH-2026-17"},
        ),
        ("investigation", qa, {"root_cause": "courier resealed after customs", "impact": "none: logger in range"}),
        (
            "physician_opinion",
            "a.doc" if inst == A else "b.doc",
            {
                "outcome": "use_with_risk_acceptance" if disposition == "approve" else "destroy",
                "rationale": "see record",
            },
        ),
        (
            "disposition",
            qa,
            {"decision": disposition} if disposition == "approve" else {"decision": "reject", "reason": "destroy"},
        ),
        ("capa", qa, {"action": "procedure agreed with courier", "owner": closer, "due": T.format("23:00")}),
        (
            "effectiveness",
            qa,
            {"checked_at": T.format("16:00"), "effective": effective, "evidence": "3 shipments checked"},
        ),
    ]
    if effective == "yes":
        return [*steps, ("closure", closer, {"decision": "approve"})]
    return [*steps, _dispose("capa_effective", closer, "reject")]


# ---- WF7 toxicity monitoring
def _toxicity(inst: str, *, severe: bool = False) -> list[tuple[str, str, dict[str, Any]]]:
    doc = "a.doc" if inst == A else "b.doc"
    assessment = {
        "assessed_at": T.format("14:00"),
        "temperature_c": "38.6" if severe else "37.2",
        "fever_masked": "no",
        "hypotension": "yes" if severe else "no",
        "vasopressors": "1" if severe else "0",  # one vasopressor: CRS grade 3
        "vasopressin": "no",
        "oxygen_device": "nasal_cannula" if severe else "none",
        "oxygen_flow_l_min": "8" if severe else "0",
        "ice_score": "8" if severe else "10",
        "consciousness": "alert",
        "seizure": "none",
        "deep_focal_motor_weakness": "no",
        "cerebral_oedema_on_imaging": "not_imaged",
        "posturing": "no",
        "cranial_nerve_vi_palsy": "no",
        "papilloedema": "no",
        "cushings_triad": "no",
        "monitoring_complete": "yes",
    }
    steps = [("assessment#1", "a.nurse" if inst == A else "b.nurse", assessment)]
    steps.append(("review", doc, {"agreement": "agree", "tocilizumab_mg": "496" if severe else "0"}))
    if severe:  # the confirmed grade 3 opens the deviation and requires the AE report
        steps.append(_dispose("severe_toxicity", doc, "approve"))
        steps.append(
            (
                "ae_report",
                doc,
                {
                    "ae_term": "cytokine release syndrome",
                    "onset": T.format("13:30"),
                    "reported_to": "pharmacovigilance; MAH",
                    "report_ref": "AE-2026-031",
                },
            )
        )
    return [*steps, ("sign_off", doc, {"decision": "approve"})]


def scenarios() -> list[Scenario]:
    out: list[Scenario] = []
    for inst in (A, B):
        p = "a" if inst == A else "b"
        qa = "a.qa" if inst == A else "b.qa"
        doc = f"{p}.doc"
        # WF1
        out.append(
            Scenario(
                f"{inst}/apheresis ok",
                inst,
                "apheresis_collection",
                _patient(inst, 1),
                _apheresis(inst, 1),
                "completed",
            )
        )
        if inst == A:
            out.append(
                Scenario(
                    f"{inst}/apheresis mislabelled",
                    inst,
                    "apheresis_collection",
                    _patient(inst, 2),
                    _apheresis(inst, 2, label_ok="no")[:5],
                    "stopped",
                    [("label_ok", "critical")],
                )
            )
        else:
            steps = _apheresis(inst, 2, volume="30")
            steps.insert(4, _dispose("volume_ok", doc, "reject"))
            out.append(
                Scenario(
                    f"{inst}/apheresis low yield",
                    inst,
                    "apheresis_collection",
                    _patient(inst, 2),
                    steps[:5],
                    "rejected",
                    [("volume_ok", "minor")],
                )
            )
        # WF2
        params = {**_patient(inst, 1), "lot": "LOT-A1"}  # the happy paths share one dose: its chain
        out.append(Scenario(f"{inst}/receipt ok", inst, "dose_receipt", params, _receipt(inst), "completed"))
        if inst == A:
            steps = [*_receipt(inst, coi_matches="no")[:2], _dispose("identity_matches", qa, "reject")]
            out.append(
                Scenario(
                    f"{inst}/receipt identity mismatch",
                    inst,
                    "dose_receipt",
                    {**_patient(inst, 4), "lot": "LOT-A2"},
                    steps,
                    "rejected",
                    [("identity_matches", "critical")],
                )
            )
        else:
            out.append(
                Scenario(
                    f"{inst}/receipt excursion",
                    inst,
                    "dose_receipt",
                    {**_patient(inst, 4), "lot": "LOT-B2"},
                    _receipt(inst, logger="-120")[:1],
                    "rejected",
                    [("transit_temperature", "major")],
                )
            )
            out.append(
                Scenario(
                    f"{inst}/capa after receipt excursion",
                    inst,
                    "deviation_capa",
                    {},
                    _capa(inst, disposition="reject"),
                    "completed",
                    parent=f"{inst}/receipt excursion",
                )
            )
        # WF3
        tank = {"tank_id": f"LN2-{p.upper()}1"}
        out.append(Scenario(f"{inst}/daily check ok", inst, "storage_daily_check", tank, _daily(inst), "completed"))
        bad = _daily(inst, temperature="-140") if inst == A else _daily(inst, level="30")
        out.append(
            Scenario(
                f"{inst}/daily check out of limits",
                inst,
                "storage_daily_check",
                tank,
                [*bad, _dispose("tank_in_limits", qa if inst == A else "b.dir", "approve")],
                "completed",
                [("tank_in_limits", "major")],
            )
        )
        alarm = {**tank, "alarm": "high_temperature"}
        review = (
            ("supervisor_review", "a.lead", {"decision": "approve"})
            if inst == A
            else ("director_review", "b.dir", {"decision": "approve"})
        )
        out.append(Scenario(f"{inst}/alarm ok", inst, "storage_alarm", alarm, [*_alarm(inst), review], "completed"))
        out.append(
            Scenario(
                f"{inst}/alarm excursion",
                inst,
                "storage_alarm",
                alarm,
                [*_alarm(inst, max_temp="-120"), review],
                "completed",
                [("excursion", "critical")],
            )
        )
        if inst == A:  # the deviation SOP's happy path: approve (use with documented risk), CAPA effective, closed
            out.append(
                Scenario(
                    f"{inst}/capa after alarm excursion",
                    inst,
                    "deviation_capa",
                    {},
                    _capa(inst),
                    "completed",
                    parent=f"{inst}/alarm excursion",
                )
            )
        else:  # its failure path: the CAPA is not effective, a deviation of its own, rejected
            out.append(
                Scenario(
                    f"{inst}/capa not effective",
                    inst,
                    "deviation_capa",
                    {},
                    _capa(inst, effective="no"),
                    "rejected",
                    [("capa_effective", "minor")],
                    parent=f"{inst}/alarm excursion",
                )
            )
        # WF4
        out.append(
            Scenario(
                f"{inst}/readiness ok", inst, "infusion_readiness", _patient(inst, 1), _readiness(inst), "completed"
            )
        )
        if inst == A:
            steps = [*_readiness(inst, toci="1")[:4], _dispose("tocilizumab_stock", doc, "reject")]
            out.append(
                Scenario(
                    f"{inst}/readiness short of tocilizumab",
                    inst,
                    "infusion_readiness",
                    _patient(inst, 6),
                    steps,
                    "rejected",
                    [("tocilizumab_stock", "major")],
                )
            )
        else:
            out.append(
                Scenario(
                    f"{inst}/readiness not released",
                    inst,
                    "infusion_readiness",
                    _patient(inst, 6),
                    _readiness(inst, released="no")[:1],
                    "stopped",
                    [("dose_released", "major")],
                )
            )
        # WF5
        ok = _patient(inst, 1)
        out.append(Scenario(f"{inst}/infusion ok", inst, "infusion", ok, _infusion(inst, ok["coi"]), "completed"))
        bad_p = _patient(inst, 8)
        if inst == A:
            out.append(
                Scenario(
                    f"{inst}/infusion identity mismatch",
                    inst,
                    "infusion",
                    bad_p,
                    _infusion(inst, bad_p["coi"], bag_coi="COI-LIB-OTHER1")[:4],
                    "stopped",
                    [("identity", "critical")],
                )
            )
            out.append(
                Scenario(
                    f"{inst}/capa not effective",
                    inst,
                    "deviation_capa",
                    {},
                    _capa(inst, disposition="reject", effective="no"),
                    "rejected",
                    [("capa_effective", "minor")],
                    parent=f"{inst}/infusion identity mismatch",
                )
            )
        else:  # thaw started 09:40, infusion ended 13:00: 200 min > the product's 180 min
            out.append(
                Scenario(
                    f"{inst}/infusion too late",
                    inst,
                    "infusion",
                    bad_p,
                    _infusion(inst, bad_p["coi"], late=True),
                    "completed",
                    [("thaw_to_infusion_end", "major")],
                )
            )
        # WF7
        out.append(
            Scenario(
                f"{inst}/toxicity ok", inst, "toxicity_monitoring", _patient(inst, 1), _toxicity(inst), "completed"
            )
        )
        out.append(
            Scenario(
                f"{inst}/toxicity grade 3",
                inst,
                "toxicity_monitoring",
                _patient(inst, 10),
                _toxicity(inst, severe=True),
                "completed",
                [("severe_toxicity", "major")],
            )
        )
    return out


def _sop_ids(inst: str) -> list[str]:
    return sorted(Catalog(REPO / "sops", REPO / "templates").institution(inst).sops)


@pytest.fixture(name="library", scope="module")
def library_fixture(engine: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The library's staff, trained on every SOP of their institution; settings whose SOP folder is
    a copy of the repository's in which shenjiang_hospital has confirmed Relma-cel's values."""
    from tests.seed import seed_training, seed_user

    sops = tmp_path_factory.mktemp("library") / "sops"
    shutil.copytree(REPO / "sops", sops)
    path = sops / B / "products.yaml"
    catalogue = yaml.safe_load(path.read_text(encoding="utf-8"))
    catalogue["products"]["relma_cel"].update(RELMA_CONFIRMED)
    path.write_text(yaml.safe_dump(catalogue, allow_unicode=True), encoding="utf-8")
    t0 = time.monotonic()
    ids = {inst: _sop_ids(inst) for inst in (A, B)}
    for username, (name, inst, role) in STAFF.items():
        seed_user(engine, username, name, PASSWORD, [(inst, role)])
        seed_training(engine, username, inst, ids[inst][0], 1)
    with write_session(engine.database_url) as s:  # the rest in one transaction: the same rows, faster
        for username, (_, inst, _) in STAFF.items():
            user = s.exec(select(User).where(User.username == username)).one()
            for sop_id in ids[inst][1:]:
                record_training(s, user, inst, sop_id, 1, trained_at=utcnow(), trainer="Test Trainer", actor="test")
    print(f"\nTIMING staff and training {time.monotonic() - t0:.1f}s")
    return replace(engine, sops_dir=sops, future_skew_minutes=DAY.total_seconds() / 60)


@pytest.fixture(name="played", scope="module")
def played_fixture(library: Settings) -> dict[str, Scenario]:
    """Start every scenario, then sign whatever waits, several at once (signing waits on the
    password hash, the record database and Prefect's API), until all have ended."""
    from concurrent.futures import ThreadPoolExecutor

    plays = scenarios()
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=6) as pool:
        for sc in plays:  # one after the other: a dose's chain of identity is ordered by start
            if not sc.parent:
                sc.run_id = runs_service.start_run(
                    library, sc.institution, sc.sop, sc.params, sc.starter, PASSWORD
                ).run_id
        # The scenario day starts after the last run started; the entered values are laid out on it.
        T.start_day(utcnow())
        fresh = {sc.name: sc for sc in scenarios()}
        for sc in plays:
            sc.steps = fresh[sc.name].steps
        by_name = {sc.name: sc for sc in plays}
        t_started = time.monotonic()
        # Waits while the scenarios progress: it fails only when none has moved for STALL seconds
        # (a hang), never against a wall-clock deadline that a busy machine can break.
        pending = list(plays)
        progress, last_moved = -1, time.monotonic()
        while pending:
            moved = sum(sc.done for sc in plays) - len(pending)
            if moved != progress:
                progress, last_moved = moved, time.monotonic()
            assert time.monotonic() - last_moved < STALL, (
                f"no scenario moved for {STALL:.0f} s; still running: {[(sc.name, sc.done) for sc in pending]}"
            )
            ready: list[Scenario] = []
            for sc in list(pending):
                if not sc.run_id:  # a deviation sub-run: started by its parent's failed check
                    with read_session(library.database_url) as s:
                        child = s.exec(select(SopRun).where(SopRun.parent_run_id == by_name[sc.parent].run_id)).first()
                    if child is None:
                        continue
                    sc.run_id = child.id
                with read_session(library.database_url) as s:
                    states = step_states(s, sc.run_id)
                    status = run_status(s, sc.run_id)
                st = status.status if status else "unknown"
                assert st != "failed", f"{sc.name}: run failed: {status.detail if status else ''}"
                if sc.done < len(sc.steps):
                    step = sc.steps[sc.done][0]
                    rec = states.get(step)
                    if rec is not None and rec.status == "waiting":
                        ready.append(sc)
                    else:
                        assert st not in FINAL_STATUSES, f"{sc.name}: ended {st} before {step}"
                elif st in FINAL_STATUSES:
                    pending.remove(sc)
                else:  # an open major deviation holds the run: the institution's QA signs its disposition
                    held = sorted(sid for sid, r in states.items() if r.status == "waiting" and HOLD.match(sid))
                    if held:
                        qa = next(u for u, (_, inst, role) in STAFF.items() if inst == sc.institution and role == "qa")
                        sc.steps.append((held[0], qa, {"decision": "approve", "reason": "dose assessed, released"}))
                        ready.append(sc)
            signing = [
                (
                    sc,
                    pool.submit(
                        signing_service.submit_step,
                        library,
                        sc.run_id,
                        *sc.steps[sc.done][:2],
                        PASSWORD,
                        sc.steps[sc.done][2],
                    ),
                )
                for sc in ready
            ]
            for sc, future in signing:
                future.result()
                sc.done += 1
            if not ready:
                time.sleep(0.1)
    print(
        f"\nTIMING start {t_started - t0:.1f}s, sign+finish {time.monotonic() - t_started:.1f}s, "
        f"signatures {sum(sc.done for sc in plays)}"
    )
    return {sc.name: sc for sc in plays}


def test_every_library_sop_has_a_happy_and_a_failure_scenario() -> None:
    covered: dict[tuple[str, str], set[str]] = {}
    for sc in scenarios():
        covered.setdefault((sc.institution, sc.sop), set()).add("failure" if sc.deviations else "happy")
    for inst in (A, B):
        for sop_id in _sop_ids(inst):
            assert covered.get((inst, sop_id)) == {"happy", "failure"}, f"{inst}/{sop_id}"


@pytest.mark.parametrize("name", [sc.name for sc in scenarios()])
def test_library_scenario_ends_as_expected(played: dict[str, Scenario], library: Settings, name: str) -> None:
    sc = played[name]
    rec = runs_service.quality_record(library, sc.run_id)

    assert rec["run"]["status"] == sc.status
    assert sorted((d["step_id"], d["classification"]) for d in rec["deviations"]) == sorted(sc.deviations)
    assert all(s["signature"]["valid"] for s in rec["steps"] if s["signature"])
    if sc.status == "completed":
        docs = rec["documents"]
        assert [Path(d["path"]).suffix for d in docs] == [".html", ".pdf"]
        for d in docs:
            assert hashlib.sha256(stored(d["path"])).hexdigest() == d["sha256"]


def _pdf_text(path: str) -> str:
    """The PDF's text without any whitespace: table cells wrap lines anywhere."""
    return _pdf_text_bytes(stored(path))


def _pages(path: str) -> int:
    from pypdf import PdfReader

    return len(PdfReader(io.BytesIO(stored(path))).pages)


def _has(text: str, *needles: str) -> bool:
    return all("".join(n.split()) in text for n in needles)


def test_chinese_record_pdf_has_chinese_text_names_times_and_footer(
    played: dict[str, Scenario], library: Settings
) -> None:
    sc = played[f"{B}/infusion ok"]
    rec = runs_service.quality_record(library, sc.run_id)
    html_doc, pdf_doc = rec["documents"]
    html = stored_text(html_doc["path"])
    text = _pdf_text(pdf_doc["path"])
    step = next(s for s in rec["steps"] if s["id"] == "infusion_record")

    assert _has(
        text,
        "申江示例医院 细胞治疗中心",
        "转运、复苏、床旁身份核对与输注",
        "床旁身份核对",
        f"复苏结束: {T.shown('09:44')}",
    )
    assert _has(text, f"SOP infusion v1 · 运行编号 {sc.run_id}")
    assert _has(text, "吴静 (b.nurse)", "冯雪 (b.nurse2)", "赵磊 (b.doc)")  # printed names of the signers
    assert _has(
        text, "执行: 出库并交接至病区", "复核: 独立复核患者身份与产品一致", "批准: 审核并签署输注记录"
    )  # meanings
    assert _has(text, "输注量: 68 mL", "滴速: 10 mL/min", "储存温度上限 ≤ -150 °C")  # values with their unit
    pages = _pages(pdf_doc["path"])
    assert pages >= 2
    assert _has(text, *(f"第 {n} 页，共 {pages} 页" for n in range(1, pages + 1)))
    assert _has(text, "时限", "复苏开始至输注结束（产品时限）", "符合")  # the deadline, met
    assert _has(text, "偏差", "无。")
    assert _has(text, "本文件所依据记录内容的 sha256（规范 JSON）：" + step["data"]["record_sha256"])
    assert _has(text, "生成时审计链头：#")  # the head at rendering; it has moved on since
    assert not _has(text, rec["audit_head"]["hash"])
    assert '<html lang="zh-CN">' in html
    assert step["data"]["pdf_sha256"] == rec["documents"][1]["sha256"]


def test_english_record_escapes_entered_html_and_shows_units(played: dict[str, Scenario], library: Settings) -> None:
    sc = played[f"{A}/apheresis ok"]
    rec = runs_service.quality_record(library, sc.run_id)
    html = stored_text(rec["documents"][0]["path"])
    text = _pdf_text(rec["documents"][1]["path"])

    assert "mild hypocalcaemia &lt;b&gt;treated&lt;/b&gt;" in html
    assert "<b>treated" not in html
    assert "Collected volume: 120 mL" in html
    assert _has(
        text,
        "Demo Hospital Cell Therapy Unit",
        f"Page 1 of {_pages(rec['documents'][1]['path'])}",
        "Body weight: 62 kg",
    )
    assert _has(text, "Zheng Bo (a.lead)", "approved: Released the starting material to the courier")


def test_deviation_shows_in_the_record_document(played: dict[str, Scenario], library: Settings) -> None:
    sc = played[f"{B}/toxicity grade 3"]
    rec = runs_service.quality_record(library, sc.run_id)
    text = _pdf_text(rec["documents"][1]["path"])

    assert _has(
        text, "severe_toxicity主要3 级及以上 CRS 或 ICANS：严重不良事件需上报否"
    )  # step, class, description, quarantine
    assert _has(text, "CRS 分级（计算）: 3 级", "不良事件报告", "AE-2026-031")


def test_breached_deadline_shows_in_the_record_document(played: dict[str, Scenario], library: Settings) -> None:
    sc = played[f"{B}/infusion too late"]
    rec = runs_service.quality_record(library, sc.run_id)
    text = _pdf_text(rec["documents"][1]["path"])

    assert _has(text, "复苏开始至输注结束（产品时限）", "180 min", "200 min", "超出时限")
    assert _has(text, "thaw_to_infusion_end主要超过产品复苏至输注时限")


def test_same_record_renders_the_same_html_and_pdf(played: dict[str, Scenario], library: Settings) -> None:
    from flows.engine.steps import document_context, load_context
    from flows.outputs.documents import render_document, render_pdf
    from flows.record.query import run_record

    sc = played[f"{B}/receipt ok"]
    ctx = load_context(library, sc.run_id)
    step = ctx.sop.step("receipt_record")
    with read_session(library.database_url) as s:
        record = run_record(s, sc.run_id, with_history=False)
    head = {"seq": 1, "hash": "0" * 64}
    renders = []
    for _ in range(2):
        context = document_context(ctx, step, record, head)
        html, digest = render_document(library.templates_dir, B, ctx.timezone, "record.zh.html.j2", context)
        renders.append((html, digest, render_pdf(html, library.templates_dir)))

    assert renders[0] == renders[1]
    assert _has(_pdf_text_bytes(renders[0][2]), "产品接收与验收记录", "CAR-T 产品到货接收与验收")


def _pdf_text_bytes(data: bytes) -> str:
    from pypdf import PdfReader

    return "".join("".join(page.extract_text().split()) for page in PdfReader(io.BytesIO(data)).pages)


@pytest.mark.parametrize("inst", [A, B])
def test_happy_paths_make_an_unbroken_chain_of_identity(
    played: dict[str, Scenario], library: Settings, inst: str
) -> None:
    chain = runs_service.chain_of_identity(library, _patient(inst, 1)["coi"])

    assert chain["unbroken"], chain["problems"]
    assert [(e["sop_id"], e["stage"]) for e in chain["runs"]] == [
        ("apheresis_collection", "collection"),
        ("dose_receipt", "receipt"),
        ("infusion_readiness", "storage"),
        ("infusion", "infusion"),
        ("toxicity_monitoring", None),
    ]
    broken = runs_service.chain_of_identity(library, _patient(inst, 2)["coi"])  # the failed collection
    assert not broken["unbroken"]


def test_start_on_an_unconfirmed_product_names_the_values_to_set(engine: Settings) -> None:
    with pytest.raises(SopInputError) as info:
        runs_service.start_run(
            engine, B, "dose_receipt", {**_patient(B, 99, "zevor_cel"), "lot": "LOT-Z"}, "b.coord", PASSWORD
        )

    message = str(info.value)
    assert "'zevor_cel'" in message
    assert "storage_max_c, thaw_to_infusion_max_min, documents, tocilizumab_doses_min" in message
    assert "sops/shenjiang_hospital/products.yaml" in message
