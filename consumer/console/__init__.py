"""The operator console: server-rendered pages under ``/console`` on the service's HTTP port.

``add_console(app)`` is the one hook where the HTTP app is built. The console is
a sub-application, so its login check and templates stay out of the webhook
and API routes; it reads the parent's settings, store and broker through
``request.config_dict``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from consumer.console import auth, drawing, live, pages

HERE = Path(__file__).parent
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = ("/console/login", "/console/static/")


@web.middleware
async def require_login(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Pages need a session (else the login form); actions also need this session's CSRF token."""
    if request.path.startswith(OPEN_PATHS):
        return await handler(request)
    if not auth.api_token(request):
        return web.Response(status=503, text="the console is shut: set APPT_API_TOKEN and restart")
    if auth.session_nonce(request) is None:
        if request.method != "GET":
            return web.Response(status=403, text="refused: not logged in")
        raise web.HTTPSeeOther(request.app.router["login"].url_for().with_query(next=request.path_qs))
    if request.method == "POST" and (refusal := await auth.check_action(request)) is not None:
        return refusal
    return await handler(request)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Everything comes from this origin (no CDN); pages can't be framed. Redirects and errors too."""
    response.headers.setdefault("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")


async def _context(request: web.Request) -> dict[str, object]:
    """What every template may use: the form's CSRF token, and whether to show the menu."""
    logged_in = auth.session_nonce(request) is not None
    return {"csrf": auth.csrf_token(request) if logged_in else "", "logged_in": logged_in,
            "path": request.path}


def console_app() -> web.Application:
    console = web.Application(middlewares=[require_login])
    console.on_response_prepare.append(security_headers)
    live.end_streams_on_shutdown(console)
    env = aiohttp_jinja2.setup(console, loader=jinja2.FileSystemLoader(HERE / "templates"),
                               autoescape=True, context_processors=[_context],
                               undefined=jinja2.StrictUndefined)
    env.filters.update(iso=_iso, utc=_utc, slug=_slug, svg=drawing.svg)
    router = console.router
    router.add_get("/", pages.overview, name="overview")
    router.add_get("/login", pages.login_form, name="login")
    router.add_post("/login", pages.login)
    router.add_post("/logout", pages.logout)
    router.add_get("/live", live.live_tail)
    router.add_get("/appointments/{id:[0-9]+}", pages.appointment, name="appointment")
    router.add_get("/workflows", pages.workflows, name="workflows")
    router.add_get("/workflows/{workflow_id}", pages.workflow, name="workflow")
    router.add_post("/workflows/{workflow_id}/retry", pages.retry_workflow)
    router.add_get("/dead", pages.dead_letters, name="dead")
    router.add_get("/dead/{dead_id:[0-9]+}", pages.dead_letter)
    router.add_post("/dead", pages.dead_action)
    router.add_get("/search", pages.search)
    router.add_static("/static", HERE / "static", name="static")
    return console


def _iso(t: datetime) -> str:
    return t.isoformat()


def _utc(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _slug(text: str) -> str:
    """A state name as a CSS class part: ``Did not attend`` -> ``did-not-attend``."""
    return re.sub(r"\W+", "-", text).strip("-").lower()


def add_console(app: web.Application) -> None:
    app.router.add_get("/console", _to_console)  # before the sub-app, which would take it
    app.add_subapp("/console", console_app())


async def _to_console(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect("/console/")
