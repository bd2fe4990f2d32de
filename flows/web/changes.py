"""Edge: change control from an SOP's page (issue 14): submit a Draft (``drafts.submit_change``: the
change-control run starts and the author's submission is signed), record a periodic review and
retire the SOP (``versions.record_review`` / ``versions.retire``, QA). The review and QA approval
of a change are steps of its change-control run, signed on their step pages like any other.
Each form asks for the password; a refusal comes back as a message in the reader's language.
Someone with no role at the institution gets the 404 of no such page (``Web.reader``).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from flows.errors import FlowsError
from flows.services import drafts, versions
from flows.services.guard import Officer
from flows.services.phrases import translate
from flows.web.base import Web, message_of
from flows.web.i18n import N_

__all__ = ["register"]


def register(app: FastAPI, web: Web) -> None:
    settings = web.settings

    @app.post("/sops/{institution}/{sop_id}/submit")
    async def submit(request: Request, institution: str, sop_id: str) -> Response:
        ws = await web.user(request)
        form = await web.form(request, ws)
        await web.require_reader(ws, institution)
        number = form.get("version", "")
        try:
            run_id = await run_in_threadpool(
                lambda: drafts.submit_change(
                    settings,
                    institution,
                    sop_id,
                    int(number) if number.isdigit() else 0,
                    reviewer=form.get("reviewer", ""),
                    reason=form.get("reason", ""),
                    username=ws.who,
                    password=form.get("password", ""),
                )
            )
        except FlowsError as exc:
            ws.flash.append(("error", translate(message_of(exc), ws.language)))
            return web.redirect(ws, f"/sops/{institution}/{sop_id}")
        ws.flash.append(
            (
                "ok",
                web.gettext(
                    ws,
                    N_(
                        "Submitted: the change is in review. Its change-control run waits on the named reviewer, then QA."
                    ),
                ),
            )
        )
        return web.redirect(ws, f"/runs/{run_id}")

    @app.post("/sops/{institution}/{sop_id}/review")
    async def review(request: Request, institution: str, sop_id: str) -> Response:
        ws = await web.user(request)
        form = await web.form(request, ws)
        await web.require_reader(ws, institution)
        months = form.get("months", "")
        try:
            res = await run_in_threadpool(
                lambda: versions.record_review(
                    settings,
                    institution,
                    sop_id,
                    Officer(ws.who, form.get("password", "")),
                    note=form.get("note", ""),
                    months=int(months) if months.isdigit() else None,
                )
            )
        except FlowsError as exc:
            ws.flash.append(("error", translate(message_of(exc), ws.language)))
        else:
            ws.flash.append(
                (
                    "ok",
                    web.gettext(ws, N_("Periodic review recorded; next review due %(date)s."))
                    % {"date": res["review_due"][:10]},
                )
            )
        return web.redirect(ws, f"/sops/{institution}/{sop_id}")

    @app.post("/sops/{institution}/{sop_id}/retire")
    async def retire(request: Request, institution: str, sop_id: str) -> Response:
        ws = await web.user(request)
        form = await web.form(request, ws)
        await web.require_reader(ws, institution)
        try:
            await run_in_threadpool(
                lambda: versions.retire(
                    settings,
                    institution,
                    sop_id,
                    Officer(ws.who, form.get("password", "")),
                    reason=form.get("reason", ""),
                )
            )
        except FlowsError as exc:
            ws.flash.append(("error", translate(message_of(exc), ws.language)))
        else:
            ws.flash.append(("ok", web.gettext(ws, N_("Retired: no new run may start on this SOP."))))
        return web.redirect(ws, f"/sops/{institution}/{sop_id}")
