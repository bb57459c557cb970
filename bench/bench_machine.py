"""Shared machine + bound model versus a new ``transitions.Machine`` per message.

Run: ``python bench/bench_machine.py``. Measures, per message, the domain
work the worker does for a confirm (bind, plan, record, unbind) both ways,
and the memory one Machine costs versus one bound model. The per-message
Machine is the anti-pattern DESIGN.md warns about; the ratio shows why.
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from transitions import Machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import result_line  # noqa: E402
from statemachines.appointment import (  # noqa: E402
    MACHINE,
    Appointment,
    Snapshot,
    bound,
    machine_definition,
    unbind,
)

MESSAGES = 20_000
KEPT = 2_000
PENDING = Snapshot(1, "Pending", 1013)
CONFIRMED = Snapshot(1, "Confirmed", 1013)
T = TypeVar("T")


def shared_machine_message() -> None:
    with bound(PENDING, 1) as appt:
        appt.applied(appt.plan_confirm(), CONFIRMED)


def machine_per_message() -> None:
    appt = Appointment(1, PENDING)
    own = _new_machine(appt)
    appt.applied(appt.plan_confirm(), CONFIRMED)
    unbind(own, appt)


def _new_machine(model: Appointment | None) -> Machine:
    states, table = machine_definition()
    return Machine(
        model=model,
        states=list(states),
        transitions=table,
        initial=PENDING.state,
        auto_transitions=False,
    )


def per_message_us(work: Callable[[], None], count: int) -> float:
    for _ in range(count // 20):
        work()
    start = time.perf_counter()
    for _ in range(count):
        work()
    return (time.perf_counter() - start) / count * 1e6


def allocated_each(make: Callable[[], T], count: int) -> tuple[float, list[T]]:
    """Bytes allocated per object while all ``count`` are alive (returned to the caller)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    kept = [make() for _ in range(count)]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    size = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return size / count, kept


def retained_per_message(count: int) -> float:
    """Bytes still held after ``count`` finished messages, with the cycle collector off:
    unbinding must free each model by reference counting alone."""
    shared_machine_message()
    gc.collect()
    gc.disable()
    try:
        retained, _ = allocated_each(shared_machine_message, count)
    finally:
        gc.enable()
    return retained


def bound_model() -> Appointment:
    model = Appointment(1, PENDING)
    MACHINE.add_model(model, initial=PENDING.state)
    return model


def main() -> None:
    baseline = len(MACHINE.models)
    shared = per_message_us(shared_machine_message, MESSAGES)
    per_message = per_message_us(machine_per_message, MESSAGES // 10)
    print(f"shared machine:      {shared:8.1f} us/msg")
    print(f"machine-per-message: {per_message:8.1f} us/msg")
    print(f"ratio machine-per-message / shared = {per_message / shared:.1f}x")

    machine_bytes, _ = allocated_each(lambda: _new_machine(None), KEPT // 4)
    model_bytes, models = allocated_each(bound_model, KEPT)
    for model in models:
        unbind(MACHINE, model)
    print(f"memory per Machine:      {machine_bytes / 1024:8.1f} KiB")
    print(f"memory per bound model:  {model_bytes / 1024:8.1f} KiB")
    print(f"ratio Machine / bound model = {machine_bytes / model_bytes:.1f}x")
    retained = retained_per_message(KEPT)
    left_bound = len(MACHINE.models) - baseline
    print(f"retained per finished message (gc off): {retained:.0f} B")
    print(f"models left on the shared machine after unbinding: {left_bound}")
    print(
        result_line(
            "machine",
            shared_us=shared,
            per_message_us=per_message,
            speed_ratio=per_message / shared,
            machine_kib=machine_bytes / 1024,
            model_kib=model_bytes / 1024,
            memory_ratio=machine_bytes / model_bytes,
            retained_bytes=retained,
            left_bound=left_bound,
        )
    )


if __name__ == "__main__":
    main()
