"""Prometheus metrics: one registry per process, served at ``GET /metrics``.

Names are part of the operator contract (dashboards and alerts use them);
the README's "Operating it" section explains each.
"""

from __future__ import annotations

import functools

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REGISTRY = CollectorRegistry()

MESSAGES = Counter(
    "appt_messages_total",
    "Inbound messages handled, by kind (command type or event) and outcome.",
    ["kind", "outcome"],
    registry=REGISTRY,
)
PROCESSING_SECONDS = Histogram(
    "appt_processing_seconds",
    "Time from delivery to ack of one inbound message.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
PMS_CALLS = Counter(
    "appt_pms_calls_total",
    "Calls to the PMS API by route template and HTTP status (0 = no answer).",
    ["route", "status"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "appt_retries_total",
    "Retries of transient failures, by where they happened (pms, worker, redelivery).",
    ["where"],
    registry=REGISTRY,
)
DEAD_LETTERED = Counter(
    "appt_dead_lettered_total",
    "Messages sent to appointments.dead, by reason class.",
    ["reason"],
    registry=REGISTRY,
)
DEAD_LETTERS = Gauge(
    "appt_dead_letters",
    "Dead letters kept now (not replayed or purged), by reason class (refreshed every 5 s): see `appt dead list`.",
    ["reason_class"],
    registry=REGISTRY,
)
DEAD_UNREADABLE = Counter(
    "appt_dead_letters_unreadable_total",
    "Dead letters naming neither an event nor a command's id, type and appointment: no result was sent.",
    registry=REGISTRY,
)
WORKFLOWS = Gauge(
    "appt_workflows",
    "Unfinished reassignment workflows by state (refreshed every 5 s); outcomes are in"
    ' appt_messages_total{kind="reassign"}.',
    ["state"],
    registry=REGISTRY,
)
STUCK_WORKFLOWS = Gauge(
    "appt_workflows_stuck",
    "Workflows parked in compensation_failed or past their deadline: page someone.",
    registry=REGISTRY,
)
PRACTICE_STATUS = Gauge(
    "appt_practice_status",
    "1 for each practice's current status (ok, budget_spent, token_refused, unreachable), 0 for the others.",
    ["practice", "status"],
    registry=REGISTRY,
)
WEBHOOKS = Counter(
    "appt_webhook_verifications_total",
    "Webhook requests by verification result.",
    ["result"],
    registry=REGISTRY,
)
RECONCILE_REQUESTS = Counter(
    "appt_reconcile_requests_total",
    "PMS requests spent by polling, by window (bounded by APPT_RECONCILE_BUDGET_SHARE of the hourly budget).",
    ["window"],
    registry=REGISTRY,
)
WEBHOOK_MISSED = Counter(
    "appt_webhook_missed_changes_total",
    "Changes polling found that no webhook had delivered in time: rising means the PMS switched"
    " the webhook subscription off.",
    ["practice"],
    registry=REGISTRY,
)

PRUNED = Counter(
    "appt_pruned_rows_total",
    "Rows deleted by the retention pruner, by table.",
    ["table"],
    registry=REGISTRY,
)
OLDEST_ROW = Gauge(
    "appt_oldest_row_age_seconds",
    "Age of the oldest row kept, by table, after each prune pass: it levels off at the"
    " table's retention (0 when empty).",
    ["table"],
    registry=REGISTRY,
)


@functools.cache
def messages(kind: str, outcome: str) -> Counter:
    """``MESSAGES`` for these labels, bound once (``labels()`` looks them up under a lock
    on every call). Both are small closed sets: command types or events, outcomes."""
    return MESSAGES.labels(kind, outcome)


@functools.cache
def pms_calls(route: str, status: int) -> Counter:
    """``PMS_CALLS`` for these labels, bound once (see ``messages``): one or two calls per
    command. Route templates are a closed set; statuses are HTTP's (a few dozen at most)."""
    return PMS_CALLS.labels(route, str(status))


@functools.cache
def processing_seconds(kind: str) -> Histogram:
    """``PROCESSING_SECONDS`` for this kind, bound once (see ``messages``)."""
    return PROCESSING_SECONDS.labels(kind)


def render() -> bytes:
    return generate_latest(REGISTRY)
