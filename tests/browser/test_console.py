"""The operator console in real Chromium (Debian's package, driven by Playwright) against a real
`appt serve` and the sandbox: logging in, timelines, the live tail, retrying a parked saga,
replaying a dead letter, refusals, and an axe-core scan of every page.

One service and one browser serve the whole module (about 30 s), each test on its own
appointments. Screenshots of the overview and of an appointment go to the test's directory;
with APPT_SCREENSHOTS_TO_DOCS=1 to docs/ as well, where the README shows them.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from consumer.broker import Broker
from consumer.sandbox.state import FIRST_ID
from tests.conftest import RABBIT_HOST, RABBIT_PORT, drop_vhost, make_vhost
from tests.e2e.processes import SandboxProcess, ServiceProcess, service_env
from tests.helpers import eventually, starts_in

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = "/usr/bin/chromium"
TOKEN = "console-test-token-" + uuid.uuid4().hex[:8]
DOCS = Path(__file__).resolve().parents[2] / "docs"
ORIGINAL_PATIENT, NEW_PATIENT = 3001, 3002
UTC_TITLE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC$")


@dataclass
class Console:
    service: ServiceProcess
    sandbox: SandboxProcess
    broker: Broker
    browser: Browser
    shots: Path

    @property
    def url(self) -> str:
        return self.service.url + "/console/"

    async def context(self) -> BrowserContext:
        return await self.browser.new_context(viewport={"width": 1280, "height": 800})

    async def logged_in(self) -> Page:
        page = await (await self.context()).new_page()
        await page.goto(self.url)
        await page.get_by_label("API token").fill(TOKEN)
        await page.get_by_role("button", name="Log in").click()
        await expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
        return page

    async def seed(self, appointment_id: int, days: float, patient_id: int | None = ORIGINAL_PATIENT) -> None:
        await self.sandbox.knob("seed", appointments=[{
            "id": appointment_id, "patient_id": patient_id, "practitioner_id": 11, "reason": "Exam",
            "state": "Pending", **starts_in(days)}])

    async def send(self, command: dict[str, Any]) -> str:
        command_id = command.setdefault("command_id", uuid.uuid4().hex)
        await self.broker.publish_inbound(json.dumps(command).encode(), appointment_id=command["appointment_id"],
                                          message_id=command_id)
        return str(command_id)

    async def sandbox_row(self, appointment_id: int) -> dict[str, Any] | None:
        return next((a for a in await self.sandbox.appointments() if a["id"] == appointment_id), None)

    async def next_replacement_id(self) -> int:
        """The id the sandbox hands the next appointment it books (it counts up from FIRST_ID)."""
        booked = [a["id"] for a in await self.sandbox.appointments() if a["id"] >= FIRST_ID]
        return max(booked, default=FIRST_ID - 1) + 1

    async def screenshot(self, page: Page, name: str) -> None:
        await page.screenshot(path=self.shots / name, full_page=True)
        if os.environ.get("APPT_SCREENSHOTS_TO_DOCS") == "1":
            await page.screenshot(path=DOCS / name, full_page=True)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def console(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Console]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (.ci/run does)")
    tmp = tmp_path_factory.mktemp("console")
    vhost = make_vhost()
    amqp_url = f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
    sandbox = SandboxProcess(tmp).start()
    env = service_env(pms_url=sandbox.url, store=f"sqlite:///{tmp / 'appt.sqlite3'}", amqp_url=amqp_url,
                      APPT_API_TOKEN=TOKEN, APPT_MAX_DELIVERIES="2", APPT_PMS_RETRY_ATTEMPTS="1")
    service = ServiceProcess(env, tmp)
    broker = Broker(amqp_url)
    try:
        await sandbox.wait_ready()
        await sandbox.knob("rate_limit", budget=1_000_000)
        await service.start().wait_ready()
        await broker.connect()
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            yield Console(service, sandbox, broker, browser, tmp)
            await browser.close()
    finally:
        await broker.close()
        await service.terminate()
        await sandbox.terminate()
        drop_vhost(vhost)


async def test_logging_in_sets_a_secure_http_only_strict_cookie(console: Console) -> None:
    page = await (await console.context()).new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    await page.goto(console.url + "workflows")
    await expect(page).to_have_url(console.url + "login?next=/console/workflows")

    await page.get_by_label("API token").fill("not-the-token")
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_have_text("That token is not this service's APPT_API_TOKEN.")
    assert await page.context.cookies() == []

    await page.get_by_label("API token").fill(TOKEN)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", name="Reassignment workflows")).to_be_visible()
    [cookie] = await page.context.cookies()
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"], cookie["path"]) == (
        True, True, "Strict", "/console")
    assert TOKEN not in cookie["value"]
    # Everything the pages load comes from the service itself (no CDN), and the policy says so.
    assert requested and all(url.startswith(console.service.url + "/console") for url in requested)
    shown = await page.goto(console.url)
    assert shown is not None and "default-src 'self'" in shown.headers["content-security-policy"]


async def test_missing_or_wrong_credentials_and_forged_actions_are_refused(console: Console) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        async with http.get(console.url, allow_redirects=False) as anonymous:
            assert anonymous.status == 303 and anonymous.headers["Location"].startswith("/console/login")
        forged_cookie = {"appt_console": "nonce.0000"}
        async with http.get(console.url, cookies=forged_cookie, allow_redirects=False) as forged:
            assert forged.status == 303
        async with http.post(console.url + "dead", data={"action": "purge", "id": "1"}) as no_session:
            assert no_session.status == 403
        async with http.get(f"{console.service.url}/appointments/1", headers={"Authorization": "Bearer wrong"}) as api:
            assert api.status == 401  # the JSON API keeps its bearer header
        async with http.get(f"{console.service.url}/openapi.json") as contract:
            paths = (await contract.json())["paths"]
            assert "/appointments/{id}" in paths and not [p for p in paths if p.startswith("/console")]
    page = await console.logged_in()
    # The session cookie rides along, but a forged form has no CSRF token, or a wrong one.
    for form in ({"action": "purge", "id": "1"}, {"action": "purge", "id": "1", "csrf": "f" * 64}):
        refused = await page.request.post(console.url + "dead", form=form)
        assert refused.status == 403 and "CSRF" in await refused.text()
    retry = await page.request.post(console.url + "workflows/any/retry", form={"csrf": "0"})
    assert retry.status == 403
    cross_site = await page.request.post(console.url + "dead", form={"action": "purge", "id": "1"},
                                         headers={"Origin": "http://evil.example"})
    assert cross_site.status == 403


async def test_a_state_record_reaches_the_live_tail_within_two_seconds(console: Console) -> None:
    await console.seed(7101, days=3)
    page = await console.logged_in()
    await expect(page.get_by_role("status")).to_have_text("Live: new records appear at the top.")

    sent = time.monotonic()
    await console.send({"type": "confirm", "appointment_id": 7101})
    row = page.locator("#tail li", has_text="appointment 7101").filter(has_text="Confirmed")
    await expect(row).to_be_visible(timeout=2000)
    assert time.monotonic() - sent < 2.0
    await expect(row.locator("time")).to_have_attribute("title", UTC_TITLE)  # local time shown, UTC on hover
    await page.reload()  # the practice's budget, as the PMS reported it answering that command
    practice = page.get_by_role("region", name="Practices").get_by_role("row").nth(1)
    await expect(practice).to_contain_text("serving")
    assert float(await practice.get_by_role("meter").get_attribute("value") or -1) > 0
    await expect(page.get_by_role("status")).to_have_text("Live: new records appear at the top.")
    await console.send({"type": "edit_notes", "appointment_id": 7101, "notes": "bring x-rays"})
    await expect(page.locator("#tail li", has_text="appointment 7101")).to_be_visible()  # after the reload: new
    await console.screenshot(page, "console-overview.png")


async def test_a_reassignment_shows_two_linked_timelines(console: Console) -> None:
    await console.seed(7201, days=4)
    replacement_id = await console.next_replacement_id()
    await console.send({"type": "reassign", "appointment_id": 7201, "patient_id": NEW_PATIENT})
    await eventually(lambda: _state_is(console, 7201, "Cancelled"), timeout=15)
    page = await console.logged_in()

    await page.get_by_label("Search").fill("7201")
    await page.get_by_role("button", name="Find").click()
    await expect(page.get_by_role("heading", name="Appointment 7201")).to_be_visible()
    original = page.get_by_role("list", name="State log of appointment 7201")
    await expect(original.locator("> li").filter(has_text="Cancelled").first).to_be_visible()
    await expect(original).to_contain_text("completed")  # the workflow's own steps, on the same timeline
    await expect(page.locator("svg.machine .state.current")).to_have_text("Cancelled")
    await console.screenshot(page, "console-appointment.png")

    await page.get_by_role("navigation", name="Reassignment").get_by_role(
        "link", name=f"appointment {replacement_id}").click()
    await expect(page.get_by_role("heading", name=f"Appointment {replacement_id}")).to_be_visible()
    replacement = page.get_by_role("list", name=f"State log of appointment {replacement_id}")
    await expect(replacement).to_contain_text("replacement_created")
    await expect(page.get_by_role("navigation", name="Reassignment").get_by_role(
        "link", name="appointment 7201")).to_be_visible()


async def _state_is(console: Console, appointment_id: int, state: str) -> bool:
    row = await console.sandbox_row(appointment_id)
    return row is not None and row["state"] == state


async def test_retrying_a_parked_saga_from_the_ui_compensates_it(console: Console) -> None:
    await console.seed(7301, days=5)
    replacement_id = await console.next_replacement_id()
    await console.sandbox.knob("refuse_cancel", appointment_id=7301)
    await console.sandbox.knob("refuse_cancel", appointment_id=replacement_id)
    await console.sandbox.knob("refuse_deletes", enabled=True)
    await console.send({"type": "reassign", "appointment_id": 7301, "patient_id": NEW_PATIENT})
    page = await console.logged_in()

    async def parked() -> bool:
        await page.goto(console.url + "workflows?state=compensation_failed")
        return await page.locator("tr.stuck", has_text="7301").count() == 1

    await eventually(parked, timeout=15, interval=0.3)
    await console.sandbox.knob("refuse_deletes", enabled=False)  # the operator fixed the cause
    await page.locator("tr.stuck", has_text="7301").get_by_role("link").first.click()
    await page.get_by_role("button", name="Retry the compensation").click()

    await expect(page.get_by_role("status")).to_have_text("retried: now compensated")
    await expect(page.locator("svg.machine .state.current")).to_have_text("compensated")
    row = await console.sandbox_row(replacement_id)
    assert row is None or row["state"] == "Cancelled"  # no live replacement left
    assert (await console.sandbox_row(7301) or {}).get("state") == "Pending"


async def test_replaying_a_dead_letter_from_the_ui_applies_it(console: Console) -> None:
    await console.seed(7401, days=6)
    # An answer the service can't act on (400) never succeeds as it is: dead after its 2 deliveries.
    # (A PMS that is down would make the practice wait instead.)
    await console.sandbox.knob("fail", route="PUT /v1/appointments/{id}", count=10_000, status=400)
    command_id = await console.send({"type": "confirm", "appointment_id": 7401})
    page = await console.logged_in()

    async def listed() -> bool:
        await page.goto(console.url + "dead")
        return await page.get_by_role("row", name=command_id).count() == 1

    await eventually(listed, timeout=20, interval=0.3)
    await expect(page.get_by_role("heading", level=2).filter(has_text="gave up after N deliveries")).to_be_visible()
    await console.sandbox.knob("reset")  # the operator fixed the cause (the sandbox forgets everything)
    await console.sandbox.knob("rate_limit", budget=1_000_000)
    await console.seed(7401, days=6)
    await page.get_by_role("row", name=command_id).get_by_role("checkbox").check()
    await page.get_by_role("button", name="Replay selected…").click()
    await expect(page.get_by_role("heading", name="Replay 1 dead letter(s)?")).to_be_visible()
    await page.get_by_role("button", name="Yes, replay 1").click()

    await expect(page.get_by_role("status")).to_have_text("1 replayed")
    await eventually(lambda: _state_is(console, 7401, "Confirmed"), timeout=15)
    await expect(page.get_by_role("row", name=command_id)).to_have_count(0)


@pytest.mark.parametrize("path", ["", "workflows", "dead", "appointments/7501", "search?q=nothing-here"])
async def test_pages_have_no_serious_accessibility_violations(console: Console, path: str) -> None:
    if path == "appointments/7501" and await console.sandbox_row(7501) is None:
        await console.seed(7501, days=7)
        await console.send({"type": "confirm", "appointment_id": 7501})
        await eventually(lambda: _state_is(console, 7501, "Confirmed"), timeout=15)
    page = await console.logged_in()
    await page.goto(console.url + path)
    results = await Axe().run(page)
    serious = [v for v in results.response["violations"] if v["impact"] in ("serious", "critical")]
    assert serious == [], json.dumps([(v["id"], v["help"], [n["target"] for n in v["nodes"]]) for v in serious])
    await page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing wider than the screen
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


async def test_a_graceful_stop_is_not_held_up_by_an_open_live_tail(console: Console) -> None:
    """Last in this module: it stops the service the others share."""
    page = await console.logged_in()
    await expect(page.get_by_role("status")).to_have_text("Live: new records appear at the top.")
    started = time.monotonic()
    assert await console.service.terminate(timeout=20) == 0
    assert time.monotonic() - started < 10  # aiohttp would wait 60 s for the stream to end by itself
