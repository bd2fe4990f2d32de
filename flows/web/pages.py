"""Edge: the web app's pages for runs, step forms and signing, documents and SOPs.

Thin: each route reads the form (after the CSRF check in ``Web.form``), turns what a browser
sends into what the services take (``f.<field>`` inputs; a ``datetime-local`` value gets the
institution's UTC offset), calls one service and renders the result or its problems. Problems
are shown next to the field they name, the rest above the form.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from flows.errors import (
    AuthenticationError,
    FlowsError,
    NotAuthorizedError,
    SopInputError,
    StepNotWaitingError,
)
from flows.services import documents, library, runs, signing, team, views
from flows.services import editor as sop_editor
from flows.services.versions import CHANGE_CONTROL_ID
from flows.web import changes, editor
from flows.web.base import Web
from flows.web.i18n import N_

__all__ = ["field_errors", "register"]

PREFIX = "f."
_LOCAL_DATETIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?$")


def field_errors(problems: list[str], names: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Problems by the field they name (``…: name: …`` or ``….name: …``), and the others."""
    by_field: dict[str, list[str]] = {}
    general: list[str] = []
    for p in problems:
        text = str(p)
        hit = next((n for n in names if f": {n}: " in text or f".{n}: " in text), None)
        if hit is None:
            general.append(text)
        else:
            by_field.setdefault(hit, []).append(text.split(f"{hit}: ", 1)[-1])
    return by_field, general


def _values(form: dict[str, str], fields: list[dict[str, Any]], tz: str) -> dict[str, str]:
    """The entered values of the fields a person fills in (not computed ones), as the services take them."""
    out = {}
    for f in fields:
        if f.get("compute"):
            continue
        raw = form.get(PREFIX + f["name"], "")
        if f.get("type") == "datetime" and _LOCAL_DATETIME.match(raw.strip()):
            raw = datetime.fromisoformat(raw.strip()).replace(tzinfo=ZoneInfo(tz)).isoformat()
        out[f["name"]] = raw
    return out


def _next_words(web: Web, ws: Any, following: list[dict[str, Any]]) -> str:
    """What happens now that the step is signed, in one sentence of the reader's language."""
    human = next((n for n in following if n.get("role_label")), None)
    if human is not None:
        return web.gettext(ws, N_("What happens next: %(title)s waits on %(role)s; they see it in their inbox.")) % {
            "title": human["title"],
            "role": human["role_label"],
        }
    if following:
        return web.gettext(ws, N_("What happens next: the run does its remaining steps by itself."))
    return web.gettext(ws, N_("What happens next: this was the last step; the run completes."))


_RUN_FILTERS = ("status", "sop_id", "product", "coi", "since", "until", "page", "per_page")
"""The runs page's query parameters (``runs.run_filter``)."""
_STATUSES = ("open", *runs.RUN_STATUSES)


