"""Who may use the console: a login form for ``APPT_API_TOKEN``, a cookie, and CSRF tokens.

The session is stateless: the cookie holds a random nonce and its HMAC under
the API token, so no session table is needed and changing the token logs
everyone out. Each session's CSRF token is another HMAC of the same nonce,
sent back in every form; a cross-site page can neither read it nor (the
cookie being SameSite=Strict) ride the session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from aiohttp import web

from consumer.webhooks import SETTINGS_KEY

COOKIE = "appt_console"
COOKIE_PATH = "/console"
CSRF_FIELD = "csrf"
SESSION_HOURS = 12


def _sign(token: str, purpose: str, nonce: str) -> str:
    return hmac.new(token.encode(), f"{purpose}:{nonce}".encode(), hashlib.sha256).hexdigest()


def api_token(request: web.Request) -> str | None:
    return request.config_dict[SETTINGS_KEY].api_token


def token_matches(request: web.Request, given: str) -> bool:
    token = api_token(request)
    return bool(token) and hmac.compare_digest(given.encode(), (token or "").encode())


def start_session(request: web.Request, response: web.StreamResponse) -> None:
    """Set the session cookie; only called after ``token_matches``."""
    token = api_token(request)
    assert token
    nonce = secrets.token_urlsafe(18)
    response.set_cookie(COOKIE, f"{nonce}.{_sign(token, 'session', nonce)}", path=COOKIE_PATH,
                        max_age=SESSION_HOURS * 3600, secure=True, httponly=True, samesite="Strict")


def end_session(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path=COOKIE_PATH)


def session_nonce(request: web.Request) -> str | None:
    """The nonce of a valid session cookie, or None (no cookie, forged, or an older token's)."""
    token = api_token(request)
    nonce, _, signature = request.cookies.get(COOKIE, "").partition(".")
    if not token or not nonce or not hmac.compare_digest(signature.encode(), _sign(token, "session", nonce).encode()):
        return None
    return nonce


def csrf_token(request: web.Request) -> str:
    nonce = session_nonce(request)
    token = api_token(request)
    assert nonce and token, "only for a logged-in request"
    return _sign(token, "csrf", nonce)


def same_origin(request: web.Request) -> bool:
    """A browser's Origin (when sent) names this host; a cross-site form post does not."""
    origin = request.headers.get("Origin")
    return origin is None or origin.split("://", 1)[-1] == request.host


async def check_action(request: web.Request) -> web.Response | None:
    """None when a POST carries this session's CSRF token from this origin; the refusal otherwise."""
    form = await request.post()
    given = str(form.get(CSRF_FIELD, ""))
    if not same_origin(request) or not hmac.compare_digest(given.encode(), csrf_token(request).encode()):
        return web.Response(status=403, text="refused: this action did not come from a console page "
                                             "(missing or wrong CSRF token); reload the page and try again")
    return None
