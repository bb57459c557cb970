"""Webhook ingest: signed webhook -> verify -> validate -> publish with confirm -> 202.

Run: ``python bench/bench_ingest.py [--duration 4 --rounds 3]``. Three
servers, each in its own process, are driven by the same load generator
(bench/load.py, another process) over 32 keep-alive loopback connections:

- bare:    aiohttp reads the body and answers 202 (the framework's ceiling);
- naive:   publishes the body with a confirm, then 202 (the broker's ceiling);
- service: the real receiver (consumer.webhooks) with a real Broker and SQLite store.

The three are measured in interleaved rounds and the best round of each is
kept, so a burst of other load on the machine penalises no one server; the
server's CPU time per request is measured too, as it barely moves with such
noise. A last phase offers the service a quarter of its saturated rate,
because a closed loop at saturation has latency = connections / throughput
by Little's law, which says nothing about the latency a sender sees normally.

No worker consumes, so afterwards every accepted webhook must be sitting in
the partition queues: the queued count is checked against the 2xx count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    child_server,
    purge_partitions,
    result_line,
    sqlite_url,
    throwaway_vhost,
)

LOAD = Path(__file__).resolve().parent / "load.py"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CONNECTIONS = 32
KINDS = ("bare", "naive", "service")
TARGET_P99_MS = 30.0
LOAD_SHARE = 0.25  # of the saturated rate, for the latency a sender normally sees


def drive(url: str, duration: float, connections: int, rate: float) -> dict[str, Any]:
    """Run the load generator in its own process against ``url``; its JSON summary."""
    finished = subprocess.run(
        [
            sys.executable,
            str(LOAD),
            f"{url}/webhooks/pms",
            "--secret",
            SECRET,
            "--connections",
            str(connections),
            "--duration",
            str(duration),
            "--rate",
            str(rate),
        ],
        capture_output=True,
        text=True,
        timeout=duration + 120,
        check=True,
    )
    summary: dict[str, Any] = json.loads(finished.stdout.strip().splitlines()[-1])
    return summary


def measure(
    kind: str,
    amqp_url: str,
    workdir: str,
    duration: float,
    connections: int,
    rate: float = 0.0,
) -> dict[str, Any]:
    """One server, one load run; then count (and empty) what reached the queues."""
    args = ["--amqp", amqp_url, "--store", sqlite_url(workdir, "ingest.sqlite3"), "--secret", SECRET]
    with child_server(kind, *args, log_path=Path(workdir) / f"{kind}.log") as server:
        cpu_before = server.cpu_seconds()
        summary = drive(server.url, duration, connections, rate)
        summary["cpu_us"] = (server.cpu_seconds() - cpu_before) / max(1, summary["answered_total"]) * 1e6
    summary["queued"] = 0
    if kind != "bare":  # the bare server declares no queues
        summary["queued"] = asyncio.run(purge_partitions(amqp_url))  # the purge answers how many it took
    offered = f" at {rate:.0f}/s offered" if rate else ""
    print(
        f"{kind:8s} {summary['rps']:6.0f} req/s{offered}  p50 {summary['p50_ms']:6.2f} ms  "
        f"p99 {summary['p99_ms']:6.2f} ms  cpu {summary['cpu_us']:4.0f} us/req  "
        f"statuses {summary['statuses']}  accepted {summary['accepted_total']}  "
        f"queued {summary['queued']}",
        flush=True,
    )
    if kind != "bare" and summary["queued"] != summary["accepted_total"]:
        print(f"MISMATCH {kind}: {summary['accepted_total']} accepted but {summary['queued']} queued")
    return summary


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest round, with the median CPU per request over all rounds."""
    top = dict(max(runs, key=lambda run: run["rps"]))
    top["cpu_us"] = statistics.median(run["cpu_us"] for run in runs)
    return top


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    with throwaway_vhost() as amqp_url, tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.rounds):
            for kind in KINDS:
                runs[kind].append(measure(kind, amqp_url, workdir, args.duration, args.connections))
        bare, naive, service = (best(runs[kind]) for kind in KINDS)
        paced = measure("service", amqp_url, workdir, args.duration, args.connections, rate=service["rps"] * LOAD_SHARE)
    queued = sum(run["queued"] for run in runs["service"]) + paced["queued"]
    accepted = sum(run["accepted_total"] for run in runs["service"]) + paced["accepted_total"]
    print(
        f"best of {args.rounds}: service/naive = {service['rps'] / naive['rps']:.2f}x (target >= 1.0), "
        f"naive/bare = {naive['rps'] / bare['rps']:.2f}x; service p99 {service['p99_ms']:.1f} ms saturated, "
        f"{paced['p99_ms']:.1f} ms at a quarter load (target < {TARGET_P99_MS:.0f})"
    )
    print(
        result_line(
            "ingest",
            service_rps=service["rps"],
            naive_rps=naive["rps"],
            bare_rps=bare["rps"],
            service_per_naive=service["rps"] / naive["rps"],
            naive_per_bare=naive["rps"] / bare["rps"],
            p50_ms=service["p50_ms"],
            p99_ms=service["p99_ms"],
            quarter_load_rps=paced["rps"],
            quarter_load_p50_ms=paced["p50_ms"],
            quarter_load_p99_ms=paced["p99_ms"],
            naive_p99_ms=naive["p99_ms"],
            bare_p99_ms=bare["p99_ms"],
            service_cpu_us=service["cpu_us"],
            naive_cpu_us=naive["cpu_us"],
            bare_cpu_us=bare["cpu_us"],
            queued=queued,
            accepted=accepted,
        )
    )


if __name__ == "__main__":
    main()
