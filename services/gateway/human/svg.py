"""A :class:`~shared.trace.TraceLayout` as SVG: lanes, bars, fork and join arrows, the critical path.

Two views: ``tokens`` (the organizer clock; decode bars, the critical path drawn over them in a strong
colour, forks and joins as arrows between lanes) and ``wall`` (each lane from its start to its end in
seconds; a running lane reaches "now"). Colours by lane kind: organizer, model worker, tool, person.
Pure: text in, text out (every label escaped).
"""

from __future__ import annotations

from html import escape

from shared.trace import Lane, TraceLayout

LANE_H = 28
LABEL_W = 230
PAD = 14
COLOURS = {"organizer": "#3b6fb6", "human organizer": "#b5562b", "model": "#6c8ebf", "tool": "#6aa56a", "human": "#d08a3a"}
CRITICAL = "#c0392b"


def _label(lane: Lane) -> str:
    if lane.agent == "organizer":
        return "organizer" + (" (a person)" if lane.author == "human" else "")
    where = lane.endpoint or "model"
    query = (lane.query or "").replace("\n", " ")
    return f"{lane.agent} @{where}: {query[:26]}{'…' if len(query) > 26 else ''}"


def render_svg(layout: TraceLayout, view: str = "tokens", *, width: int = 960) -> str:
    lanes = layout.lanes
    rows = {lane.agent: i for i, lane in enumerate(lanes)}
    height = PAD * 2 + LANE_H * max(1, len(lanes)) + 26
    plot_w = width - LABEL_W - PAD * 2
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" data-view="{view}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="episode timeline ({escape(view)})">',
        '<defs><marker id="arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>',
    ]

    def y(agent: str) -> float:
        return PAD + rows.get(agent, 0) * LANE_H

    for lane in lanes:
        top = y(lane.agent)
        kind = lane.kind
        parts.append(
            f'<g class="lane" data-agent="{escape(lane.agent)}" data-kind="{escape(kind)}">'
            f'<rect x="0" y="{top}" width="{width}" height="{LANE_H}" fill="{"#f6f7f9" if rows[lane.agent] % 2 else "#fff"}"/>'
            f'<circle cx="{PAD}" cy="{top + LANE_H / 2}" r="5" fill="{COLOURS.get(kind, "#888")}"/>'
            f'<text x="{PAD + 10}" y="{top + LANE_H / 2 + 4}" font-size="12" font-family="sans-serif">'
            f'{escape(_label(lane))}{" …" if lane.running else ""}</text></g>'
        )
    x0 = LABEL_W + PAD
    if view == "wall":
        origin, end = layout.wall_origin, layout.wall_end
        span = max((end or 0) - (origin or 0), 1e-3)
        scale = plot_w / span
        for lane in lanes:
            if not lane.wall_start or origin is None:
                continue
            stop = lane.wall_end or layout.now
            top = y(lane.agent) + 6
            parts.append(
                f'<rect class="wall-bar" data-agent="{escape(lane.agent)}" x="{x0 + (lane.wall_start - origin) * scale:.1f}" '
                f'y="{top}" width="{max(1.5, (stop - lane.wall_start) * scale):.1f}" height="{LANE_H - 12}" rx="3" '
                f'fill="{COLOURS.get(lane.kind, "#888")}" opacity="{0.55 if lane.running else 0.9}">'
                f'<title>{escape(lane.agent)}: {stop - lane.wall_start:.2f} s</title></rect>'
            )
        axis = f"wall time: {span:.2f} s" + (" (running)" if layout.live else "")
    else:
        total = max(layout.latency, 1)
        scale = plot_w / total
        for lane in lanes:
            top = y(lane.agent)
            parts.append(
                f'<line x1="{x0 + lane.start * scale:.1f}" x2="{x0 + lane.end * scale:.1f}" y1="{top + LANE_H / 2}" '
                f'y2="{top + LANE_H / 2}" stroke="#ccc" stroke-dasharray="3,3"/>'
            )
        for bar in layout.bars:
            top = y(bar.agent) + 7
            owner = layout.lane(bar.agent)
            parts.append(
                f'<rect class="bar" data-agent="{escape(bar.agent)}" x="{x0 + bar.start * scale:.1f}" y="{top}" '
                f'width="{max(1.0, (bar.end - bar.start) * scale):.1f}" height="{LANE_H - 14}" rx="2" '
                f'fill="{COLOURS.get(owner.kind if owner else "model", "#888")}"><title>{escape(bar.agent)}: tokens '
                f'{bar.start}–{bar.end}</title></rect>'
            )
        for iv in layout.critical:
            top = y(iv.agent) + LANE_H - 6
            parts.append(
                f'<rect class="critical" data-agent="{escape(iv.agent)}" x="{x0 + iv.start * scale:.1f}" y="{top}" '
                f'width="{max(1.0, (iv.end - iv.start) * scale):.1f}" height="3" fill="{CRITICAL}"/>'
            )
        for arrow in layout.arrows:
            if arrow.kind == "fork":
                x = x0 + arrow.at * scale
                parts.append(
                    f'<line class="arrow fork" x1="{x:.1f}" y1="{y(arrow.parent) + LANE_H / 2:.1f}" x2="{x:.1f}" '
                    f'y2="{y(arrow.child) + 6:.1f}" stroke="#555" marker-end="url(#arrow)"/>'
                )
            else:
                parts.append(
                    f'<line class="arrow join" x1="{x0 + arrow.child_at * scale:.1f}" y1="{y(arrow.child) + 6:.1f}" '
                    f'x2="{x0 + arrow.at * scale:.1f}" y2="{y(arrow.parent) + LANE_H - 6:.1f}" stroke="#555" '
                    f'stroke-dasharray="4,2" marker-end="url(#arrow)"/>'
                )
        axis = f"organizer clock: T = {layout.latency} tokens" + (" so far" if layout.live else "") + " · critical path in red"
    parts.append(
        f'<text x="{x0}" y="{height - 8}" font-size="12" font-family="sans-serif" fill="#333">{escape(axis)}</text></svg>'
    )
    return "".join(parts)
