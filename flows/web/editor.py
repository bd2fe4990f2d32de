"""Edge: the web pages of SOP change control (issue 6): the administrators' editor, the diff
between two versions. (An SOP page's versions are on the SOP page, ``flows.web.pages``.)

Thin, like ``flows.web.pages``: each route calls one service of ``flows.services.editor`` and renders
the result. The editor's script (``static/app.js``) posts the text, with the CSRF token, to
``…/check`` as the administrator types and shows the problems it returns next to their line;
"Save as draft" posts the form (the password is asked: ``create_draft`` signs the user in again,
checks the role and audits a refusal). Routes are registered before ``/sops/{institution}/{sop_id}``.

    GET  /sops/{institution}/new-sop            editor for a new SOP (administrators)
    POST /sops/{institution}/new-sop            save it as a Draft (v1, or above its versions)
    POST /sops/{institution}/new-sop/check      problems and schema names as JSON ({ok, problems, fields};
                                                a refusal {ok: false, error, errors, status})
    GET  /sops/{institution}/{sop_id}/edit      editor on the newest version, numbered one above
    POST /sops/{institution}/{sop_id}/edit      save as a Draft
    POST /sops/{institution}/{sop_id}/edit/check
    GET  /sops/{institution}/{sop_id}/diff?old=V1&new=V2   what changed (``sopflow sop diff``)

Every route is for a reader with a role at the institution (``Web.reader``); anyone else gets the
404 of a page that does not exist.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from flows.errors import (
    AuthenticationError,
    ChangeControlError,
    FlowsError,
    SopDefinitionError,
)
from flows.services import editor as sop_editor
from flows.services import guard
from flows.web.base import CSRF_MESSAGE, Forbidden, Web, status_of
from flows.web.i18n import N_

__all__ = ["NEW", "register"]

NEW = "new-sop"
"""The path segment of a new SOP's editor (not an SOP id: ids have no ``-``)."""

CHANGE_WORDS = [N_("added"), N_("removed"), N_("moved"), N_("changed")]
"""The kinds of change the diff page shows translated."""


def _problems(exc: Exception) -> list[dict[str, Any]]:
    found = getattr(exc, "problems", None)
    if found:
        return [{"line": p.line, "path": p.path, "message": p.message, "text": str(p)} for p in found]
    return [{"line": None, "path": "", "message": str(exc), "text": str(exc)}]


def register(app: FastAPI, web: Web) -> None:
    settings = web.settings

    async def _editor(
        request: Request,
        institution: str,
        sop_id: str | None,
        status: int = 200,
        *,
        text: str | None = None,
        problems: list[dict[str, Any]] | None = None,
        reason: str = "",
        save_error: str | None = None,
    ) -> Response:
        ws = await web.reader(request, institution)
        await run_in_threadpool(guard.require_sop_admin, settings, ws.who, institution)
        start = await run_in_threadpool(sop_editor.editor_start, settings, institution, sop_id)
        checked = await run_in_threadpool(
            sop_editor.check_text, settings, ws.who, institution, start["text"] if text is None else text, sop_id
        )
        base = f"/sops/{institution}/{sop_id}/edit" if sop_id else f"/sops/{institution}/{NEW}"
        return web.render(
            ws,
            "editor.html",
            status=status,
            institution=institution,
            sop_id=sop_id,
            start=start,
            text=start["text"] if text is None else text,
            action=base,
            check_url=base + "/check",
            problems=checked["problems"] if problems is None else problems,
            fields=checked["fields"],
            reason=reason,
            save_error=save_error,
        )

    async def _save(request: Request, institution: str, sop_id: str | None) -> Response:
        ws = await web.user(request)
        form = await web.form(request, ws)
        await web.require_reader(ws, institution)
        text, reason = form.get("text", "").replace("\r\n", "\n"), form.get("reason", "")
        try:  # NotAuthorizedError goes to the error page (403): refused and audited by the service
            saved = await run_in_threadpool(
                sop_editor.save_draft,
                settings,
                ws.who,
                form.get("password", ""),
                institution,
                text,
                sop_id,
                reason,
            )
        except AuthenticationError as exc:
            return await _editor(request, institution, sop_id, 401, text=text, reason=reason, save_error=str(exc))
        except (SopDefinitionError, ChangeControlError) as exc:
            return await _editor(
                request,
                institution,
                sop_id,
                422,
                text=text,
                reason=reason,
                problems=_problems(exc),
                save_error=web.gettext(ws, N_("Not saved: the text has problems (listed below).")),
            )
        ws.flash.append(
            (
                "ok",
                web.gettext(ws, N_("Draft v%(version)s of %(sop)s saved. sha256 %(sha)s"))
                % {"version": saved["version"], "sop": saved["sop_id"], "sha": saved["sha256"]},
            )
        )
        return web.redirect(ws, f"/sops/{institution}/{saved['sop_id']}")

    async def _check(request: Request, institution: str, sop_id: str | None) -> Response:
        """JSON for the editor's script: ``{ok: true, problems, fields}``, or on a refusal
        ``{ok: false, error, errors, status}`` with that HTTP status (403 without the CSRF token)."""
        ws = await web.user(request)

        def refused(status: int, error: str, errors: list[str] | None = None) -> Response:
            body = {"ok": False, "error": error, "errors": errors or [error], "status": status}
            return web.secure(JSONResponse(body, status_code=status), ws)

        try:
            form = await web.form(request, ws)
        except Forbidden:
            return refused(403, web.gettext(ws, CSRF_MESSAGE))
        await web.require_reader(ws, institution)
        try:
            checked = await run_in_threadpool(
                sop_editor.check_text,
                settings,
                ws.who,
                institution,
                form.get("text", "").replace("\r\n", "\n"),
                sop_id,
            )
        except FlowsError as exc:
            return refused(status_of(exc), str(exc), [str(p) for p in getattr(exc, "problems", None) or [exc]])
        return web.secure(JSONResponse({"ok": True, **checked}), ws)

    @app.get(f"/sops/{{institution}}/{NEW}")
    async def new_sop(request: Request, institution: str) -> Response:
        return await _editor(request, institution, None)

    @app.post(f"/sops/{{institution}}/{NEW}")
    async def new_sop_save(request: Request, institution: str) -> Response:
        return await _save(request, institution, None)

    @app.post(f"/sops/{{institution}}/{NEW}/check")
    async def new_sop_check(request: Request, institution: str) -> Response:
        return await _check(request, institution, None)

    @app.get("/sops/{institution}/{sop_id}/edit")
    async def edit_sop(request: Request, institution: str, sop_id: str) -> Response:
        return await _editor(request, institution, sop_id)

    @app.post("/sops/{institution}/{sop_id}/edit")
    async def edit_sop_save(request: Request, institution: str, sop_id: str) -> Response:
        return await _save(request, institution, sop_id)

    @app.post("/sops/{institution}/{sop_id}/edit/check")
    async def edit_sop_check(request: Request, institution: str, sop_id: str) -> Response:
        return await _check(request, institution, sop_id)

    @app.get("/sops/{institution}/{sop_id}/diff")
    async def diff(
        request: Request, institution: str, sop_id: str, old: str | None = None, new: str | None = None
    ) -> Response:
        ws = await web.reader(request, institution)
        changes = await run_in_threadpool(sop_editor.version_diff, settings, institution, sop_id, old, new)
        return web.render(ws, "diff.html", diff=changes)
