"""SIGTERM under load: stop consuming, finish or requeue in-flight messages, exit 0, lose nothing."""

from __future__ import annotations

import json
from pathlib import Path

import aio_pika
import pytest

from consumer.broker import EVENTS_EXCHANGE, Broker
from consumer.store.opening import open_store
from tests.e2e.processes import SandboxProcess, ServiceProcess, service_env
from tests.helpers import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

APPOINTMENTS = range(70_001, 70_021)
ROUNDS = 20


async def test_sigterm_under_load_exits_cleanly_and_the_restart_finishes_the_rest(
    amqp_url: str, tmp_path: Path
) -> None:
    sandbox = SandboxProcess(tmp_path).start()
    await sandbox.wait_ready()
    await sandbox.knob(
        "seed",
        appointments=[
            {
                "id": i,
                "patient_id": 1013,
                "practitioner_id": 1,
                "start_time": "2031-02-03T09:00:00Z",
                "finish_time": "2031-02-03T09:30:00Z",
                "state": "Pending",
            }
            for i in APPOINTMENTS
        ],
    )
    await sandbox.knob("latency", seconds=0.05)  # in flight at the SIGTERM, for sure
    store_url = f"sqlite:///{tmp_path / 'appt.sqlite3'}"
    service = ServiceProcess(service_env(pms_url=sandbox.url, store=store_url, amqp_url=amqp_url), tmp_path)

    results: dict[str, str] = {}
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    broker = Broker(amqp_url)
    await broker.connect()  # declares the topology, so the durable observer queue can bind
    queue = await channel.declare_queue("test.shutdown.results", durable=True)
    await queue.bind(EVENTS_EXCHANGE, routing_key="result.#")

    async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        results[body["command_id"]] = body["outcome"]
        await message.ack()

    await queue.consume(on_result)
    commands = [f"term-{i}-{n}" for n in range(ROUNDS) for i in APPOINTMENTS]
    for command_id in commands:
        _, appointment_id, n = command_id.split("-")
        body = {
            "type": "edit_notes",
            "command_id": command_id,
            "appointment_id": int(appointment_id),
            "notes": f"note {n}",
        }
        await broker.publish_inbound(
            json.dumps(body).encode(), appointment_id=int(appointment_id), message_id=command_id
        )

    service.start()
    await service.wait_ready()
    await eventually(lambda: len(results) >= 10, timeout=30)
    code = await service.terminate(timeout=30)
    answered_before_restart = len(results)

    assert code == 0, service.tail()
    assert "worker stopped" in service.log_text()
    assert answered_before_restart < len(commands), "the load ended before the SIGTERM: nothing was tested"

    service.start()
    await service.wait_ready()
    await eventually(lambda: set(results) >= set(commands), timeout=60)
    await service.terminate(timeout=30)

    assert set(results.values()) == {"succeeded"}
    store = open_store(store_url)
    await store.open()
    try:
        for appointment_id in APPOINTMENTS:
            applied = [r.command_id for r in await store.history(appointment_id, limit=1000) if r.source == "command"]
            assert applied == [f"term-{appointment_id}-{n}" for n in range(ROUNDS)], applied
    finally:
        await store.close()
        await broker.close()
        await connection.close()
        await sandbox.terminate()
    print(
        f"shutdown commands={len(commands)} answered_before_sigterm={answered_before_restart} "
        f"exit_code={code} lost=0 applied_twice=0"
    )
