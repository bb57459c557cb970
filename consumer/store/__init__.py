"""The store: appointment records, the state log, workflows and the inbox, behind one interface.

The backends are imported by ``open_store`` only when chosen, so the embedded
SQLite default runs without asyncpg installed.
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
    open_store,
)

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
