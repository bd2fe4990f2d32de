"""Edge: the web's pages for people and training (issue 14): my training, my team's and what is
overdue (``/training``); for QA officers the users and roles of their institutions, adding a user
and recording training (``/people``). The rules stay in the floor (``accounts.add_user``,
``training.grant_training``, ``flows.services.guard``); a refusal is shown, audited there.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from flows.errors import FlowsError
from flows.services import accounts, team, training
from flows.services.guard import Officer
from flows.services.phrases import translate
from flows.web.base import Web, message_of
from flows.web.i18n import N_

__all__ = ["register"]

WORDS = [N_("trained"), N_("due"), N_("not_trained"), N_("overdue")]
"""Training states as the training page shows them (``{{ status|t }}``)."""


def register(app: FastAPI, web: Web) -> None:
    settings = web.settings

    @app.get("/training")
    async def training_page(request: Request) -> Response:
        ws = await web.user(request)
        found = await run_in_threadpool(lambda: team.training_status(settings, ws.who, language=ws.language))
        return web.render(ws, "training.html", training=found, tz="Asia/Shanghai")

    @app.get("/people")
    async def people_page(request: Request) -> Response:
        ws = await web.user(request)
        listed = await run_in_threadpool(team.people, settings, ws.who, ws.language)
        return web.render(ws, "people.html", listed=listed)

    @app.post("/people/users")
    async def add_user(request: Request) -> Response:
        ws = await web.user(request)
        form = await web.form(request, ws)
        institution = form.get("institution", "")
        grants = [(institution, form[k].strip()) for k in sorted(form) if k.startswith("role.") and form[k].strip()]
        try:
            await run_in_threadpool(
                lambda: accounts.add_user(
                    settings,
                    form.get("username", "").strip(),
                    form.get("printed_name", "").strip(),
                    form.get("new_password", ""),
                    grants,
                    officer=Officer(ws.who, form.get("password", "")),
                )
            )
        except FlowsError as exc:
            ws.flash.append(("error", translate(message_of(exc), ws.language)))
        else:
            ws.flash.append(
                ("ok", web.gettext(ws, N_("User added. They sign in with the password you gave and should change it.")))
            )
        return web.redirect(ws, "/people")

    @app.post("/people/training")
    async def grant(request: Request) -> Response:
        ws = await web.user(request)
        form = await web.form(request, ws)
        sop_id, _, version = form.get("sop_version", "").partition(":")
        try:
            await run_in_threadpool(
                lambda: training.grant_training(
                    settings,
                    form.get("username", "").strip(),
                    form.get("institution", ""),
                    sop_id,
                    int(version) if version.isdigit() else 0,
                    officer=Officer(ws.who, form.get("password", "")),
                    trainer=form.get("trainer") or None,
                )
            )
        except FlowsError as exc:
            ws.flash.append(("error", translate(message_of(exc), ws.language)))
        else:
            ws.flash.append(("ok", web.gettext(ws, N_("Training recorded."))))
        return web.redirect(ws, request.query_params.get("back") or "/people")
