"""SQLite keeps times as text, and every range query over them (retention, polling
watermarks) compares that text: it must sort as the times do, whatever the input's zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from consumer.store.schema import parse_time, sqlite_time


def test_the_text_is_fixed_width_utc_with_microseconds() -> None:
    on_the_second = datetime(2026, 12, 3, 9, 5, 7, tzinfo=UTC)
    assert sqlite_time(on_the_second) == "2026-12-03T09:05:07.000000+00:00"
    assert sqlite_time(on_the_second.replace(microsecond=42)) == "2026-12-03T09:05:07.000042+00:00"


def test_other_zones_and_naive_times_are_written_as_utc() -> None:
    paris = datetime(2026, 7, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert sqlite_time(paris) == "2026-07-01T10:00:00.000000+00:00"
    assert sqlite_time(datetime(2026, 7, 1, 10, 0)) == "2026-07-01T10:00:00.000000+00:00"


def test_text_order_is_time_order_and_reads_back_the_same_instant() -> None:
    start = datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    times = [start + timedelta(microseconds=step * 37_001) for step in range(-50, 50)]
    texts = [sqlite_time(value) for value in times]
    assert sorted(texts) == texts
    assert len({len(text) for text in texts}) == 1
    assert [parse_time(text) for text in texts] == times
