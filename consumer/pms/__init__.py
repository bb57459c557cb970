"""Async client for the PMS REST API, with typed errors."""

from consumer.pms.client import PmsClient
from consumer.pms.errors import (
    Misconfigured,
    NotFound,
    PmsError,
    RateLimited,
    Rejected,
    Transient,
    Unauthorised,
    Unavailable,
)
from consumer.pms.models import CancellationReason, PmsAppointment

__all__ = [
    "CancellationReason",
    "Misconfigured",
    "NotFound",
    "PmsAppointment",
    "PmsClient",
    "PmsError",
    "RateLimited",
    "Rejected",
    "Transient",
    "Unauthorised",
    "Unavailable",
]
