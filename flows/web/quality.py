"""Edge: the web's quality pages (issue 14): deviations (list, raise by hand from a run or a dose,
one deviation with its dispositions and CAPA actions), the chain of identity of a dose, the quality
manager's dashboard, and corrections of a signed entry.

Thin like every page module: read the form (CSRF checked in ``Web.form``), call one service, render
its result or its problems (in the reader's language through ``|msg``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from flows.errors import AuthenticationError, FlowsError, NotAuthorizedError, SopInputError, StepNotWaitingError
from flows.services import dashboard, deviations, library, signing, views
from flows.services.phrases import translate
from flows.web.base import Web
from flows.web.charts import bars
from flows.web.i18n import N_
from flows.web.pages import PREFIX, _values, field_errors

__all__ = ["register"]

WORDS = [
    N_("dispositioned"),
    N_("closed"),
    N_("contained"),
    N_("mah_notified"),
    N_("investigated"),
    N_("capa"),
    N_("effectiveness"),
    N_("subrun"),
    N_("use"),
    N_("use_with_risk_acceptance"),
    N_("not_product_related"),
]
"""Deviation states and lifecycle words the pages show translated (``{{ word|t }}``)."""


def register(app: FastAPI, web: Web) -> None:
    settings = web.settings

    # -- deviations ------------------------------------------------------------------------------------
    @app.get("/deviations")
    async def deviation_list(request: Request) -> Response:
        ws = await web.user(request)
        listed = await run_in_threadpool(deviations.deviation_list, settings, ws.who)
        return web.render(ws, "deviations.html", listed=listed, tz="Asia/Shanghai")

    async def _raise_page(
        ws: Any, query: dict[str, str], status: int = 200, problems: list[str] | None = None
    ) -> Response:
        return web.render(
            ws,
            "deviation_new.html",
            status=status,
            run_id=query.get("run", ""),
            coi=query.get("coi", ""),
            values=query,
            problems=problems or [],
            classifications=deviations.CLASSIFICATIONS,
        )

    @app.get("/deviations/new")
    async def deviation_new(request: Request) -> Response:
        ws = await web.user(request)
        return await _raise_page(ws, dict(request.query_params))

    @app.post("/deviations/new")
    async def deviation_raise(request: Request) -> Response:
        ws = await web.user(request)
        form = await web.form(request, ws)
        try:
            res = await run_in_threadpool(
                lambda: deviations.raise_deviation(
                    settings,
                    username=ws.who,
                    password=form.get("password", ""),
                    classification=form.get("classification", ""),
                    description=form.get("description", ""),
                    run_id=form.get("run") or None,
                    coi=form.get("coi") or None,
                    quarantine=form.get("quarantine") == "yes",
                )
            )
        except FlowsError as exc:
            problems = getattr(exc, "problems", None) or [str(exc)]
            status = (
                401 if isinstance(exc, AuthenticationError) else 403 if isinstance(exc, NotAuthorizedError) else 422
            )
            return await _raise_page(ws, form, status, [str(p) for p in problems])
        ws.flash.append(("ok", web.gettext(ws, N_("Deviation raised and recorded."))))
        if res["handling_run_id"]:
            ws.flash.append(
                (
                    "ok",
                    web.gettext(
                        ws,
                        N_(
                            "Its handling run has started: containment, investigation, dispositions and CAPA follow there."
                        ),
                    ),
                )
            )
        elif res["handling_problem"]:
            ws.flash.append(("error", translate(res["handling_problem"], ws.language)))
        return web.redirect(ws, f"/deviations/{res['deviation_id']}")

    @app.get("/deviations/{deviation_id}")
    async def deviation_page(request: Request, deviation_id: str) -> Response:
        ws = await web.user(request)
        dev = await run_in_threadpool(deviations.deviation_detail, settings, ws.who, deviation_id)
        tz = await run_in_threadpool(library.institution_timezone, settings, dev["institution"] or "")
        return web.render(ws, "deviation.html", dev=dev, tz=tz)

    # -- chain of identity -------------------------------------------------------------------------------
    @app.get("/chain")
    async def chain_page(request: Request, coi: str = "") -> Response:
        ws = await web.user(request)
        chain = await run_in_threadpool(deviations.chain_for, settings, ws.who, coi) if coi.strip() else None
        return web.render(ws, "chain.html", coi=coi.strip(), chain=chain, tz="Asia/Shanghai")

    # -- dashboard -----------------------------------------------------------------------------------------
    @app.get("/dashboard")
    async def dashboard_page(request: Request) -> Response:
        ws = await web.user(request)
        board = await run_in_threadpool(dashboard.quality_dashboard, settings, ws.who)
        charts = {
            "stages": bars([(k, len(v)) for k, v in board["open_by_stage"].items()]),
            "months": bars([(m["month"][5:], m["count"]) for m in board["deviations_by_month"]]),
            "receipt": bars([(r["coi"][-6:], r["days"]) for r in board["receipt_to_infusion"]]),
        }
        return web.render(ws, "dashboard.html", board=board, charts=charts, tz="Asia/Shanghai")

    # -- corrections -----------------------------------------------------------------------------------------
    async def _correct_page(
        ws: Any,
        run_id: str,
        step_id: str,
        status: int = 200,
        *,
        values: dict[str, Any] | None = None,
        errors: dict[str, list[str]] | None = None,
        general: list[str] | None = None,
        reason: str = "",
    ) -> Response:
        form = await run_in_threadpool(views.correction_view, settings, run_id, step_id, ws.who, ws.language)
        return web.render(
            ws,
            "correct.html",
            status=status,
            form=form,
            values=values if values is not None else form["current"],
            errors=errors or {},
            general=general or [],
            reason=reason,
            prefix=PREFIX,
        )

    @app.get("/runs/{run_id}/steps/{step_id}/correct")
    async def correct_page(request: Request, run_id: str, step_id: str) -> Response:
        ws = await web.user(request)
        return await _correct_page(ws, run_id, step_id)

    @app.post("/runs/{run_id}/steps/{step_id}/correct")
    async def correct(request: Request, run_id: str, step_id: str) -> Response:
        ws = await web.user(request)
        posted = await web.form(request, ws)
        form = await run_in_threadpool(views.correction_view, settings, run_id, step_id, ws.who, ws.language)
        values = _values(posted, form["fields"], form["timezone"])
        reason = posted.get("reason", "")
        try:
            res = await run_in_threadpool(
                signing.correct_step, settings, run_id, step_id, ws.who, posted.get("password", ""), values, reason
            )
        except SopInputError as exc:
            errors, general = field_errors(exc.problems, [f["name"] for f in form["fields"]])
            return await _correct_page(
                ws, run_id, step_id, 422, values=values, errors=errors, general=general, reason=reason
            )
        except (AuthenticationError, NotAuthorizedError, StepNotWaitingError) as exc:
            status = (
                401 if isinstance(exc, AuthenticationError) else 403 if isinstance(exc, NotAuthorizedError) else 409
            )
            return await _correct_page(ws, run_id, step_id, status, values=values, general=[str(exc)], reason=reason)
        ws.flash.append(
            (
                "ok",
                web.gettext(ws, N_("Corrected. The earlier entry stays in the record; signature sha256: %(sha)s"))
                % {"sha": res.signed_sha256},
            )
        )
        return web.redirect(ws, f"/runs/{res.run_id}")
