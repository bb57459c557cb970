"""kill -9 of `appt serve` between keeping a dead letter and answering it: kept once, answered once."""

from __future__ import annotations

import json
from pathlib import Path

import aio_pika
import pytest

from consumer.broker import EVENTS_EXCHANGE, INBOUND_EXCHANGE, Broker
from consumer.store.base import DeadLetterQuery
from consumer.store.opening import open_store
from tests.e2e.processes import SandboxProcess, ServiceProcess, service_env
from tests.helpers import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_a_service_killed_after_storing_a_dead_letter_answers_it_once_after_restart(
    amqp_url: str, tmp_path: Path
) -> None:
    sandbox = SandboxProcess(tmp_path).start()
    await sandbox.wait_ready()
    store_url = f"sqlite:///{tmp_path / 'appt.sqlite3'}"
    service = ServiceProcess(service_env(pms_url=sandbox.url, store=store_url, amqp_url=amqp_url), tmp_path)
    broker = Broker(amqp_url)
    await broker.connect()  # declares the topology, so the observer queue can bind
    connection = await aio_pika.connect(amqp_url)
    store = open_store(store_url)
    try:
        channel = await connection.channel()
        results = await channel.declare_queue("test.crash.results", durable=True)
        await results.bind(EVENTS_EXCHANGE, routing_key="result.#")
        exchange = await channel.get_exchange(INBOUND_EXCHANGE)
        body = json.dumps({"command_id": "no-reason", "type": "cancel", "appointment_id": 5}).encode()
        await exchange.publish(aio_pika.Message(body, message_id="no-reason"), routing_key="5")

        service.start(APPT_FAILPOINTS="after_dead_letter_stored")
        assert await service.wait_exit(30) == -9  # stored, not yet answered nor acked
        assert await results.get(fail=False) is None
        await service.start().wait_ready()

        answered = await eventually(lambda: results.get(fail=False), timeout=20)
        await answered.ack()
        await store.open()
        kept = await store.dead_letters(DeadLetterQuery())
        await service.terminate()
        leftover = await results.get(fail=False)
    finally:
        service.kill()
        sandbox.kill()
        await store.close()
        await connection.close()
        await broker.close()

    result = json.loads(answered.body)
    assert (result["command_id"], result["outcome"], result["deliveries"]) == ("no-reason", "failed", 1)
    assert "Field required" in result["reasons"]["dead_letter"][0]
    assert [(d.command_id, d.reason_class) for d in kept] == [("no-reason", "invalid")]
    assert leftover is None or json.loads(leftover.body) == result  # a repeat is identical
