"""The diagrams are drawn from the machine definitions, so everything defined shows up."""

from __future__ import annotations

from types import ModuleType

import pytest

from statemachines import appointment, reassignment
from statemachines.diagram import mermaid


@pytest.mark.parametrize("module", [appointment, reassignment])
def test_diagram_shows_every_state_and_trigger(module: ModuleType) -> None:
    states, table = module.machine_definition()
    text = mermaid(module.__name__.rsplit(".", 1)[1])
    assert text.startswith("stateDiagram-v2\n")
    for state in states:
        assert f'state "{state}" as ' in text
    for trigger in {row["trigger"] for row in table}:
        assert trigger in text


def test_appointment_diagram_starts_new_and_ends_in_final_states() -> None:
    text = mermaid("appointment")
    assert "[*] --> New" in text
    for final in ["Completed", "Cancelled", "Did_not_attend", "Deleted"]:
        assert f"{final} --> [*]" in text
    assert "Pending --> Confirmed : confirm / edit" in text
    assert "Arrived --> [*]" not in text


def test_reassignment_diagram_ends_exactly_in_the_terminal_states() -> None:
    text = mermaid("reassignment")
    assert "[*] --> requested" in text
    ends = {line.split(" --> ")[0].strip() for line in text.splitlines() if line.endswith("--> [*]")}
    assert ends == reassignment.TERMINAL
    assert "compensation_failed --> compensating : retry" in text


def test_unknown_machine_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="appointment"):
        mermaid("billing")
