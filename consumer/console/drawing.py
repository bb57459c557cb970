"""A machine's state diagram as inline SVG, drawn on the server from ``statemachines.diagram.graph``.

States stand in a column in the machine's own order; an arrow to a later state
curves out on the right, one back to an earlier state (or to itself) on the
left, each wider the further it goes, so labels of arrows of different lengths
stand apart. No JavaScript, no
layout engine: the diagram is readable without either.
"""

from __future__ import annotations

from html import escape

from markupsafe import Markup

from statemachines.diagram import Graph

BOX_W, BOX_H, GAP, LEFT, TOP = 150, 30, 26, 150, 10
SPREAD = 40  # how much wider an arrow bulges per state it skips
STEP = BOX_H + GAP
WIDTH = LEFT + BOX_W + 300


def _y(index: int) -> float:
    return TOP + index * STEP + BOX_H / 2


def _edge(src: int, dst: int, label: str) -> str:
    if src == dst:
        x, y = LEFT, _y(src)
        path = f"M{x},{y - 8} c-28,-16 -28,32 0,16"
        return (f'<path class="edge" d="{path}" marker-end="url(#arrow)"/>'
                f'<text class="label" x="{x - 26}" y="{y + 4}" text-anchor="end">{escape(label)}</text>')
    span = abs(dst - src)
    right = dst > src
    x = LEFT + BOX_W if right else LEFT
    bulge = (24 + SPREAD * span) * (1 if right else -1)
    y1, y2 = _y(src), _y(dst)
    path = f"M{x},{y1} C{x + bulge},{y1} {x + bulge},{y2} {x},{y2}"
    lx = x + bulge * 0.75 + (4 if right else -4)
    anchor = "start" if right else "end"
    return (f'<path class="edge" d="{path}" marker-end="url(#arrow)"/>'
            f'<text class="label" x="{lx}" y="{(y1 + y2) / 2 + 4}" text-anchor="{anchor}">{escape(label)}</text>')


def svg(graph: Graph, current: str | None) -> Markup:
    index = {state: i for i, state in enumerate(graph.states)}
    height = TOP * 2 + len(graph.states) * STEP
    title = "State diagram" + (f"; current state: {current}" if current else "")
    parts = [f'<svg class="machine" viewBox="0 0 {WIDTH} {height}" role="img" aria-labelledby="svg-title" '
             f'xmlns="http://www.w3.org/2000/svg"><title id="svg-title">{escape(title)}</title>'
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>']
    for (source, dest), triggers in graph.edges.items():
        parts.append(_edge(index[source], index[dest], " / ".join(triggers)))
    for state, i in index.items():
        css = "state current" if state == current else "state"
        parts.append(f'<g class="{css}"><rect x="{LEFT}" y="{TOP + i * STEP}" width="{BOX_W}" height="{BOX_H}" rx="8"/>'
                     f'<text x="{LEFT + BOX_W / 2}" y="{_y(i) + 5}" text-anchor="middle">{escape(state)}</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))
