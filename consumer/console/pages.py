"""The console's pages: each reads the store the service writes, and acts through the
same code as the `appt` verbs (``retry_saga``, ``replay_letter``), never a copy of it."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from consumer.broker import PublishFailed
from consumer.console import auth
from consumer.dead_tools import detail, reason_group, replay_letter
from consumer.messages import StateLogRecord
from consumer.pms.errors import PmsError
from consumer.practices import describe
from consumer.silence import WebhookSilences
from consumer.store.base import TERMINAL_WORKFLOW_STATES, DeadLetterQuery, Store, WorkflowRecord, iter_history
from consumer.tools import retry_saga
from consumer.webhooks import BROKER_KEY, PRACTICES_KEY, SETTINGS_KEY, SILENCE_KEY, STORE_KEY
from consumer.workflow_watch import is_stuck
from consumer.workflows import workflow_id_for
from statemachines.diagram import graph

SAGA_STATES = graph("reassignment").states
WORKFLOW_STATES = SAGA_STATES + tuple(sorted(TERMINAL_WORKFLOW_STATES - set(SAGA_STATES)))


def _store(request: web.Request) -> Store:
    return request.config_dict[STORE_KEY]


def _stuck(request: web.Request, workflow: WorkflowRecord) -> bool:
    return is_stuck(workflow, deadline=request.config_dict[SETTINGS_KEY].workflow_deadline)


@aiohttp_jinja2.template("login.html")
async def login_form(request: web.Request) -> dict[str, Any]:
    return {"configured": bool(auth.api_token(request)), "next": _next(request), "error": None}


def _next(request: web.Request) -> str:
    """Where to go after logging in: a console path only, never another site."""
    target = request.query.get("next", "/console/")
    return target if target.startswith("/console/") else "/console/"


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    if not auth.token_matches(request, str(form.get("token", ""))):
        context = {
            "configured": bool(auth.api_token(request)),
            "next": _next(request),
            "error": "That token is not this service's APPT_API_TOKEN.",
        }
        return aiohttp_jinja2.render_template("login.html", request, context, status=401)
    response = web.HTTPSeeOther(_next(request))
    auth.start_session(request, response)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther("/console/login")
    auth.end_session(response)
    return response


@aiohttp_jinja2.template("overview.html")
async def overview(request: web.Request) -> dict[str, Any]:
    store = _store(request)
    unfinished = await store.list_workflows(unfinished=True)  # parked ones included
    letters = await store.dead_letters(DeadLetterQuery())
    parked = await store.parked_counts()
    silences, now = request.config_dict.get(SILENCE_KEY, WebhookSilences()), datetime.now(UTC)
    return {
        "practices": [
            describe(p, parked.get(p.name, 0), silences.of(p.name).report(now))
            for p in request.config_dict[PRACTICES_KEY]
        ],
        "in_flight": [w for w in unfinished if w.state != "compensation_failed"],
        "stuck": [w for w in unfinished if _stuck(request, w)],
        "by_reason": Counter(reason_group(letter.reason) for letter in letters).most_common(),
        "dead_count": len(letters),
    }


def _related(records: list[StateLogRecord], appointment_id: int) -> list[int]:
    """The other appointments of a reassignment this one took part in."""
    found: list[int] = []
    for record in records:
        for key in ("replacement_id", "original_id"):
            other = record.detail.get(key)
            if isinstance(other, int) and other != appointment_id and other not in found:
                found.append(other)
        if (
            record.machine == "reassignment"
            and record.appointment_id != appointment_id
            and record.appointment_id not in found
        ):
            found.append(record.appointment_id)
    return found


@aiohttp_jinja2.template("appointment.html")
async def appointment(request: web.Request) -> dict[str, Any]:
    appointment_id = int(request.match_info["id"])
    store = _store(request)
    record = await store.get_appointment(appointment_id)
    records = [r async for r in iter_history(store, appointment_id)]
    if record is None and not records:
        raise web.HTTPNotFound(text=f"appointment {appointment_id} is not known to this service")
    return {
        "appointment_id": appointment_id,
        "record": record,
        "records": records,
        "related": _related(records, appointment_id),
        "graph": graph("appointment"),
        "current": record.state if record else None,
    }


@aiohttp_jinja2.template("workflows.html")
async def workflows(request: web.Request) -> dict[str, Any]:
    state = request.query.get("state") or None
    if state is not None and state not in WORKFLOW_STATES:
        raise web.HTTPBadRequest(text=f"unknown workflow state {state!r}")
    found = await _store(request).list_workflows(states=frozenset({state}) if state else None)
    rows = sorted(
        ((w, _stuck(request, w)) for w in found),
        key=lambda row: (not row[1], -(row[0].created_at or datetime.min.replace(tzinfo=UTC)).timestamp()),
    )
    return {"rows": rows, "state": state, "states": WORKFLOW_STATES}


@aiohttp_jinja2.template("workflow.html")
async def workflow(request: web.Request) -> dict[str, Any]:
    workflow_id = request.match_info["workflow_id"]
    store = _store(request)
    found = await store.get_workflow(workflow_id)
    if found is None:
        raise web.HTTPNotFound(text=f"no workflow {workflow_id}")
    steps = [
        r
        async for r in iter_history(store, found.appointment_id)
        if r.workflow_id == workflow_id and r.machine == "reassignment"
    ]
    return {
        "workflow": found,
        "stuck": _stuck(request, found),
        "records": steps,
        "graph": graph("reassignment"),
        "current": found.state,
        "message": request.query.get("message"),
    }


async def retry_workflow(request: web.Request) -> web.StreamResponse:
    """`appt sagas retry` from a button, through the running service's practices (PMS clients)."""
    workflow_id = request.match_info["workflow_id"]
    settings = request.config_dict[SETTINGS_KEY]
    try:
        outcome = await retry_saga(
            settings, _store(request), request.config_dict[BROKER_KEY], request.config_dict[PRACTICES_KEY], workflow_id
        )
    except LookupError as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    except PmsError as exc:
        message = f"not retried: the PMS answered: {exc}"
    else:
        message = outcome.note or f"retried: now {outcome.workflow.state}"
    raise web.HTTPSeeOther(request.app.router["workflow"].url_for(workflow_id=workflow_id).with_query(message=message))


