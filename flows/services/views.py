"""The service floor: what people read, in their language (issue 14): the inbox, a step's form and a
run, each with the dose it is about (product, COI, lot, patient id), roles by their labels, formats,
computed values and checks as words (``flows.services.wording``) and SOP text in the reader's
language where the SOP gives it (``title: {en: …, zh: …}``). Each function calls the service that
decides (``inbox``, ``signing``, ``runs``) and adds only words; the web renders the result.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flows.config import Settings
from flows.engine.gates import find_human_step, human_fields
from flows.record.db import read_session
from flows.record.versions import effective_sop, stored_sop
from flows.services import inbox, library, signing
from flows.services import runs as runs_service
from flows.services.runs import find_run
from flows.services.wording import (
    check_clauses,
    document_name,
    dose_facts,
    format_words,
    institution_language,
    next_steps,
    reads_of,
    role_labels,
)
from flows.sop.model import FieldSpec, HumanStepSpec, SopDefinition, text_in

__all__ = [
    "CARD",
    "correction_view",
    "field_words",
    "inbox_cards",
    "inbox_view",
    "run_view",
    "shown_seconds",
    "start_view",
    "step_view",
]


def _dose(settings: Settings, run_id: str) -> tuple[dict[str, Any], SopDefinition, str]:
    with read_session(settings.database_url) as s:
        run = find_run(s, run_id)
        sop = stored_sop(s, run)
        return dose_facts(run, sop), sop, run.institution


def _product_name(dose: dict[str, Any], language: str) -> str | None:
    return (dose.get("product_zh") if language == "zh" else None) or dose.get("product")


def field_words(
    name: str, spec: FieldSpec, sop: SopDefinition, step: HumanStepSpec | None, language: str, example: str | None
) -> dict[str, Any]:
    """A field as a form shows it: label and help in the reader's language, its format in words,
    and for a computed one the labels of what it is worked out from."""
    view = {"name": name, **spec.model_dump(exclude_none=True, mode="json")}
    view["label"] = text_in(spec.label, language) or name
    if spec.help:
        view["help"] = text_in(spec.help, language)
    view["words"] = format_words(spec, example)
    if spec.compute:
        view["reads"] = reads_of(sop, spec.compute, step)
    return view


def inbox_view(
    settings: Settings,
    username: str,
    language: str,
    now: datetime | None = None,
    *,
    first: int = 0,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """``inbox.urgent_inbox`` (``limit`` items from the ``first``, and how many wait in all) with each
    item's dose, role label and step title in ``language``.

    Raises:
        AuthenticationError: no such user.
    """
    items, total = inbox.urgent_inbox(settings, username, now, first=first, limit=limit)
    labels: dict[str, dict[str, str]] = {}
    for it in items:
        sop: SopDefinition = it.pop("sop")
        step = find_human_step(sop, it["step_id"])
        it["dose"]["product_shown"] = _product_name(it["dose"], language)
        if it["institution"] not in labels:
            labels[it["institution"]] = role_labels(settings, it["institution"], language)
        it["role_label"] = labels[it["institution"]].get(it["role"], it["role"])
        it["title"] = text_in(step.title, language) if step is not None and step.title else it["title"]
        it["sop_title"] = text_in(sop.title, language)
        it["timeout_seconds"] = it["timeout"].total_seconds() if it.get("timeout") else None
    return items, total


CARD = (
    "run_id",
    "step_id",
    "title",
    "dose",
    "role_label",
    "sop_title",
    "due_at",
    "timezone",
    "seconds_left",
    "clocks",
    "since",
    "timeout_seconds",
    "cannot_sign",
)
"""What an inbox card shows of an item (``_inbox_items.html``): nothing else reaches the cards."""


def shown_seconds(seconds: float | None) -> int | None:
    """``seconds`` left (negative: overdue) in the whole minutes a card shows them in, the sign kept:
    the page's ``time_left`` and ``duration`` print the same words for both (tests/test_web.py checks
    it). Two reads a few seconds apart then give equal cards."""
    if seconds is None:
        return None
    minutes = int(abs(seconds)) // 60
    return 60 * minutes if seconds >= 0 else -60 * minutes - 1


def inbox_cards(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``inbox_view``'s items as their cards show them (``CARD``; times left as ``shown_seconds``):
    equal cards render to equal HTML, which the web keeps (``flows.web.base.Web.fragment``)."""
    cards = []
    for it in items:
        card = {k: it.get(k) for k in CARD}
        card["seconds_left"] = shown_seconds(it.get("seconds_left"))
        card["clocks"] = [
            {"title": c["title"], "seconds_left": shown_seconds(c["seconds_left"])} for c in it.get("clocks") or ()
        ]
        cards.append(card)
    return cards


