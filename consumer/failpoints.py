"""Named crash points for the crash tests: ``APPT_FAILPOINTS=after_create_replacement``.

A failpoint named in the variable kills this process with SIGKILL at that
exact line, the only way to test "killed between the remote call and the
store write" deterministically. Unset (production), each call is one dict
lookup. Names are listed in ``FAILPOINTS`` so a typo in a test fails loudly.
"""

from __future__ import annotations

import os
import signal

FAILPOINTS = frozenset({
    "before_create_replacement",
    "after_create_replacement",
    "after_record_replacement",
    "before_cancel_original",
    "after_cancel_original",
    "after_record_cancelled",
    "after_move_replacement",
    "before_remove_replacement",
    "after_remove_replacement",
})


def _armed() -> frozenset[str]:
    names = frozenset(n.strip() for n in os.environ.get("APPT_FAILPOINTS", "").split(",") if n.strip())
    unknown = names - FAILPOINTS
    if unknown:
        raise ValueError(f"APPT_FAILPOINTS names unknown failpoints: {sorted(unknown)}")
    return names


ARMED = _armed()


def failpoint(name: str) -> None:
    assert name in FAILPOINTS, name
    if name in ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
