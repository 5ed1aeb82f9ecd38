"""An episode's timeline as a PNG (matplotlib): organizer-token time with the critical path, and wall time.

The same :class:`~shared.trace.TraceLayout` the web page draws: one lane per agent, decode bars, fork
arrows (parent → child at the fork's clock) and join arrows (child's end → where the parent resumes),
the critical path drawn over the bars; below, each lane's span in seconds. matplotlib is imported here
only (the Agg backend: no display needed).
"""

from __future__ import annotations

from pathlib import Path

from shared.trace import TraceLayout

COLOURS = {"organizer": "#3b6fb6", "human organizer": "#b5562b", "model": "#6c8ebf", "tool": "#6aa56a", "human": "#d08a3a"}
CRITICAL = "#c0392b"


def plot_trace(layout: TraceLayout, path: str | Path, *, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    lanes = layout.lanes
    rows = {lane.agent: i for i, lane in enumerate(lanes)}
    height = 1.6 + 0.42 * max(1, len(lanes)) * 2
    fig, (tokens, wall) = plt.subplots(2, 1, figsize=(11, height), gridspec_kw={"hspace": 0.45})
    labels = []
    for lane in lanes:
        label = "organizer" + (" (a person)" if lane.author == "human" else "") if lane.agent == "organizer" else (
            f"{lane.agent} @{lane.endpoint or 'model'}: {(lane.query or '')[:24]}"
        )
        labels.append(label)
    for ax in (tokens, wall):
        ax.set_yticks(range(len(lanes)), labels, fontsize=8)
        ax.set_ylim(len(lanes) - 0.5, -0.5)
        ax.grid(axis="x", alpha=0.3)
    for bar in layout.bars:
        owner = layout.lane(bar.agent)
        tokens.barh(rows[bar.agent], bar.end - bar.start, left=bar.start, height=0.5,
                    color=COLOURS.get(owner.kind if owner else "model", "#888"))
    for iv in layout.critical:
        tokens.barh(rows[iv.agent] + 0.3, iv.end - iv.start, left=iv.start, height=0.1, color=CRITICAL)
    for arrow in layout.arrows:
        if arrow.child not in rows or arrow.parent not in rows:
            continue
        if arrow.kind == "fork":
            tokens.annotate("", xy=(arrow.at, rows[arrow.child] - 0.25), xytext=(arrow.at, rows[arrow.parent]),
                            arrowprops={"arrowstyle": "->", "color": "#555", "lw": 0.9})
        else:
            tokens.annotate("", xy=(arrow.at, rows[arrow.parent] + 0.25), xytext=(arrow.child_at, rows[arrow.child]),
                            arrowprops={"arrowstyle": "->", "color": "#555", "lw": 0.9, "linestyle": "--"})
    tokens.set_xlabel(f"organizer clock (decoded tokens) · T = {layout.latency} · critical path in red")
    tokens.set_xlim(0, max(layout.latency, 1) * 1.02)
    origin = layout.wall_origin
    if origin is not None:
        for lane in lanes:
            if lane.wall_start:
                stop = lane.wall_end or layout.now
                wall.barh(rows[lane.agent], stop - lane.wall_start, left=lane.wall_start - origin, height=0.5,
                          color=COLOURS.get(lane.kind, "#888"))
        wall.set_xlabel(f"wall time (s) · {((layout.wall_end or origin) - origin):.2f} s")
    kinds = sorted({lane.kind for lane in lanes})
    tokens.legend(handles=[Patch(color=COLOURS.get(k, "#888"), label=k) for k in kinds] + [Patch(color=CRITICAL, label="critical path")],
                  fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=min(len(kinds) + 1, 5), frameon=False)
    if title:
        tokens.set_title(title, fontsize=10, loc="left")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out
