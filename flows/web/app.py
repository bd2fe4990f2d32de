"""Edge of the data path: the web app (FastAPI, server-rendered Jinja pages), thin over the services.

    create_app(settings)  the ASGI app ``sopflow web`` serves (uvicorn)

Routes here: sign-in and sessions, language, the inbox; the rest in ``flows.web.pages``.
Every page is rendered by a Jinja environment with autoescape on and the ``i18n`` extension,
one environment per language. Every POST checks the session's CSRF token before it reads
anything else (403, nothing written, when it is missing or wrong). Service calls run in a
worker thread (they hash passwords and talk to Prefect). Errors become a page that names the
problem; a traceback never reaches the browser.

Page templates live in ``flows/web/templates`` (package data), not in ``templates/``: that
folder is ``SOPFLOW_TEMPLATES_DIR``, where institutions keep controlled *document* templates
that document steps may name; pages are part of the program and ship with it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from flows import service_web as svc
from flows.config import Settings
from flows.errors import (
    AuthenticationError,
    FlowsError,
    NotAuthorizedError,
    RecordError,
    StepNotWaitingError,
)
from flows.web.i18n import HERE, N_, TEMPLATES, catalogue, pick_language
from flows.web.sessions import COOKIE, SessionStore, WebSession

__all__ = ["Web", "create_app"]

log = logging.getLogger("sopflow.web")

STATUS_WORDS = [
    N_("waiting"),
    N_("signed"),
    N_("done"),
    N_("failed"),
    N_("refused"),
    N_("not reached"),
    N_("scheduled"),
    N_("running"),
    N_("completed"),
    N_("rejected"),
    N_("stopped"),
    N_("unknown"),
    N_("skipped"),
    N_("open"),
    N_("performed"),
    N_("verified"),
    N_("approved"),
    N_("corrected"),
    N_("approve"),
    N_("reject"),
    N_("Decision"),
    N_("Reason (required to reject)"),
    N_("record"),
    N_("verify"),
    N_("check"),
    N_("document"),
    N_("notify"),
    N_("disposition"),
    N_("in_force"),
    N_("superseded"),
    N_("minor"),
    N_("major"),
    N_("critical"),
    N_("draft"),
    N_("in_review"),
    N_("issued"),
    N_("effective"),
    N_("retired"),
    N_("computed"),
]
"""Words the record holds that pages show translated (``{{ _(word) }}``)."""

CSRF_MESSAGE = N_(
    "This form has expired or did not come from this site (missing or wrong security token). Nothing was saved. Reload the page and try again."
)


def _local(value: Any, tz: str = "UTC") -> str:
    if value is None or value == "":
        return "—"
    dt = datetime.fromisoformat(value) if isinstance(value, str) else value
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M %Z")


def _dtlocal(value: Any, tz: str = "UTC") -> str:
    """A stored or entered date-time as a ``datetime-local`` input's value, in the zone ``tz``."""
    try:
        dt = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value or "")
    if dt.tzinfo is not None:
        dt = dt.astimezone(ZoneInfo(tz))
    return dt.strftime("%Y-%m-%dT%H:%M")


