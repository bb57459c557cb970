"""The console's state diagram is drawn from the machine's own table, current state marked."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from consumer.console.drawing import svg
from statemachines.diagram import graph

NS = {"s": "http://www.w3.org/2000/svg"}


def test_every_state_and_arrow_of_the_machine_is_drawn_and_only_the_current_state_is_marked() -> None:
    machine = graph("reassignment")
    drawn = ET.fromstring(str(svg(machine, "compensation_failed")))

    boxes = {g.find("s:text", NS).text: g.get("class") for g in drawn.iter("{http://www.w3.org/2000/svg}g")}
    assert set(boxes) == set(machine.states)
    assert [state for state, css in boxes.items() if "current" in (css or "")] == ["compensation_failed"]
    assert len(drawn.findall("s:path[@class='edge']", NS)) == len(machine.edges)
    labels = {t.text for t in drawn.findall("s:text[@class='label']", NS)}
    assert labels == {" / ".join(triggers) for triggers in machine.edges.values()}
    assert drawn.find("s:title", NS).text == "State diagram; current state: compensation_failed"


def test_no_state_is_marked_current_when_the_appointment_has_no_record() -> None:
    drawn = str(svg(graph("appointment"), None))
    assert "Did not attend" in drawn and not re.search(r'class="state current"', drawn)
