"""The README's diagrams are the machines' own: regenerate them and compare, so docs can't drift."""

from __future__ import annotations

from pathlib import Path

import pytest

from statemachines.diagram import mermaid

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("machine", ["appointment", "reassignment"])
def test_the_readme_shows_the_generated_diagram(machine: str) -> None:
    assert f"```mermaid\n{mermaid(machine).strip()}\n```" in README.read_text()


def test_every_setting_is_documented() -> None:
    from consumer.settings import Settings

    text = README.read_text()
    missing = [name for name in Settings.model_fields if f"APPT_{name.upper()}" not in text]
    assert missing == []
