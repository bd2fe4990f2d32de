"""Edge of the data path: the web app (FastAPI, server-rendered Jinja pages), thin over ``flows.services``.

    create_app(settings)  the ASGI app ``sopflow web`` serves (uvicorn)
    from_environment()    the same over the environment's settings: each ``--workers`` process's app

Routes here: sign-in and sessions, language, the inbox; the rest in ``flows.web.pages`` and
``flows.web.editor``; what they share in ``flows.web.base``.
Every page is rendered by a Jinja environment with autoescape on and the ``i18n`` extension,
one environment per language. Every POST checks the session's CSRF token before it reads
anything else (403, nothing written, when it is missing or wrong). Service calls run in a
worker thread (they hash passwords and talk to Prefect). Errors become a page that names the
problem; a traceback never reaches the browser. Every response carries ``EVERY_RESPONSE``'s headers
(Permissions-Policy among them), and one that came over HTTPS (directly, or from a proxy in
``SOPFLOW_TRUSTED_PROXIES`` saying ``X-Forwarded-Proto: https``) HSTS too. Whatever is not there,
or not the reader's (a run of an institution where they hold no role), is one 404 page.

Page templates live in ``flows/web/templates`` (package data), not in ``templates/``: that
folder is ``SOPFLOW_TEMPLATES_DIR``, where institutions keep controlled *document* templates
that document steps may name; pages are part of the program and ship with it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flows.config import Settings, db_pool, get_settings
from flows.errors import AuthenticationError, FlowsError, ThrottledError
from flows.services import accounts, database, guard, inbox, views
from flows.services.phrases import translate
from flows.web import api, pages, people, quality
from flows.web.base import CSRF_MESSAGE, EVERY_RESPONSE, HSTS, Forbidden, Redirect, Web, client_of, safe_next, status_of
from flows.web.i18n import HERE, N_
from flows.web.sessions import COOKIE, SessionStore, WebSession

__all__ = ["create_app"]

log = logging.getLogger("sopflow.web")

INBOX_PAGE = 20
"""Inbox items on a page, the most urgent first; the rest on the next pages."""


def from_environment() -> FastAPI:
    """The app over the settings in the environment: what each ``sopflow web --workers N`` process serves."""
    return create_app(get_settings())


def create_app(settings: Settings, store: SessionStore | None = None) -> FastAPI:
    """The web app over ``settings``' database, SOP folder and Prefect server.

    Raises:
        SchemaVersionError: the database is behind or ahead of this sopflow (``sopflow db upgrade``).
    """
    database.require_current(settings)  # refuse before serving a page
    web = Web(settings, store)
    app = FastAPI(title="sopflow", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_threads_as_connections)
    app.state.web = web
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.mount("/api/v1", api.create_api(settings))  # the integration API (JSON, its own OpenAPI)

    app.add_middleware(_EveryResponse)  # outermost: pages, the API, static files and errors alike

    @app.exception_handler(Redirect)
    async def _redirect(request: Request, exc: Redirect) -> Response:
        return web.redirect(exc.ws, exc.to)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return web.render(exc.ws, "error.html", status=403, message=web.gettext(exc.ws, CSRF_MESSAGE))

    @app.exception_handler(FlowsError)
    async def _flows_error(request: Request, exc: FlowsError) -> Response:
        ws = await web.session(request)
        status = status_of(exc)
        if status == 404:  # one page for whatever is not there (or not theirs): nothing of the path in it
            ws.here = "/inbox"
        return web.error(ws, exc, status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith(
            "/api/"
        ):  # a path the mount's pattern does not take (a newline in it): still JSON
            return api.http_error(exc)
        ws = await web.session(request)
        if exc.status_code == 404:
            ws.here = "/inbox"
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
        if lang in accounts.LANGUAGES:
            ws.language = lang
        return web.render(ws, "login.html", next=safe_next(next), username="", error=None)

    @app.post("/login")
    async def login(request: Request) -> Response:
        ws = await web.session(request)
        form = await web.form(request, ws)
        username, target = form.get("username", "").strip(), safe_next(form.get("next"))
        try:
            user = await run_in_threadpool(accounts.web_sign_in, settings, username, form.get("password", ""))
            chosen = await run_in_threadpool(accounts.language_of, settings, user.username)
        except AuthenticationError as exc:
            response = web.render(
                ws,
                "login.html",
                status=429 if isinstance(exc, ThrottledError) else 401,
                next=target,
                username=username,
                error=translate(str(exc), ws.language),
            )
            if isinstance(exc, ThrottledError):
                response.headers["Retry-After"] = str(max(1, math.ceil(exc.seconds)))
            return response
        fresh = web.store.sign_in(ws, user.username, user.printed_name, chosen or ws.language)
        try:  # their part of what waits, worked out now, so their first inbox page is not the slow one
            await run_in_threadpool(inbox.warm, settings, user.username)
        except FlowsError as exc:  # the inbox says it when asked; signing in does not depend on this
            log.warning("the inbox of %s was not read ahead: %s", user.username, exc)
        return web.redirect(fresh, target)

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        ws = await web.session(request)
        await web.form(request, ws)
        web.store.end(ws.token)
        if ws.username:
            await run_in_threadpool(accounts.sign_out, settings, ws.who, "logout")
        fresh = web.store.new(ws.language)
        fresh.flash.append(("ok", web.gettext(fresh, N_("You are signed out."))))
        return web.redirect(fresh, "/login")

    @app.post("/language")
    async def language(request: Request) -> Response:
        ws = await web.session(request)
        form = await web.form(request, ws)
        lang = form.get("language", "")
        if lang not in accounts.LANGUAGES:
            return web.render(ws, "error.html", status=400, message=f"language {lang!r}: expected one of en, zh")
        if ws.username:
            await run_in_threadpool(accounts.set_language, settings, ws.who, lang)
        ws.language = lang
        return web.redirect(ws, safe_next(form.get("back")))

    def inbox_page_of(request: Request) -> int | None:
        """The inbox page asked for (1 when none; None when it is not a whole number from 1)."""
        raw = request.query_params.get("page", "1")
        return int(raw) if raw.isdigit() and 0 < int(raw) < 10**6 else None

    async def inbox_list(ws: WebSession, page: int) -> dict[str, Any]:
        first = (page - 1) * INBOX_PAGE
        items, total = await run_in_threadpool(
            lambda: views.inbox_view(settings, ws.who, ws.language, first=first, limit=INBOX_PAGE)
        )
        return {
            "items": views.inbox_cards(items),
            "total": total,
            "page": page,
            "first": first + 1,
            "last": first + len(items),
            "pages": max(1, math.ceil(total / INBOX_PAGE)),
        }

    @app.get("/inbox")
    async def inbox_page(request: Request) -> Response:
        ws = await web.user(request)
        page = inbox_page_of(request)
        if page is None:
            return web.render(ws, "error.html", status=400, message="page: expected a whole number from 1")
        listed = await inbox_list(ws, page)
        return web.render(ws, "inbox.html", page=page, items_html=web.fragment(ws, "_inbox_items.html", **listed))

    @app.get("/inbox/items")
    async def inbox_items(request: Request) -> Response:
        """The inbox list alone: the page's script fetches it every few seconds."""
        ws, expired = web.store.get(request.cookies.get(COOKIE), touch=False)
        if expired is not None and expired.username:
            await run_in_threadpool(accounts.sign_out, settings, expired.username, "idle")
        if ws is None or not ws.username:
            return Response(status_code=401)
        page = inbox_page_of(request)
        if page is None:
            return Response(status_code=400)
        html = web.fragment(ws, "_inbox_items.html", **await inbox_list(ws, page))
        return web.secure(HTMLResponse(html), ws)  # the list alone: the session's messages wait for a page

    pages.register(app, web)
    quality.register(app, web)  # deviations, chain of identity, dashboard, corrections
    people.register(app, web)  # training status, users and roles
    return app