def register(app: FastAPI, web: Web) -> None:
    settings = web.settings

    # -- runs ------------------------------------------------------------------------------------------
    @app.get("/runs")
    async def runs_page(request: Request) -> Response:
        """One page of runs, newest first; query parameters filter it (status, sop_id, product, coi,
        since, until) and page it (page, per_page), as ``sopflow runs`` does."""
        ws = await web.user(request)
        asked = {k: request.query_params.get(k) or None for k in _RUN_FILTERS}
        try:
            filters = runs.run_filter(**asked)
        except SopInputError as exc:
            return web.render(
                ws, "runs.html", status=422, runs=[], asked=asked, problems=exc.problems, page=None, statuses=_STATUSES
            )
        shown = await run_in_threadpool(runs.runs_page_for, settings, ws.who, filters)
        kept = {k: v for k, v in asked.items() if v is not None and k != "page"}
        return web.render(
            ws,
            "runs.html",
            runs=shown["runs"],
            asked=asked,
            problems=[],
            page=shown,
            statuses=_STATUSES,
            newer=urlencode({**kept, "page": shown["page"] - 1}) if shown["page"] > 1 else None,
            older=urlencode({**kept, "page": shown["page"] + 1}) if shown["more"] else None,
        )

    @app.get("/runs/new")
    async def start_choose(request: Request) -> Response:
        ws = await web.user(request)
        sops = await run_in_threadpool(views.start_view, settings, ws.who, ws.language)
        return web.render(ws, "start.html", sops=sops, chosen=None, values={}, errors={}, general=[], tz="UTC")

    async def _startable(ws: Any, institution: str, sop_id: str) -> dict[str, Any]:
        sops = await run_in_threadpool(views.start_view, settings, ws.who, ws.language)
        chosen = next((s for s in sops if s["institution"] == institution and s.get("sop_id") == sop_id), None)
        if chosen is None:
            raise StepNotWaitingError(
                f"no SOP {sop_id!r} at {institution!r} that you may start; the start page lists them"
            )
        return chosen

    @app.get("/runs/new/{institution}/{sop_id}")
    async def start_form(request: Request, institution: str, sop_id: str) -> Response:
        ws = await web.user(request)
        chosen = await _startable(ws, institution, sop_id)
        tz = await run_in_threadpool(library.institution_timezone, settings, institution)
        return web.render(ws, "start.html", sops=[], chosen=chosen, values={}, errors={}, general=[], tz=tz)

    @app.post("/runs/new/{institution}/{sop_id}")
    async def start(request: Request, institution: str, sop_id: str) -> Response:
        ws = await web.user(request)
        form = await web.form(request, ws)
        chosen = await _startable(ws, institution, sop_id)
        tz = await run_in_threadpool(library.institution_timezone, settings, institution)
        values = _values(form, chosen["params"], tz)
        try:
            res = await run_in_threadpool(
                runs.start_run, settings, institution, sop_id, values, ws.who, form.get("password", "")
            )
        except (SopInputError, AuthenticationError, NotAuthorizedError) as exc:
            errors, general = field_errors(
                getattr(exc, "problems", None) or [str(exc)], [p["name"] for p in chosen["params"]]
            )
            return web.render(
                ws,
                "start.html",
                status=422,
                sops=[],
                chosen=chosen,
                values=values,
                errors=errors,
                general=general,
                tz=tz,
            )
        ws.flash.append(("ok", web.gettext(ws, N_("Run started."))))
        return web.redirect(ws, f"/runs/{res.run_id}")

    @app.get("/runs/{run_id}")
    async def run_page(request: Request, run_id: str) -> Response:
        ws = await web.user(request)
        rec = await run_in_threadpool(views.run_view, settings, ws.who, run_id, ws.language)
        tz = await run_in_threadpool(library.institution_timezone, settings, rec["run"]["institution"])
        seen: set[str] = set()
        for h in rec["history"]:  # the flow's "done" after a "signed" repeats it: shown once
            sig = (h.get("signature") or {}).get("id")
            h["repeat"] = bool(sig) and sig in seen and h["status"] == "done"
            seen.add(sig or "")
        return web.render(ws, "run.html", rec=rec, tz=tz, steps={s["id"]: s for s in rec["steps"]})

    # -- steps -----------------------------------------------------------------------------------------
    def _step_page(
        ws: Any,
        form: dict[str, Any],
        status: int = 200,
        *,
        values: dict[str, str] | None = None,
        errors: dict[str, list[str]] | None = None,
        general: list[str] | None = None,
        preview: dict[str, Any] | None = None,
        sign_error: str | None = None,
    ) -> Response:
        return web.render(
            ws,
            "step.html",
            status=status,
            form=form,
            values=values or {},
            errors=errors or {},
            general=general or [],
            preview=preview,
            sign_error=sign_error,
            prefix=PREFIX,
        )

    @app.get("/runs/{run_id}/steps/{step_id}")
    async def step_page(request: Request, run_id: str, step_id: str) -> Response:
        ws = await web.user(request)
        form = await run_in_threadpool(views.step_view, settings, run_id, step_id, ws.who, ws.language)
        return _step_page(ws, form)

    @app.post("/runs/{run_id}/steps/{step_id}/review")
    async def step_review(request: Request, run_id: str, step_id: str) -> Response:
        """Check the entered values and show what the signer would sign (the signature dialog)."""
        ws = await web.user(request)
        posted = await web.form(request, ws)
        form = await run_in_threadpool(views.step_view, settings, run_id, step_id, ws.who, ws.language)
        values = _values(posted, form["fields"], form["timezone"])
        try:
            preview = await run_in_threadpool(signing.review_step, settings, run_id, step_id, ws.who, values)
        except SopInputError as exc:
            errors, general = field_errors(exc.problems, [f["name"] for f in form["fields"]])
            return _step_page(ws, form, 422, values=values, errors=errors, general=general)
        return _step_page(ws, form, values=values, preview=preview)

    @app.post("/runs/{run_id}/steps/{step_id}/sign")
    async def step_sign(request: Request, run_id: str, step_id: str) -> Response:
        ws = await web.user(request)
        posted = await web.form(request, ws)
        form = await run_in_threadpool(views.step_view, settings, run_id, step_id, ws.who, ws.language)
        values = _values(posted, form["fields"], form["timezone"])
        if posted.get("action") == "edit":
            return _step_page(ws, form, values=values)
        try:
            res = await run_in_threadpool(
                signing.sign_reviewed,
                settings,
                run_id,
                step_id,
                ws.who,
                posted.get("password", ""),
                values,
                posted.get("shown", ""),
            )
        except AuthenticationError as exc:
            preview = await run_in_threadpool(signing.review_step, settings, run_id, step_id, ws.who, values)
            return _step_page(ws, form, 401, values=values, preview=preview, sign_error=str(exc))
        except SopInputError as exc:
            errors, general = field_errors(exc.problems, [f["name"] for f in form["fields"]])
            return _step_page(ws, form, 422, values=values, errors=errors, general=general)
        except (NotAuthorizedError, StepNotWaitingError) as exc:
            form = await run_in_threadpool(views.step_view, settings, run_id, step_id, ws.who, ws.language)
            return _step_page(
                ws, form, 403 if isinstance(exc, NotAuthorizedError) else 409, values=values, general=[str(exc)]
            )
        ws.flash.append(("ok", web.gettext(ws, N_("Signed. Signature sha256: %(sha)s")) % {"sha": res.signed_sha256}))
        ws.flash.append(("ok", _next_words(web, ws, form.get("next") or [])))
        if not res.resumed:  # the signature is recorded; the executor's sweep hands it to the run
            ws.flash.append(
                ("ok", web.gettext(ws, N_("The run goes on as soon as the engine picks the signature up.")))
            )
        return web.redirect(ws, f"/runs/{res.run_id}")

    # -- documents -------------------------------------------------------------------------------------
    @app.get("/documents/{document_id}")
    async def document_page(request: Request, document_id: str) -> Response:
        ws = await web.user(request)
        doc = await run_in_threadpool(documents.document_file, settings, document_id, ws.who)
        return web.render(ws, "document.html", doc=doc)

    async def _document_bytes(request: Request, document_id: str, disposition: str) -> Response:
        ws = await web.user(request)
        doc = await run_in_threadpool(documents.document_file, settings, document_id, ws.who)
        response = Response(doc["content"], media_type=doc["media_type"])
        response.headers["Content-Disposition"] = f'{disposition}; filename="{doc["name"]}"'
        # An HTML document is shown as it is, in a sandbox: no scripts, no requests, no forms
        # (a PDF is left to the browser's viewer, which a sandbox would block).
        sandbox = "; sandbox" if doc["media_type"] == "text/html" else ""
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; style-src 'unsafe-inline'; img-src data:{sandbox}"
        )
        response.headers["X-Document-SHA256"] = doc["sha256"]
        return web.secure(response, ws)

    @app.get("/documents/{document_id}/view")
    async def document_view(request: Request, document_id: str) -> Response:
        return await _document_bytes(request, document_id, "inline")

    @app.get("/documents/{document_id}/download")
    async def document_download(request: Request, document_id: str) -> Response:
        return await _document_bytes(request, document_id, "attachment")

    # -- SOPs ------------------------------------------------------------------------------------------
    editor.register(app, web)  # before /sops/{institution}/{sop_id}: its paths are longer or not SOP ids
    changes.register(app, web)

    @app.get("/sops")
    async def sops(request: Request) -> Response:
        ws = await web.user(request)
        rows = await run_in_threadpool(library.sop_library_for, settings, ws.who)
        admin = await run_in_threadpool(sop_editor.admin_institutions, settings, ws.who)
        return web.render(ws, "sops.html", library=rows, admin=admin, new=editor.NEW)

    @app.get("/sops/{institution}/{sop_id}")
    async def sop_page(request: Request, institution: str, sop_id: str) -> Response:
        """The SOP file in force, readably, and its versions with their states (change control).
        Only for a reader with a role at the institution: anyone else gets the 404 of no such page."""
        ws = await web.reader(request, institution)
        versions = await run_in_threadpool(sop_editor.sop_versions, settings, institution, sop_id)
        try:
            sop = await run_in_threadpool(library.describe_sop, settings, institution, sop_id)
        except FlowsError as exc:
            if not versions:
                return web.error(ws, exc, 404)
            sop = None  # a new SOP's drafts, or one whose file is gone: its versions still show
        admin = await run_in_threadpool(sop_editor.is_sop_admin, settings, ws.who, institution)
        cc = await run_in_threadpool(team.change_control_people, settings, institution, ws.who)
        tz = await run_in_threadpool(library.institution_timezone, settings, institution) if versions else "UTC"
        return web.render(
            ws,
            "sop.html",
            sop=sop,
            versions=versions,
            institution=institution,
            sop_id=sop_id,
            admin=admin and sop_id != CHANGE_CONTROL_ID,
            cc=cc,
            tz=tz,
        )
