"""Named crash points for the crash tests: ``APPT_FAILPOINTS=after_create_replacement``.

A failpoint named in the variable kills this process with SIGKILL at that
exact line, the only way to test "killed between the remote call and the
store write" deterministically; ``name@N`` kills at its Nth passage (halfway
through a batch). Unset (production), each call is one dict
lookup. Names are listed in ``FAILPOINTS`` so a typo in a test fails loudly.
"""

from __future__ import annotations

import os
import signal

SAGA_FAILPOINTS = frozenset(
    {
        "before_create_replacement",
        "after_create_replacement",
        "after_record_replacement",
        "before_cancel_original",
        "after_cancel_original",
        "after_record_cancelled",
        "after_move_replacement",
        "before_remove_replacement",
        "after_remove_replacement",
    }
)
DEAD_LETTER_FAILPOINTS = frozenset({"after_dead_letter_stored", "after_replay_publish"})
FAILPOINTS = SAGA_FAILPOINTS | DEAD_LETTER_FAILPOINTS


def _armed() -> dict[str, int]:
    """Failpoint name -> the passage that kills (1 unless given as ``name@N``)."""
    armed = {}
    for entry in filter(None, (e.strip() for e in os.environ.get("APPT_FAILPOINTS", "").split(","))):
        name, _, passage = entry.partition("@")
        armed[name] = int(passage or 1)
    unknown = set(armed) - FAILPOINTS
    if unknown:
        raise ValueError(f"APPT_FAILPOINTS names unknown failpoints: {sorted(unknown)}")
    return armed


ARMED = _armed()
_passed: dict[str, int] = {}


def failpoint(name: str) -> None:
    assert name in FAILPOINTS, name
    if name in ARMED:
        _passed[name] = _passed.get(name, 0) + 1
        if _passed[name] == ARMED[name]:
            os.kill(os.getpid(), signal.SIGKILL)
