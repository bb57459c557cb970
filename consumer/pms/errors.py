"""Typed PMS failures, sorted by what the caller should do about them.

``Transient`` errors are worth retrying later (the pipeline backs off and
redelivers); everything else is an answer: retrying it can't change it.
"""

from __future__ import annotations

import re
from typing import Any

_STATUS_MESSAGE = re.compile(r"current status is: (?P<state>.+)$")


class PmsError(Exception):
    """Any failed PMS call; ``status`` is the HTTP status (0 when there was no answer)."""

    def __init__(self, message: str, *, status: int = 0, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class Rejected(PmsError):
    """422: the PMS refused the write; ``params`` maps each field to its reasons."""

    def __init__(self, message: str, params: dict[str, list[str]], *, body: Any = None) -> None:
        super().__init__(message, status=422, body=body)
        self.params = params

    def current_status(self) -> str | None:
        """The state named by "... the current status is: X", if any reason says so.

        The write protocol uses it to tell "someone changed it behind our back"
        (GET again and re-decide) from a plain refusal.
        """
        for reasons in self.params.values():
            for reason in reasons:
                match = _STATUS_MESSAGE.search(reason)
                if match:
                    return match["state"]
        return None


class NotFound(PmsError):
    """404: no such appointment (or it was deleted)."""


class Unauthorised(PmsError):
    """401 (a token expired after two weeks unused, or revoked), or another 403: fix the token."""


class Misconfigured(PmsError):
    """403 "make sure your request has an acceptable User-Agent header": fix the deployment."""


class RateLimited(PmsError):
    """429, or the 403 ``invalid_access_error`` "Rate limit exceeded" of a spent hourly budget.

    ``retry_after`` is how long (seconds) the PMS asked us to stay away.
    """

    def __init__(self, message: str, *, status: int, retry_after: float, body: Any = None) -> None:
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


class Unavailable(PmsError):
    """5xx, connection errors, timeouts: the PMS may or may not have acted."""


Transient = (RateLimited, Unavailable)
