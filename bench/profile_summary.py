"""Where the time goes: a py-spy raw profile folded into a few buckets.

Run: ``py-spy record --format raw -o prof.txt -- python bench/bench_pipeline.py``
then ``python bench/profile_summary.py prof.txt``. Only the event loop's
thread is counted, without its idle time in ``select``; each sample goes to
the first bucket (in the order below) with a frame in its stack, so a log
call made while publishing counts as logging, not as publishing.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

# (bucket, substrings of a frame that put a sample in it), checked in this order.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("bench harness", ("consume_until", "publish_commands", "domain_seconds", "seed_sandbox", "Results.")),
    ("logging (structlog + stdlib)", ("structlog/", "logging/__init__.py")),
    ("domain (statemachines, transitions)", ("statemachines/", "transitions/")),
    ("store (SQLite, its own thread)", ("SqliteStore", "consumer/store/")),
    ("PMS client (aiohttp client)", ("PmsClient", "aiohttp/client", "aiohttp/connector")),
    ("broker (aio-pika, aiormq, pamqp)", ("Broker.", "aio_pika/", "aiormq/", "pamqp/")),
    ("pydantic (validate / dump)", ("pydantic",)),
    ("signature check (HMAC)", ("consumer/signing.py",)),
    ("tenacity (retry wrappers)", ("tenacity/",)),
    ("HTTP server (aiohttp web)", ("aiohttp/web",)),
]
IDLE = ("EpollSelector.select", "_PollLikeSelector.select")


def bucket_of(stack: str) -> str:
    for name, markers in BUCKETS:
        if any(marker in stack for marker in markers):
            return name
    return "asyncio + the rest"


def summarise(path: Path) -> list[tuple[str, float]]:
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if "_run_once" not in stack or stack.split(";")[-1].startswith(IDLE):
            continue  # another thread, or the loop waiting for I/O
        counts[bucket_of(stack)] += int(number)
    total = sum(counts.values()) or 1
    return [(name, count / total) for name, count in counts.most_common()]


def main() -> None:
    for name, share in summarise(Path(sys.argv[1])):
        print(f"{share:6.1%}  {name}")


if __name__ == "__main__":
    main()
