"""The two practices' PMSs of the chaos harness (tests/chaos/common.py): sandboxes in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from consumer.sandbox import RunningSandbox, running_sandbox


@pytest.fixture
async def pms() -> AsyncIterator[RunningSandbox]:
    """The sandbox in this process, with no hourly budget to run out of."""
    async with running_sandbox(port=0, rate_limit=10**9) as sandbox:
        sandbox.state.set_webhook_retry_delay(0.05)  # a restarted service gets its webhooks soon
        sandbox.state.set_latency(0.03)  # so that a kill finds PMS calls and sagas in flight
        yield sandbox


@pytest.fixture
async def north() -> AsyncIterator[RunningSandbox]:
    """A second practice's PMS: its own token, and the same appointment ids as the first's."""
    async with running_sandbox(port=0, token="north-token", rate_limit=10**9) as sandbox:
        sandbox.state.set_webhook_retry_delay(0.05)
        sandbox.state.set_latency(0.03)
        yield sandbox
