"""Mermaid diagrams drawn from the machines' own transition tables, so they can't drift."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from statemachines import appointment, reassignment

Definition = tuple[tuple[str, ...], list[dict[str, Any]]]

DEFINITIONS: dict[str, Callable[[], Definition]] = {
    "appointment": appointment.machine_definition,
    "reassignment": reassignment.machine_definition,
}


@dataclass(frozen=True)
class Graph:
    """A machine's states and arrows, for drawing it elsewhere (the console) as ``mermaid`` does."""

    states: tuple[str, ...]
    edges: dict[tuple[str, str], list[str]]
    """(source, dest) -> the triggers that move between them."""
    wildcard: dict[str, list[str]]
    """Triggers allowed from any state -> where they lead."""


def graph(machine_name: str) -> Graph:
    try:
        states, table = DEFINITIONS[machine_name]()
    except KeyError:
        raise ValueError(
            f"unknown machine {machine_name!r}; known: {', '.join(DEFINITIONS)}"
        ) from None
    edges, wildcard = _edges(table)
    return Graph(states, edges, wildcard)


def mermaid(machine_name: str) -> str:
    """A ``stateDiagram-v2`` of one machine.

    Transitions between the same two states share one arrow with their
    triggers joined; an internal transition is a self-loop; a transition from
    any state ("*") is a note on the initial state, since drawing it from
    every state would hide everything else.
    """
    drawn = graph(machine_name)
    states, edges, wildcard = drawn.states, drawn.edges, drawn.wildcard
    initial = states[0]
    lines = ["stateDiagram-v2"]
    lines += [f'    state "{state}" as {_node(state)}' for state in states]
    lines.append(f"    [*] --> {_node(initial)}")
    for (source, dest), triggers in edges.items():
        lines.append(f"    {_node(source)} --> {_node(dest)} : {' / '.join(triggers)}")
    for state in _terminal(states, edges):
        lines.append(f"    {_node(state)} --> [*]")
    for trigger, dests in wildcard.items():
        lines.append(f"    note right of {_node(initial)}")
        lines.append(f"        {trigger}: from any state to {', '.join(dests)}")
        lines.append("    end note")
    return "\n".join(lines) + "\n"


def _edges(
    table: list[dict[str, Any]],
) -> tuple[dict[tuple[str, str], list[str]], dict[str, list[str]]]:
    edges: dict[tuple[str, str], list[str]] = {}
    wildcard: dict[str, list[str]] = {}
    for row in table:
        trigger, dest = row["trigger"], row["dest"]
        if row["source"] == "*":
            wildcard.setdefault(trigger, []).append(dest)
            continue
        sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
        for source in sources:
            triggers = edges.setdefault((source, dest or source), [])
            if trigger not in triggers:
                triggers.append(trigger)
    return edges, wildcard


def _terminal(states: tuple[str, ...], edges: dict[tuple[str, str], list[str]]) -> list[str]:
    """States nothing leaves (wildcard moves aside): where the lifecycle ends."""
    leaving = {source for source, dest in edges if source != dest}
    return [state for state in states[1:] if state not in leaving]


def _node(state: str) -> str:
    """Mermaid ids can't hold spaces; the label keeps the real name."""
    return re.sub(r"\W", "_", state)