@aiohttp_jinja2.template("dead.html")
async def dead_letters(request: web.Request) -> dict[str, Any]:
    letters = await _store(request).dead_letters(DeadLetterQuery())
    groups: dict[str, list[Any]] = {}
    for letter in letters:
        groups.setdefault(reason_group(letter.reason), []).append(letter)
    return {
        "groups": sorted(groups.items(), key=lambda g: -len(g[1])),
        "count": len(letters),
        "message": request.query.get("message"),
    }


@aiohttp_jinja2.template("dead_letter.html")
async def dead_letter(request: web.Request) -> dict[str, Any]:
    dead_id = int(request.match_info["dead_id"])
    found = await _store(request).dead_letters(DeadLetterQuery(ids=(dead_id,), status=None))
    if not found:
        raise web.HTTPNotFound(text=f"no dead letter {dead_id}")
    return {"letter": found[0], "shown": detail(found[0])}


async def dead_action(request: web.Request) -> web.StreamResponse:
    """Replay or purge the ticked letters: a first post asks, the confirmed one acts."""
    form = await request.post()
    action = str(form.get("action", ""))
    ids = tuple(int(str(v)) for v in form.getall("id", []) if _ascii_digits(str(v)))
    if action not in ("replay", "purge") or not ids:
        raise web.HTTPSeeOther("/console/dead?message=" + "tick at least one dead letter, then replay or purge")
    store = _store(request)
    letters = await store.dead_letters(DeadLetterQuery(ids=ids))
    if form.get("confirmed") != "yes":
        return aiohttp_jinja2.render_template("dead_confirm.html", request, {"action": action, "letters": letters})
    done = 0
    for letter in letters:
        if action == "purge":
            done += await store.settle_dead_letter(letter.dead_id, "purged")
            continue
        try:
            await replay_letter(store, request.config_dict[BROKER_KEY], letter)
        except PublishFailed as exc:
            raise web.HTTPSeeOther(f"/console/dead?message={done} replayed; {letter.dead_id} not: {exc}") from None
        done += 1
    verb = "replayed" if action == "replay" else "purged"
    raise web.HTTPSeeOther(f"/console/dead?message={done} {verb}")


def _ascii_digits(text: str) -> bool:
    """``str.isdigit`` and ``int`` also take other scripts' digits; ids here are ASCII only."""
    return text.isascii() and text.isdigit()


async def search(request: web.Request) -> web.StreamResponse:
    """An appointment id, a workflow id or a command id: go where it is."""
    query = request.query.get("q", "").strip()
    store = _store(request)
    if _ascii_digits(query) and (await store.get_appointment(int(query)) or await store.history(int(query), limit=1)):
        raise web.HTTPSeeOther(f"/console/appointments/{query}")
    for workflow_id in (query, workflow_id_for(query)):
        if query and await store.get_workflow(workflow_id):
            raise web.HTTPSeeOther(f"/console/workflows/{workflow_id}")
    entry = await store.inbox_get(query) if query else None
    appointment_id = (entry.result or {}).get("appointment_id") if entry else None
    if isinstance(appointment_id, int):
        raise web.HTTPSeeOther(f"/console/appointments/{appointment_id}")
    return aiohttp_jinja2.render_template("search.html", request, {"query": query}, status=404 if query else 200)