def step_view(settings: Settings, run_id: str, step_id: str, username: str, language: str) -> dict[str, Any]:
    """``signing.step_form`` with the dose, the role's label, every field in words, and what happens
    after this step is signed (``next``).

    Raises:
        NotFoundError, StepNotWaitingError, NotAuthorizedError (as ``signing.step_form``)
    """
    form = signing.step_form(settings, run_id, step_id, username)
    dose, sop, institution = _dose(settings, run_id)
    roles = role_labels(settings, institution, language)
    step = find_human_step(sop, step_id)
    example = None
    product = form["run"].get("product") or {}
    if product.get("coi_example"):
        example = product["coi_example"]
    if step is not None:
        fields = human_fields(step)
        form["fields"] = [field_words(n, f, sop, step, language, example) for n, f in fields.items()]
        form["step"]["title"] = text_in(step.title, language) or step.id
        form["step"]["meaning"] = text_in(step.meaning, language) or None
        form["step"]["description"] = text_in(step.description, language) or None
    form["step"]["role_label"] = roles.get(form["step"]["role"], form["step"]["role"])
    form["run"]["sop_title"] = text_in(sop.title, language)
    form["dose"] = {**dose, "product_shown": _product_name(dose, language)}
    form["next"] = next_steps(sop, step_id, roles, language)
    if form.get("verifies"):
        verified = form["verifies"]
        target = find_human_step(sop, verified["id"])
        if target is not None:
            verified["title"] = text_in(target.title, language) or target.id
            verified["fields"] = {
                k: {"label": text_in(f.label, language) or k, "unit": f.unit} for k, f in target.fields.items()
            }
    return form


def run_view(settings: Settings, username: str, run_id: str, language: str) -> dict[str, Any]:
    """``runs.record_for`` with parameters by label, the dose, documents named for people, checks
    as clauses and SOP text in ``language``.

    Raises:
        NotFoundError, NotAuthorizedError
    """
    rec = runs_service.record_for(settings, username, run_id)
    dose, sop, institution = _dose(settings, rec["run"]["id"])
    roles = role_labels(settings, institution, language)
    rec["run"]["sop_title"] = text_in(sop.title, language)
    rec["dose"] = {**dose, "product_shown": _product_name(dose, language)}
    rec["param_rows"] = [
        {
            "name": name,
            "label": text_in(spec.label, language) or name,
            "value": rec["run"]["params"].get(name),
            "type": spec.type,
        }
        for name, spec in sop.params.items()
        if name in rec["run"]["params"]
    ]
    product = rec["run"].get("product") or {}
    titles = {st.id: st for st in sop.steps}
    for entry in rec["steps"]:
        spec = titles.get(entry["id"])
        if spec is not None and spec.title:
            entry["title"] = text_in(spec.title, language)
        if spec is not None and spec.kind == "check":
            entry["clauses"] = check_clauses(sop, spec.expect, product)
        if isinstance(spec, HumanStepSpec):
            entry["role_label"] = roles.get(spec.role, spec.role)
            entry["fields"] = {
                k: {"label": text_in(f.label, language) or k, "unit": f.unit} for k, f in spec.fields.items()
            }
    language_of_docs = institution_language(settings, institution)
    for d in rec["documents"]:
        step = titles.get(d["step_id"])
        d["name"] = document_name(
            d["template"], d["path"], text_in(step.title, language) if step else None, language_of_docs
        )
    rec["documents"].sort(key=lambda d: (d["name"]["language"] != language, d["name"]["format"] != "PDF"))
    return rec


def correction_view(settings: Settings, run_id: str, step_id: str, username: str, language: str) -> dict[str, Any]:
    """``step_view`` of a done step with its current values (``current``: the newest entry, as a form
    shows them) and its earlier corrections, for the correction form.

    Raises:
        NotFoundError, StepNotWaitingError, NotAuthorizedError
    """
    form = step_view(settings, run_id, step_id, username, language)
    rec = runs_service.quality_record(settings, form["run"]["id"])
    entry = next((st for st in rec["steps"] if st["id"] == step_id), None) or {}
    data = entry.get("data") or {}
    form["current"] = {
        f["name"]: (
            "yes" if data.get(f["name"]) is True else "no" if data.get(f["name"]) is False else data.get(f["name"], "")
        )
        for f in form["fields"]
        if not f.get("compute")
    }
    form["corrections"] = entry.get("corrections", [])
    form["signature"] = entry.get("signature")
    return form


def start_view(settings: Settings, username: str, language: str) -> list[dict[str, Any]]:
    """``library.startable_sops`` with each SOP's title and parameters in the reader's words
    (labels in ``language``, formats as words with an example)."""
    out = library.startable_sops(settings, username)
    for item in out:
        if not item.get("sop_id"):
            continue
        sop = effective_sop(settings, item["institution"], item["sop_id"]).definition
        item["title"] = text_in(sop.title, language)
        item["params"] = [field_words(n, f, sop, None, language, None) for n, f in sop.params.items()]
    return out
