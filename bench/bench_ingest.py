"""Webhook ingest: signed webhook -> verify -> validate -> publish with confirm -> 202.

Run: ``python bench/bench_ingest.py [--duration 10]``. Three servers, each in
its own process, are driven in turn by the same load generator (bench/load.py,
another process) over 32 keep-alive loopback connections:

- bare:    aiohttp reads the body and answers 202 (the framework's ceiling);
- naive:   publishes the body with a confirm, then 202 (the broker's ceiling);
- service: the real receiver (consumer.webhooks) with a real Broker and SQLite store.

No worker consumes, so afterwards every accepted webhook must be sitting in
the partition queues: the queued count is checked against the 2xx count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    child_server,
    purge_partitions,
    queued_messages,
    result_line,
    sqlite_url,
    throwaway_vhost,
)

LOAD = Path(__file__).resolve().parent / "load.py"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CONNECTIONS = 32
TARGET_P99_MS = 30.0


def drive(url: str, duration: float, connections: int) -> dict[str, Any]:
    """Run the load generator in its own process against ``url``; its JSON summary."""
    finished = subprocess.run(
        [sys.executable, str(LOAD), f"{url}/webhooks/pms", "--secret", SECRET,
         "--connections", str(connections), "--duration", str(duration)],
        capture_output=True, text=True, timeout=duration + 120, check=True,
    )
    summary: dict[str, Any] = json.loads(finished.stdout.strip().splitlines()[-1])
    return summary


def measure(kind: str, amqp_url: str, workdir: str, duration: float, connections: int) -> dict[str, Any]:
    args = ["--amqp", amqp_url, "--store", sqlite_url(workdir, "ingest.sqlite3"), "--secret", SECRET]
    log_path = Path(workdir) / f"{kind}.log"
    with child_server(kind, *args, log_path=log_path) as server:
        summary = drive(server.url, duration, connections)
    summary["queued"] = 0
    if kind != "bare":  # the bare server declares no queues
        summary["queued"] = asyncio.run(queued_messages(amqp_url))
        asyncio.run(purge_partitions(amqp_url))
    print(f"{kind:8s} {summary['rps']:8.0f} req/s  p50 {summary['p50_ms']:6.2f} ms  "
          f"p99 {summary['p99_ms']:6.2f} ms  statuses {summary['statuses']}  "
          f"accepted {summary['accepted_total']}  queued {summary['queued']}", flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per server")
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    args = parser.parse_args()
    with throwaway_vhost() as amqp_url, tempfile.TemporaryDirectory() as workdir:
        # The naive server declares the topology, so the first queue count already has queues.
        results = {kind: measure(kind, amqp_url, workdir, args.duration, args.connections)
                   for kind in ("bare", "naive", "service")}
    bare, naive, service = results["bare"], results["naive"], results["service"]
    print(f"service/naive = {service['rps'] / naive['rps']:.2f}x (target >= 1.0), "
          f"naive/bare = {naive['rps'] / bare['rps']:.2f}x, "
          f"service p99 {service['p99_ms']:.1f} ms (target < {TARGET_P99_MS:.0f})")
    print(result_line(
        "ingest",
        service_rps=service["rps"], naive_rps=naive["rps"], bare_rps=bare["rps"],
        service_per_naive=service["rps"] / naive["rps"], naive_per_bare=naive["rps"] / bare["rps"],
        p50_ms=service["p50_ms"], p99_ms=service["p99_ms"],
        naive_p99_ms=naive["p99_ms"], bare_p99_ms=bare["p99_ms"],
        queued=service["queued"], accepted=service["accepted_total"],
        naive_queued=naive["queued"], naive_accepted=naive["accepted_total"],
    ))


if __name__ == "__main__":
    main()
