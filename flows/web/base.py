"""Edge of the data path: what every page of the web app shares. ``Web`` (settings, sessions, one
Jinja environment per language, rendering, security headers), the page filters, the exceptions
routes raise (``Redirect``, ``Forbidden``) and ``status_of``, which maps error classes (never
their words) to HTTP status codes. Routes: ``flows.web.app`` (sign-in, language, inbox),
``flows.web.pages`` (runs, steps, documents, SOPs) and ``flows.web.editor`` (the SOP editor).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, pass_eval_context, select_autoescape
from jinja2.nodes import EvalContext
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from flows.config import Settings
from flows.errors import AuthenticationError, FlowsError, NotAuthorizedError, NotFoundError
from flows.services import accounts, guard, library
from flows.services.phrases import translate
from flows.sop.model import text_in
from flows.web.i18n import N_, TEMPLATES, catalogue, pick_language
from flows.web.sessions import COOKIE, SessionStore, WebSession

__all__ = [
    "CSRF_MESSAGE",
    "EVERY_RESPONSE",
    "HSTS",
    "Forbidden",
    "Redirect",
    "Web",
    "client_of",
    "message_of",
    "safe_next",
    "status_of",
]

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


EVERY_RESPONSE = {
    "Permissions-Policy": (
        "camera=(), microphone=(), geolocation=(), payment=(), usb=(), serial=(), bluetooth=(), "
        "hid=(), midi=(), display-capture=(), interest-cohort=()"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
"""Headers on every response (pages, the API, static files); pages add theirs in ``Web.secure``.
The pages use no device (a barcode scanner types like a keyboard): every powerful feature is off."""
HSTS = "max-age=31536000; includeSubDomains"
"""Strict-Transport-Security, sent only on a response to a request that came over HTTPS."""


def client_of(request: Request) -> str:
    """The client a sign-in comes from: its address (uvicorn takes it from ``X-Forwarded-For`` only
    when the proxy is in ``SOPFLOW_TRUSTED_PROXIES``)."""
    return f"ip:{request.client.host if request.client else 'unknown'}"


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
        auto_reload=False,  # the pages ship with the program: no stat of every template on every render
    )
    cat = catalogue(language)
    env.install_gettext_callables(cat.gettext, cat.ngettext, newstyle=True)  # type: ignore[attr-defined]

    @pass_eval_context
    def gettext(eval_ctx: EvalContext, message: str, **variables: Any) -> str:
        """``_()`` as Jinja's new-style gettext gives it (the catalogue's text, trusted markup under
        autoescape, always %-formatted with the escaped variables), without its two indirections
        (``_`` resolves ``gettext`` in the context at every call): a page of 20 inbox cards makes
        ~80 calls, and this halves their cost."""
        rv = cat.gettext(message)  # the catalogue's own text, trusted as Jinja's gettext trusts it
        return (Markup(rv) if eval_ctx.autoescape else rv) % variables  # noqa: S704

    env.globals["_"] = gettext
    env.filters["local"] = _local
    env.filters["dtlocal"] = _dtlocal
    env.filters["num"] = _num
    # A word the record or the SOP holds, translated when the catalogue has it. Unlike ``_``, whose
    # result is trusted markup, this returns plain text: autoescape escapes it like any value.
    # SOP text given in several languages (``title: {en: …, zh: …}``) is shown in the page's language.
    env.filters["t"] = lambda word: (
        ""
        if word is None
        else text_in(word, language)
        if getattr(word, "translations", None)
        else cat.gettext(str(word))
    )
    # A service's message (a refusal, a problem) in the page's language; the English text stays the CLI's.
    env.filters["msg"] = lambda text: translate(str(text), language) if text is not None else ""
    env.globals["lang"] = language
    return env


FRAGMENTS_KEPT = 512
"""Rendered page parts a web process keeps (``Web.fragment``), the least recently asked for dropped
first: an inbox list is ~15 KB, so at most ~8 MB."""


def _frozen(value: Any) -> Any:
    """``value`` as a hashable key that is equal only for values a template prints alike: dicts,
    lists and tuples by their contents, SOP text in several languages by every translation (as a
    ``str`` it equals its first one alone, and ``|t`` prints the page's), floats by their digits
    (``0.0`` and ``-0.0`` are equal), anything else with its type (``1``, ``1.0`` and ``True`` print
    apart). Raises TypeError for a value that cannot be hashed."""
    if isinstance(value, dict):
        return (dict, tuple(sorted((k, _frozen(v)) for k, v in value.items())))
    if isinstance(value, list | tuple):
        return (type(value), tuple(_frozen(v) for v in value))
    translations = getattr(value, "translations", None)
    if isinstance(translations, dict):
        return (type(value), str(value), tuple(translations.items()))
    if isinstance(value, float):
        return (float, repr(value))
    hash(value)
    return (type(value), value)


class Web:
    """What every route needs: settings, sessions, the page environments, rendering."""

    def __init__(self, settings: Settings, store: SessionStore | None = None) -> None:
        self.settings = settings
        self.store = store or SessionStore(settings.web_idle_minutes * 60)
        self.store.bind(settings.database_url)  # sessions live in the database every web process shares
        self.envs = {lang: _environment(lang) for lang in accounts.LANGUAGES}
        self.prefect_ui = settings.api_url.removesuffix("/").removesuffix("/api")
        self._fragments: OrderedDict[Any, Markup] = OrderedDict()
        self._fragments_lock = threading.Lock()

    def compile_pages(self) -> int:
        """Compile every page template in every language now (a web process at start): the first
        requests of each process then do not wait, all at once, for the same compile (~0.1-0.5 s
        here). Returns how many were compiled."""
        n = 0
        for env in self.envs.values():
            for name in env.list_templates(extensions=["html"]):
                env.get_template(name)
                n += 1
        return n

    # -- sessions ----------------------------------------------------------------------------------
    async def session(self, request: Request) -> WebSession:
        """The request's session; a new anonymous one when there is none (an idle one is audited)."""
        live, expired = self.store.get(request.cookies.get(COOKIE))
        if expired is not None and expired.username:
            await run_in_threadpool(accounts.sign_out, self.settings, expired.username, "idle")
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
                    await run_in_threadpool(accounts.sign_out, self.settings, gone.username, "idle")
            live = self.store.new(pick_language(request.headers.get("accept-language")))
        if request.method == "GET":
            live.here = safe_next(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        return live

    async def user(self, request: Request) -> WebSession:
        """The signed-in session, or a redirect to the sign-in page (``Redirect`` is raised). From
        here on a password asked again (a signature, a form) is the session's user's own channel."""
        ws = await self.session(request)
        if not ws.username:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise Redirect(f"/login?next={quote(target)}", ws)
        guard.set_channel(guard.Channel(client=client_of(request), session_of=ws.username))
        return ws

    async def reader(self, request: Request, institution: str) -> WebSession:
        """``user``, who holds a role at ``institution``; anyone else gets the 404 of a page that
        does not exist (``guard.may_read``), so a page tells nobody outside what the institution has."""
        ws = await self.user(request)
        await self.require_reader(ws, institution)
        return ws

    async def require_reader(self, ws: WebSession, institution: str) -> None:
        """As ``reader``, for a POST whose CSRF token was checked first (``form``)."""
        if not await run_in_threadpool(library.may_read, self.settings, ws.who, institution):
            raise StarletteHTTPException(404)

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
        response = HTMLResponse(html, status_code=status)
        self.secure(response, ws)
        return response

    def fragment(self, ws: WebSession, name: str, **ctx: Any) -> Markup:
        """Template ``name`` rendered from ``ctx`` alone in the session's language, kept by those exact
        inputs (``_frozen``; ``FRAGMENTS_KEPT``): every open inbox asks for its list every 5 seconds
        and the list changes far less often, so most asks render nothing (a list of 20 cards is ~2.5 ms,
        half of what a page costs). The template sees nothing of the session (no ``ws``, ``csrf``,
        ``now`` or messages), so equal inputs always give equal HTML; inputs that cannot be hashed are
        rendered every time."""
        template = self.envs.get(ws.language, self.envs["en"]).get_template(name)
        try:
            key = (name, ws.language, _frozen(ctx))
        except TypeError:
            key = None
        with self._fragments_lock:
            html = self._fragments.get(key) if key is not None else None
            if html is not None:
                self._fragments.move_to_end(key)
                return html
        html = Markup(template.render(**ctx))  # noqa: S704 (autoescaped by the template)
        if key is None:
            return html
        with self._fragments_lock:
            self._fragments[key] = html
            while len(self._fragments) > FRAGMENTS_KEPT:
                self._fragments.popitem(last=False)
        return html

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
            self.store.save(ws)
            response.set_cookie(COOKIE, ws.token, httponly=True, samesite="strict", path="/")
        return response

    def gettext(self, ws: WebSession, message: str) -> str:
        return catalogue(ws.language).gettext(message)

    def error(self, ws: WebSession, exc: Exception, status: int = 400) -> HTMLResponse:
        return self.render(ws, "error.html", status=status, message=translate(message_of(exc), ws.language))


class Redirect(Exception):
    def __init__(self, to: str, ws: WebSession) -> None:
        self.to, self.ws = to, ws


class Forbidden(Exception):
    def __init__(self, ws: WebSession) -> None:
        self.ws = ws


def message_of(exc: Exception) -> str:
    problems = getattr(exc, "problems", None)
    if problems:
        return "\n".join(str(p) for p in problems)
    return str(exc) or type(exc).__name__


def status_of(exc: FlowsError) -> int:
    """The HTTP status of a refusal, by its class: 401 sign-in, 403 not allowed, 404 no such thing, else 400."""
    if isinstance(exc, AuthenticationError):
        return 401
    if isinstance(exc, NotAuthorizedError):
        return 403
    if isinstance(exc, NotFoundError):
        return 404
    return 400


def safe_next(target: str | None) -> str:
    return (
        target if target and target.startswith("/") and not target.startswith("//") and "\\" not in target else "/inbox"
    )
