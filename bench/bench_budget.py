"""The PMS budget: requests per command, commands per hour of budget, polling per hour.

Run: ``python bench/bench_budget.py [--per-type 20]``. Every figure is counted on the
sandbox's own call log (in this process, so nothing is estimated):

1. per command type (confirm, edit_notes, cancel, reassign) and per
   ``APPT_READ_BEFORE_WRITE`` policy: ``--per-type`` commands through the real
   pipeline on appointments the service already holds (records as a webhook
   leaves them), after one command has warmed the practice's cancellation
   reasons; the commands one practice's 3,600 requests/hour can carry;
2. polling: the reconciler (default interval, horizon and budget share) over
   2,000 appointments spread on the next 30 days, one simulated hour of cycles
   on a budget of 3,600, with nothing changed: requests spent against its share.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    UNLIMITED_BUDGET,
    appointments,
    publish_commands,
    result_line,
    running_pipeline,
    sqlite_url,
    throwaway_vhost,
)
from consumer.commands import ReadBeforeWrite  # noqa: E402
from consumer.reconciler import Reconciler  # noqa: E402
from consumer.records import new_record  # noqa: E402
from consumer.sandbox import running_sandbox  # noqa: E402
from consumer.settings import Settings  # noqa: E402
from consumer.store.base import Commit  # noqa: E402

HOURLY_BUDGET = 3600
TYPES = ("confirm", "edit_notes", "cancel", "reassign")
TARGETS = {"always": {"reassign": 3.0, "other": 2.0}, "on_conflict": {"reassign": 3.0, "other": 1.1}}


def command(kind: str, appointment_id: int, tag: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"confirm": {}, "edit_notes": {"notes": f"{tag} note"},
                              "cancel": {"reason": "Patient cancelled"}, "reassign": {"patient_id": 2001}}[kind]
    return {"type": kind, "command_id": f"{tag}-{kind}-{appointment_id}", "appointment_id": appointment_id, **fields}


async def per_command(policy: ReadBeforeWrite, per_type: int, directory: str) -> dict[str, float]:
    """Requests per command of each type under ``policy``."""
    async with running_sandbox(port=0, rate_limit=UNLIMITED_BUDGET) as sandbox:
        seeded = sandbox.state.seed(appointments(1000, 1 + per_type * len(TYPES)))
        with throwaway_vhost() as amqp_url:
            async with running_pipeline(amqp_url, sqlite_url(directory, policy), sandbox.url, prefetch=64,
                                        pms_concurrency=8, read_before_write=policy) as pipeline:
                for row in seeded:  # held as the webhooks left them
                    record = new_record(None, row["state"], row["patient_id"], row, practice="default")
                    await pipeline.store.commit(Commit(appointment=record))
                await pipeline.worker.start()
                await publish_commands(pipeline.broker, [command("cancel", seeded[0]["id"], "warm")])
                await pipeline.results.wait_for(1, 30)
                spent: dict[str, float] = {}
                for index, kind in enumerate(TYPES):
                    ids = [row["id"] for row in seeded[1 + index * per_type:1 + (index + 1) * per_type]]
                    before = len(sandbox.state.calls)
                    await publish_commands(pipeline.broker, [command(kind, i, policy) for i in ids])
                    await pipeline.results.wait_for(2 + index * per_type + per_type - 1, 120)
                    spent[kind] = (len(sandbox.state.calls) - before) / per_type
                outcomes = await pipeline.results.take(1 + per_type * len(TYPES))
                if set(outcomes) != {"succeeded"}:
                    raise SystemExit(f"not every command succeeded under {policy}: {outcomes}")
    return spent


async def polling_per_hour(directory: str, count: int = 2000, horizon_days: int = 30) -> tuple[int, int]:
    """(requests spent in one simulated hour of cycles, the share it may spend)."""
    settings = Settings()
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    clock = [now]
    async with running_sandbox(port=0, rate_limit=HOURLY_BUDGET) as sandbox:
        step = timedelta(days=horizon_days) / count
        rows = []
        for i, row in enumerate(appointments(50_000, count)):
            start = now + timedelta(hours=1) + step * i
            rows.append({**row, "start_time": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                         "finish_time": (start + timedelta(minutes=20)).strftime("%Y-%m-%dT%H:%M:%SZ")})
        sandbox.state.seed(rows)
        with throwaway_vhost() as amqp_url:
            async with running_pipeline(amqp_url, sqlite_url(directory, "polling"), sandbox.url, prefetch=64,
                                        pms_concurrency=8) as pipeline:
                reconciler = Reconciler(pipeline.pms, pipeline.broker, pipeline.store,
                                        horizon_days=settings.reconcile_horizon_days,
                                        budget_share=settings.reconcile_budget_share, clock=lambda: clock[0])
                before = len(sandbox.state.calls)
                cycles = int(3600 / settings.reconcile_interval)
                for _ in range(cycles):
                    await reconciler.poll()
                    clock[0] += timedelta(seconds=settings.reconcile_interval)
                spent = len(sandbox.state.calls) - before
                return spent, reconciler.allowance()


async def main(per_type: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        table = {policy: await per_command(policy, per_type, directory) for policy in ("always", "on_conflict")}
        polled, share = await polling_per_hour(directory)
    print(f"{'command':<12} {'policy':<12} {'requests':>9} {'target':>7} {'commands/hour':>14}")
    for policy, spent in table.items():
        for kind, requests in spent.items():
            target = TARGETS[policy]["reassign" if kind == "reassign" else "other"]
            print(f"{kind:<12} {policy:<12} {requests:>9.2f} {target:>7.1f} {HOURLY_BUDGET / requests:>14.0f}")
    print(f"polling: {polled} requests in one hour for 2,000 appointments over 30 days "
          f"(share {share} of {HOURLY_BUDGET})")
    figures = {f"{kind}_{policy}": value for policy, spent in table.items() for kind, value in spent.items()}
    print(result_line("budget", **figures, polling_per_hour=polled, polling_share=share))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-type", type=int, default=20)
    asyncio.run(main(parser.parse_args().per_type))