@asynccontextmanager
async def _threads_as_connections(app: FastAPI) -> AsyncIterator[None]:
    """Request work runs in at most as many threads as the database pool keeps connections
    (``SOPFLOW_DB_POOL_SIZE``; anyio's default is 40): more threads only take turns at the
    interpreter lock and open overflow connections; a request past them waits its turn on the event
    loop instead. The inbox's board of what waits is read before the first request."""
    anyio.to_thread.current_default_thread_limiter().total_tokens = db_pool().size
    await anyio.to_thread.run_sync(app.state.web.compile_pages)
    try:  # what waits, read once before the first reader asks (each reader's part at their sign-in)
        await anyio.to_thread.run_sync(inbox.warm, app.state.web.settings)
    except FlowsError as exc:  # the pages say it when asked; serving them does not depend on this
        log.warning("the inbox was not read ahead: %s", exc)
    yield


class _EveryResponse:
    """Pure ASGI middleware (no task per request, unlike ``@app.middleware``): sign-ins in the
    request come from its client until ``Web.user`` knows the session's user; every response gets
    ``EVERY_RESPONSE``'s headers, and one that came over HTTPS (uvicorn sets the scheme from a
    trusted proxy's X-Forwarded-Proto) HSTS and ``Secure`` on every cookie."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard.set_channel(guard.Channel(client=client_of(Request(scope))))
        https = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", []))
                if https:
                    raw = [
                        (k, v + b"; Secure" if k.lower() == b"set-cookie" and b"secure" not in v.lower() else v)
                        for k, v in raw
                    ]
                headers = MutableHeaders(raw=raw)
                for name, value in EVERY_RESPONSE.items():
                    if name not in headers:
                        headers[name] = value
                if https:
                    headers["Strict-Transport-Security"] = HSTS
                message = {**message, "headers": headers.raw}
            await send(message)

        await self.app(scope, receive, send_with_headers)
