"""HTTP face of the emulated PMS: the ``/v1`` API and the ``/_sandbox`` knobs.

The middleware applies what the real PMS applies before any handler runs, in
its order: User-Agent (403), bearer token (401), the hourly budget (403
block), then the injected faults and latency. Handlers raise ``ApiError``
(or the state's ``Refused``/``Missing``) and the middleware shapes the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as clock_time
from typing import Any

from aiohttp import web

from consumer.sandbox import rules
from consumer.sandbox.state import Budget, DeleteMode, Fault, Missing, Refused, SandboxState

STATE: web.AppKey[SandboxState] = web.AppKey("sandbox_state", SandboxState)
HANG_SECONDS = 60.0
DEFAULT_PER_PAGE = 25
MAX_PER_PAGE = 100  # over it, the live PMS silently answers DEFAULT_PER_PAGE rows
USER_AGENT_REFUSAL = (
    "Request forbidden by administrative rules. Please make sure your request has an acceptable User-Agent header."
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, error_type: str, message: str, params: rules.Reasons | None = None) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message, self.params = status, error_type, message, params

    def response(self) -> web.Response:
        error: dict[str, Any] = {"type": self.error_type, "message": self.message}
        if self.params is not None:
            error["params"] = self.params
        return web.json_response({"error": error}, status=self.status)


def _rejected(params: rules.Reasons, what: str = "appointment") -> ApiError:
    return ApiError(422, "invalid_request_error", f"The {what} could not be processed", params)


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    template = resource.canonical if resource is not None else request.path
    return f"{request.method} {template}"


def _rate_headers(budget: Budget) -> dict[str, str]:
    return {
        "x-ratelimit-limit": str(budget.limit),
        "x-ratelimit-remaining": str(budget.remaining),
        "x-ratelimit-reset": str(int(budget.reset)) if budget.reset == int(budget.reset) else f"{budget.reset:.3f}",
    }


def _blocked(headers: dict[str, str]) -> web.Response:
    body = {"error": {"type": "invalid_access_error", "message": "Rate limit exceeded"}}
    return web.json_response(body, status=403, headers=headers)


def _fault_response(fault: Fault, budget: Budget) -> web.Response:
    headers = _rate_headers(budget)
    if fault.status == 403:
        reset = time.time() + fault.retry_after if fault.retry_after is not None else budget.reset
        headers.update({"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(math.ceil(reset))})
        return _blocked(headers)
    if fault.retry_after is not None:
        headers["Retry-After"] = f"{fault.retry_after:g}"
    error_type = "rate_limit_error" if fault.status == 429 else "api_error"
    body = {"error": {"type": error_type, "message": f"injected failure ({fault.status})"}}
    return web.json_response(body, status=fault.status or 500, headers=headers)


def _authorise(request: web.Request, state: SandboxState) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token != state.token:
        raise ApiError(401, "unauthorized", "Invalid or missing access token")
    return token


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    state = request.app[STATE]
    route = _route_name(request)
    state.record_call(route)
    if not request.headers.get("User-Agent"):
        # Refused in front of the API (a firewall rule): plain text, not the API's JSON error.
        return web.Response(status=403, text=USER_AGENT_REFUSAL)
    try:
        token = _authorise(request, state)
    except ApiError as exc:
        return exc.response()
    budget = state.spend_budget(token, time.time())
    if budget.blocked:
        return _blocked(_rate_headers(budget))
    fault = state.take_fault(route)
    if fault is not None and fault.status is None:
        await asyncio.sleep(HANG_SECONDS)
    elif fault is not None:
        return _fault_response(fault, budget)
    if state.latency:
        await asyncio.sleep(state.latency)
    try:
        response = await handler(request)
    except ApiError as exc:
        response = exc.response()
    except Refused as exc:
        response = _rejected(exc.reasons).response()
    except Missing as exc:
        response = ApiError(404, "not_found", f"Appointment {exc.args[0]} not found").response()
    except web.HTTPNotFound:
        response = ApiError(404, "not_found", f"No route {request.path}").response()
    except web.HTTPMethodNotAllowed:
        response = ApiError(405, "method_not_allowed", f"{request.method} not allowed").response()
    response.headers.update(_rate_headers(budget))
    return response


# ---- /v1 -------------------------------------------------------------------


def _appointment_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise ApiError(404, "not_found", f"Appointment {request.match_info['id']} not found") from None


async def _appointment_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _rejected({"base": ["the body is not valid JSON"]}) from None
    fields = body.get("appointment") if isinstance(body, dict) else None
    if not isinstance(fields, dict):
        raise _rejected({"appointment": [rules.BLANK]})
    return fields


def _wrap(appointment: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response({"appointment": appointment}, status=status)


async def get_appointment(request: web.Request) -> web.Response:
    return _wrap(request.app[STATE].read(_appointment_id(request)))


async def create_appointment(request: web.Request) -> web.Response:
    return _wrap(request.app[STATE].create(await _appointment_body(request)), status=201)


async def update_appointment(request: web.Request) -> web.Response:
    appointment_id = _appointment_id(request)
    return _wrap(request.app[STATE].update(appointment_id, await _appointment_body(request)))


async def delete_appointment(request: web.Request) -> web.Response:
    request.app[STATE].delete(_appointment_id(request))
    return web.Response(status=204)


def _time_param(query: Any, name: str, reasons: rules.Reasons) -> datetime | None:
    raw = query.get(name)
    if raw is None:
        return None
    parsed = rules.parse_time(raw)
    if parsed is None:
        reasons[name] = [rules.INVALID]
    return parsed


def _int_param(query: Any, name: str, reasons: rules.Reasons, default: int | None = None) -> int | None:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        reasons[name] = [rules.INVALID]
    return value


def _window(query: Any, reasons: rules.Reasons) -> tuple[datetime | None, datetime | None]:
    """The start-time window: ``after`` and ``before``, or ``on`` (one local day); required."""
    if "on" in query and not ("after" in query or "before" in query):
        try:
            day = date.fromisoformat(query["on"])
        except ValueError:
            reasons["on"] = [rules.INVALID]
            return None, None
        start = datetime.combine(day, clock_time(), rules.PRACTICE_TZ)
        return start, datetime.combine(day + timedelta(days=1), clock_time(), rules.PRACTICE_TZ)
    for name in ("after", "before"):
        if name not in query:
            reasons[name] = [rules.BLANK]
    return _time_param(query, "after", reasons), _time_param(query, "before", reasons)


def _per_page(query: Any, reasons: rules.Reasons) -> int:
    per_page = _int_param(query, "per_page", reasons, DEFAULT_PER_PAGE) or DEFAULT_PER_PAGE
    return per_page if per_page <= MAX_PER_PAGE else DEFAULT_PER_PAGE


async def list_appointments(request: web.Request) -> web.Response:
    """Unknown parameters are ignored, as the live PMS does: a filter it lacks filters nothing."""
    query = request.query
    reasons: rules.Reasons = {}
    after, before = _window(query, reasons)
    updated_after = _time_param(query, "updated_after", reasons)
    patient_id = _int_param(query, "patient_id", reasons)
    practitioner_id = _int_param(query, "practitioner_id", reasons)
    page = _int_param(query, "page", reasons, 1) or 1
    per_page = _per_page(query, reasons)
    if reasons:
        raise _rejected(reasons, "request")
    found = request.app[STATE].query(
        after=after,
        before=before,
        updated_after=updated_after,
        patient_id=patient_id,
        practitioner_id=practitioner_id,
        include_cancelled=query.get("cancelled") == "true",
    )
    total_pages = max(1, -(-len(found) // per_page))
    body = {
        "appointments": found[(page - 1) * per_page : page * per_page],
        "meta": {"total": len(found), "current_page": page, "total_pages": total_pages, "per_page": per_page},
    }
    return web.json_response(body)


async def cancellation_reasons(request: web.Request) -> web.Response:
    reasons = [{"id": i, **fields} for i, fields in rules.CANCELLATION_REASONS.items()]
    return web.json_response({"appointment_cancellation_reasons": reasons})


# ---- /_sandbox knobs ---------------------------------------------------------


def _knob(apply: Callable[[SandboxState, dict[str, Any]], Any]) -> Handler:
    """A POST knob: JSON body in, ``{"ok": true, "result": ...}`` out; bad input is a 400."""

    async def handler(request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
            result = apply(request.app[STATE], body)
        except (KeyError, TypeError, ValueError, Missing) as exc:
            return web.json_response({"ok": False, "error": repr(exc)}, status=400)
        return web.json_response({"ok": True, "result": result})

    return handler


def _change(state: SandboxState, body: dict[str, Any]) -> Any:
    appointment_id, fields = int(body["appointment_id"]), body["fields"]
    if "after_reads" in body:
        return state.change_behind_back(appointment_id, fields, after_reads=int(body["after_reads"]))
    if "before_next" in body:
        return state.change_behind_back(appointment_id, fields, before_next=body["before_next"])
    return state.change_now(appointment_id, fields)


def _seed(state: SandboxState, body: dict[str, Any]) -> Any:
    if "fixture" in body:
        return state.seed_fixture(body["fixture"])
    return state.seed(body["appointments"])


KNOBS: dict[str, Callable[[SandboxState, dict[str, Any]], Any]] = {
    "fail": lambda s, b: s.fail_next(b["route"], int(b.get("count", 1)), int(b["status"]), b.get("retry_after")),
    "timeout": lambda s, b: s.timeout_next(b["route"], int(b.get("count", 1))),
    "latency": lambda s, b: s.set_latency(float(b["seconds"])),
    "drop_webhooks": lambda s, b: s.drop_webhooks(bool(b["enabled"])),
    "webhook_retry_delay": lambda s, b: s.set_webhook_retry_delay(float(b["seconds"])),
    "subscribe": lambda s, b: s.subscribe(b["url"], b["secret"]),
    "unsubscribe": lambda s, b: s.unsubscribe(b["url"]),
    "change": _change,
    "seed": _seed,
    "refuse_deletes": lambda s, b: s.refuse_deletes(bool(b["enabled"])),
    "refuse_cancel": lambda s, b: s.refuse_cancel(int(b["appointment_id"])),
    "rate_limit": lambda s, b: s.set_rate_limit(int(b["budget"]), b.get("window")),
    "clear_faults": lambda s, b: s.clear_faults(),
    "spend_elsewhere": lambda s, b: s.spend_elsewhere(int(b["count"]), time.time()),
    "token": lambda s, b: s.set_token(str(b["token"])),
    "updated_after": lambda s, b: s.honour_updated_after(bool(b["honoured"])),
    "delete_mode": lambda s, b: s.set_delete_mode(str(b["mode"])),
    "reset": lambda s, b: s.reset(),
}


async def sandbox_appointments(request: web.Request) -> web.Response:
    return web.json_response({"appointments": request.app[STATE].all_appointments()})


async def sandbox_calls(request: web.Request) -> web.Response:
    return web.json_response({"calls": request.app[STATE].calls})


async def sandbox_deliveries(request: web.Request) -> web.Response:
    deliveries = [vars(d) for d in request.app[STATE].deliveries]
    return web.json_response({"deliveries": deliveries})


# ---- assembly ---------------------------------------------------------------


def make_app(state: SandboxState) -> web.Application:
    app = web.Application(middlewares=[api_middleware])
    app[STATE] = state
    app.router.add_get("/v1/appointments", list_appointments)
    app.router.add_post("/v1/appointments", create_appointment)
    app.router.add_get("/v1/appointments/{id}", get_appointment)
    app.router.add_put("/v1/appointments/{id}", update_appointment)
    app.router.add_delete("/v1/appointments/{id}", delete_appointment)
    app.router.add_get("/v1/appointment_cancellation_reasons", cancellation_reasons)
    for name, apply in KNOBS.items():
        app.router.add_post(f"/_sandbox/{name}", _knob(apply))
    app.router.add_get("/_sandbox/appointments", sandbox_appointments)
    app.router.add_get("/_sandbox/calls", sandbox_calls)
    app.router.add_get("/_sandbox/deliveries", sandbox_deliveries)
    app.on_cleanup.append(_close_state)
    return app


async def _close_state(app: web.Application) -> None:
    await app[STATE].close()


@dataclass(frozen=True)
class RunningSandbox:
    url: str  # base URL without /v1
    state: SandboxState


@contextlib.asynccontextmanager
async def running_sandbox(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str = "sandbox-token",
    rate_limit: int = 3600,
    updated_after_honoured: bool = False,
    delete_mode: DeleteMode = "cancel",
) -> AsyncIterator[RunningSandbox]:
    """Serve a fresh sandbox for the duration of the block (``port=0``: any free port).

    Handlers are cancelled when their client goes away, so a hung request
    (``timeout_next``) does not hold up shutdown for its full minute.
    """
    state = SandboxState(
        token=token, rate_limit=rate_limit, updated_after_honoured=updated_after_honoured, delete_mode=delete_mode
    )
    runner = web.AppRunner(make_app(state), handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    try:
        yield RunningSandbox(url=f"http://{host}:{bound_port}", state=state)
    finally:
        await runner.cleanup()


async def serve_sandbox(
    host: str,
    port: int,
    *,
    token: str = "sandbox-token",
    updated_after_honoured: bool = False,
    delete_mode: DeleteMode = "cancel",
) -> None:
    """Run the sandbox until cancelled (``appt sandbox``)."""
    async with running_sandbox(
        host=host, port=port, token=token, updated_after_honoured=updated_after_honoured, delete_mode=delete_mode
    ) as sandbox:
        # One line for the person who started it: where, with which token and modes, where the knobs are.
        print(
            f"appt sandbox: PMS sandbox listening on {sandbox.url} (API {sandbox.url}/v1, "
            f"token {sandbox.state.token!r}, updated_after {'honoured' if updated_after_honoured else 'ignored'}, "
            f"DELETE {delete_mode}s; knobs: POST {sandbox.url}/_sandbox/<knob>, e.g. /_sandbox/seed)",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.Event().wait()
