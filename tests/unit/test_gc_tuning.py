"""The worker process's cycle collector: young collections rarer, start-up objects left out."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from consumer.service import GC_YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def young_collections_during(allocations: int) -> int:
    """Young collections while ``allocations`` short-lived-but-overlapping containers are made."""
    runs = 0

    def count(phase: str, info: dict[str, Any]) -> None:
        nonlocal runs
        if phase == "start" and info["generation"] == 0:
            runs += 1

    kept: list[dict[str, int]] = []
    gc.collect()
    gc.callbacks.append(count)
    try:
        for number in range(allocations):
            kept.append({"n": number})  # alive until the end, as in-flight work is
    finally:
        gc.callbacks.remove(count)
    return runs


def test_young_collections_are_rarer_after_tuning(restored_gc: None) -> None:
    before = young_collections_during(5_000)
    tune_gc()
    after = young_collections_during(5_000)
    assert before >= 5  # every ~700 allocations at Python's default
    assert after == 0  # 5,000 < the worker's threshold
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD


def test_what_start_up_built_is_left_out_of_collections(restored_gc: None) -> None:
    tune_gc()
    assert gc.get_freeze_count() > 1_000  # the modules, classes and objects imported so far
