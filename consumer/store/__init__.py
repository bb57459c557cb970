"""The store: appointment records, the state log, workflows and the inbox, behind one interface.

``open_store`` (``opening``) is the one place that knows the backends; PostgreSQL's
is imported only when chosen, so the embedded SQLite default runs without asyncpg
installed.
"""

from consumer.store.base import (
    TERMINAL_WORKFLOW_STATES,
    AppointmentRecord,
    Collected,
    Commit,
    DeadLetter,
    DeadLetterQuery,
    InboxEntry,
    ParkedMessage,
    StaleVersion,
    Store,
    StoreUnavailable,
    WorkflowRecord,
)
from consumer.store.opening import open_store

__all__ = [
    "TERMINAL_WORKFLOW_STATES",
    "AppointmentRecord",
    "Collected",
    "Commit",
    "DeadLetter",
    "DeadLetterQuery",
    "InboxEntry",
    "ParkedMessage",
    "StaleVersion",
    "Store",
    "StoreUnavailable",
    "WorkflowRecord",
    "open_store",
]