def _num(value: Any) -> Any:
    """A float as people write it, every digit kept: -200.0 → -200, 18.5 → 18.5."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else value


def _environment(language: str) -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        extensions=["jinja2.ext.i18n"],
        trim_blocks=True,
        lstrip_blocks=True,
    )
    cat = catalogue(language)
    env.install_gettext_callables(cat.gettext, cat.ngettext, newstyle=True)  # type: ignore[attr-defined]
    env.filters["local"] = _local
    env.filters["dtlocal"] = _dtlocal
    env.filters["num"] = _num
    # A word the record or the SOP holds, translated when the catalogue has it. Unlike ``_``, whose
    # result is trusted markup, this returns plain text: autoescape escapes it like any value.
    env.filters["t"] = lambda word: cat.gettext(str(word)) if word is not None else ""
    env.globals["lang"] = language
    return env


class Web:
    """What every route needs: settings, sessions, the page environments, rendering."""

    def __init__(self, settings: Settings, store: SessionStore | None = None) -> None:
        self.settings = settings
        self.store = store or SessionStore(settings.web_idle_minutes * 60)
        self.envs = {lang: _environment(lang) for lang in svc.LANGUAGES}
        self.prefect_ui = settings.api_url.removesuffix("/").removesuffix("/api")

    # -- sessions ----------------------------------------------------------------------------------
    async def session(self, request: Request) -> WebSession:
        """The request's session; a new anonymous one when there is none (an idle one is audited)."""
        live, expired = self.store.get(request.cookies.get(COOKIE))
        if expired is not None and expired.username:
            await run_in_threadpool(svc.sign_out, self.settings, expired.username, "idle")
            live = self.store.new(expired.language)
            live.flash.append(
                (
                    "error",
                    catalogue(live.language).gettext(
                        N_("Your session ended after %(minutes)s minutes without activity. Sign in again.")
                    )
                    % {"minutes": f"{self.settings.web_idle_minutes:g}"},
                )
            )
        if live is None:
            for gone in self.store.sweep():  # sessions nobody came back to: end them, audited
                if gone.username:
                    await run_in_threadpool(svc.sign_out, self.settings, gone.username, "idle")
            live = self.store.new(pick_language(request.headers.get("accept-language")))
        if request.method == "GET":
            live.here = _safe_next(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        return live

    async def user(self, request: Request) -> WebSession:
        """The signed-in session, or a redirect to the sign-in page (``Redirect`` is raised)."""
        ws = await self.session(request)
        if not ws.username:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise Redirect(f"/login?next={quote(target)}", ws)
        return ws

    async def form(self, request: Request, ws: WebSession) -> dict[str, str]:
        """The posted form, after its CSRF token was checked (``Forbidden`` is raised when it fails)."""
        data = await request.form()
        if not ws.csrf_ok(str(data.get("csrf") or "")):
            raise Forbidden(ws)
        return {k: str(v) for k, v in data.items() if isinstance(v, str)}

    # -- responses ---------------------------------------------------------------------------------
    def render(self, ws: WebSession, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        env = self.envs.get(ws.language, self.envs["en"])
        flash, ws.flash = ws.flash, []
        html = env.get_template(name).render(
            ws=ws, csrf=ws.csrf, flash=flash, now=datetime.now(UTC), prefect_ui=self.prefect_ui, **ctx
        )
        return self.secure(HTMLResponse(html, status_code=status), ws)

    def redirect(self, ws: WebSession, to: str) -> Response:
        return self.secure(RedirectResponse(to, status_code=303), ws)

    def secure(self, response: Response, ws: WebSession | None) -> Response:
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        )
        if ws is not None:  # Secure is added by the middleware when the request came over HTTPS
            response.set_cookie(COOKIE, ws.token, httponly=True, samesite="strict", path="/")
        return response

    def gettext(self, ws: WebSession, message: str) -> str:
        return catalogue(ws.language).gettext(message)

    def error(self, ws: WebSession, exc: Exception, status: int = 400) -> HTMLResponse:
        return self.render(ws, "error.html", status=status, message=_message(exc))


class Redirect(Exception):
    def __init__(self, to: str, ws: WebSession) -> None:
        self.to, self.ws = to, ws


class Forbidden(Exception):
    def __init__(self, ws: WebSession) -> None:
        self.ws = ws


def _message(exc: Exception) -> str:
    problems = getattr(exc, "problems", None)
    if problems:
        return "\n".join(str(p) for p in problems)
    return str(exc) or type(exc).__name__


def _status_of(exc: FlowsError) -> int:
    if isinstance(exc, AuthenticationError):
        return 401
    if isinstance(exc, NotAuthorizedError):
        return 403
    if isinstance(exc, StepNotWaitingError | RecordError) and ("no run" in str(exc) or "no document" in str(exc)):
        return 404
    return 400


def _safe_next(target: str | None) -> str:
    return (
        target if target and target.startswith("/") and not target.startswith("//") and "\\" not in target else "/inbox"
    )


def create_app(settings: Settings, store: SessionStore | None = None) -> FastAPI:
    """The web app over ``settings``' database, SOP folder and Prefect server."""
    from flows.web import pages

    web = Web(settings, store)
    app = FastAPI(title="sopflow", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.web = web
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def https_cookies(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        if request.url.scheme == "https" and "set-cookie" in response.headers:
            cookies = [v for k, v in response.raw_headers if k == b"set-cookie"]
            response.raw_headers[:] = [(k, v) for k, v in response.raw_headers if k != b"set-cookie"]
            for c in cookies:
                response.raw_headers.append((b"set-cookie", c if b"secure" in c.lower() else c + b"; Secure"))
        return response

    @app.exception_handler(Redirect)
    async def _redirect(request: Request, exc: Redirect) -> Response:
        return web.redirect(exc.ws, exc.to)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return web.render(exc.ws, "error.html", status=403, message=web.gettext(exc.ws, CSRF_MESSAGE))

    @app.exception_handler(FlowsError)
    async def _flows_error(request: Request, exc: FlowsError) -> Response:
        ws = await web.session(request)
        return web.error(ws, exc, _status_of(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        ws = await web.session(request)
        text = web.gettext(ws, N_("Page not found.")) if exc.status_code == 404 else str(exc.detail)
        return web.render(ws, "error.html", status=exc.status_code, message=text)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.exception("web request %s %s failed", request.method, request.url.path)
        ws = await web.session(request)
        return web.render(
            ws,
            "error.html",
            status=500,
            message=web.gettext(
                ws, N_("Something went wrong on the server; nothing was signed. The error is in the server log.")
            ),
        )

    @app.get("/")
    async def root(request: Request) -> Response:
        ws = await web.session(request)
        return web.redirect(ws, "/inbox" if ws.username else "/login")

    @app.get("/login")
    async def login_page(request: Request, next: str | None = None, lang: str | None = None) -> Response:
        ws = await web.session(request)
        if lang in svc.LANGUAGES:
            ws.language = lang
        return web.render(ws, "login.html", next=_safe_next(next), username="", error=None)

    @app.post("/login")
    async def login(request: Request) -> Response:
        ws = await web.session(request)
        form = await web.form(request, ws)
        username, target = form.get("username", "").strip(), _safe_next(form.get("next"))
        try:
            user = await run_in_threadpool(svc.web_sign_in, settings, username, form.get("password", ""))
            chosen = await run_in_threadpool(svc.language_of, settings, user.username)
        except AuthenticationError as exc:
            return web.render(ws, "login.html", status=401, next=target, username=username, error=str(exc))
        fresh = web.store.sign_in(ws, user.username, user.printed_name, chosen or ws.language)
        return web.redirect(fresh, target)

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        ws = await web.session(request)
        await web.form(request, ws)
        web.store.end(ws.token)
        if ws.username:
            await run_in_threadpool(svc.sign_out, settings, ws.username, "logout")
        fresh = web.store.new(ws.language)
        fresh.flash.append(("ok", web.gettext(fresh, N_("You are signed out."))))
        return web.redirect(fresh, "/login")

    @app.post("/language")
    async def language(request: Request) -> Response:
        ws = await web.session(request)
        form = await web.form(request, ws)
        lang = form.get("language", "")
        if lang not in svc.LANGUAGES:
            return web.render(ws, "error.html", status=400, message=f"language {lang!r}: expected one of en, zh")
        if ws.username:
            await run_in_threadpool(svc.set_language, settings, ws.username, lang)
        ws.language = lang
        return web.redirect(ws, _safe_next(form.get("back")))

    @app.get("/inbox")
    async def inbox(request: Request) -> Response:
        ws = await web.user(request)
        items = await run_in_threadpool(svc.urgent_inbox, settings, ws.username)
        return web.render(ws, "inbox.html", items=items)

    @app.get("/inbox/items")
    async def inbox_items(request: Request) -> Response:
        """The inbox list alone: the page's script fetches it every few seconds."""
        ws, expired = web.store.get(request.cookies.get(COOKIE), touch=False)
        if expired is not None and expired.username:
            await run_in_threadpool(svc.sign_out, settings, expired.username, "idle")
        if ws is None or not ws.username:
            return Response(status_code=401)
        items = await run_in_threadpool(svc.urgent_inbox, settings, ws.username)
        return web.render(ws, "_inbox_items.html", items=items)

    pages.register(app, web)
    return app
