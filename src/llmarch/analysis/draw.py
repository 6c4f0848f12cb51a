"""Render a :class:`~llmarch.analysis.diagram.Diagram` with matplotlib (no pyplot state: a bare ``Figure`` saved
by extension, .svg or .png): boxes top to bottom, each repeated block on a shaded panel, residuals as side arrows."""
from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyBboxPatch

from llmarch.analysis.diagram import Diagram

COLOURS = {"io": ("#eeeeee", "#777777"), "embed": ("#d6e9f8", "#3a7bbf"), "norm": ("#fff4c2", "#b59b00"),
           "attn": ("#f8d7d3", "#c0392b"), "ffn": ("#d8f0d8", "#2e8b57"), "moe": ("#e6dcf5", "#6a3d9a"),
           "add": ("#ffffff", "#333333"), "head": ("#d6e9f8", "#3a7bbf")}
WIDTH, BOX_W, LINE_H, PAD, GAP, ADD_R = 7.0, 4.2, 0.2, 0.18, 0.28, 0.16  # inches
SIDE_W, SIDE_GAP = 3.3, 0.5  # the column of parallel branches (Node.beside), right of the main one
TITLE_H, SUB_LINE_H, SUB_CHARS_PER_INCH = 0.6, 0.22, 14  # subtitle at 9 pt: ~14 characters per inch


def _box_height(label: str, kind: str) -> float:
    return 2 * ADD_R if kind == "add" else PAD * 2 + LINE_H * len(label.split("\n"))


def wrap_subtitle(subtitle: str, width: float) -> list[str]:
    """The subtitle's " · "-separated parts packed into lines that fit ``width`` inches."""
    limit, lines = int(width * SUB_CHARS_PER_INCH), [""]
    for part in subtitle.split(" · ") if subtitle else []:
        joined = f"{lines[-1]} · {part}" if lines[-1] else part
        if len(joined) > limit and lines[-1]:
            lines.append(part)
        else:
            lines[-1] = joined
    return [line for line in lines if line]


def render(d: Diagram, subtitle: str = "") -> Figure:
    main = [n for n in d.nodes if n.beside is None]
    side = {n.beside: n for n in d.nodes if n.beside is not None}
    heights = [max(_box_height(n.label, n.kind), _box_height(side[n.id].label, "") if n.id in side else 0)
               for n in main]
    spans = {}  # group -> [first index, last index]
    for i, n in enumerate(main):
        if n.group is not None:
            spans.setdefault(n.group, [i, i])[1] = i
    firsts, lasts = {a: g for g, (a, _) in spans.items()}, {b: g for g, (_, b) in spans.items()}
    width = WIDTH + (SIDE_W + SIDE_GAP if side else 0)
    sub = wrap_subtitle(subtitle, width - 0.3)
    head_h = TITLE_H + SUB_LINE_H * len(sub)
    strip = 1.1 if d.schedule else 0.0  # the layer-schedule strip of a hybrid, under the graph
    total = sum(heights) + GAP * (len(heights) + 1) + head_h + 0.3 + 2 * GAP * len(spans) + strip
    fig = Figure(figsize=(width, total))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, total)
    ax.axis("off")
    ax.text(width / 2, total - 0.3, d.title, ha="center", va="center", fontsize=13, weight="bold")
    for j, line in enumerate(sub):
        ax.text(width / 2, total - TITLE_H - SUB_LINE_H * j, line, ha="center", va="center", fontsize=9,
                color="#444444")
    cx, sx = WIDTH / 2, WIDTH / 2 + BOX_W / 2 + SIDE_GAP + SIDE_W / 2
    y = total - head_h - 0.3
    centre, top, row = {}, {}, {}  # id -> (x, y, h, w)
    for i, (n, h) in enumerate(zip(main, heights)):
        if i in firsts:
            y -= GAP
            top[firsts[i]] = y
        y -= GAP
        h_own = 2 * ADD_R if n.kind == "add" else h
        centre[n.id], row[n.id] = (cx, y - h / 2, h_own, BOX_W), i
        if n.id in side:
            centre[side[n.id].id], row[side[n.id].id] = (sx, y - h / 2, h, SIDE_W), i
        y -= h
        if i in lasts:
            bottom = y - GAP
            y -= GAP
            group = lasts[i]
            ax.add_patch(FancyBboxPatch((cx - BOX_W / 2 - 0.55, bottom), BOX_W + 1.1, top[group] - bottom,
                                        boxstyle="round,pad=0.02,rounding_size=0.15", fc="#f6f6f6", ec="#999999",
                                        ls="--"))
            ax.text(cx + BOX_W / 2 + 0.5, top[group] - 0.12, d.groups[group], ha="right", va="top", fontsize=9,
                    style="italic", color="#555555")
    for n in d.nodes:
        x, yc, h, w = centre[n.id]
        fc, ec = COLOURS.get(n.kind, COLOURS["io"])
        if n.kind == "add":
            ax.add_patch(Circle((x, yc), ADD_R, fc=fc, ec=ec))
            ax.text(x, yc, "+", ha="center", va="center", fontsize=12)
            continue
        ax.add_patch(FancyBboxPatch((x - w / 2, yc - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.08",
                                    fc=fc, ec=ec, lw=1.2))
        ax.text(x, yc, n.label, ha="center", va="center", fontsize=8.5, linespacing=1.35)
    arrow = dict(arrowstyle="-|>", color="#333333", lw=1.0, shrinkA=0, shrinkB=0)
    for a, b in d.edges:
        (xa, ya, ha, wa), (xb, yb, hb, wb) = centre[a], centre[b]
        if xa == xb and (row[b] == row[a] + 1 or xa != cx):  # next box, or down the side column's free space
            ax.annotate("", xy=(xb, yb + hb / 2), xytext=(xa, ya - ha / 2), arrowprops=arrow)
        elif xa > xb:  # from the side column into the main one (image features into the decoder): along the gap
            gap_x = xb + wb / 2 + SIDE_GAP / 2
            ax.plot([xa - wa / 2, gap_x, gap_x], [ya, ya, yb], color="#333333", lw=1.0)
            ax.annotate("", xy=(xb + wb / 2, yb), xytext=(gap_x, yb), arrowprops=arrow)
        elif xa != xb:  # into a parallel branch: right from the source, then down into the branch's first box
            ax.plot([xa + wa / 2, xb], [ya, ya], color="#333333", lw=1.0)
            ax.annotate("", xy=(xb, yb + hb / 2), xytext=(xb, ya), arrowprops=arrow)
        else:  # a long edge (encoder output -> cross-attention) runs down the right side
            side_x = cx + BOX_W / 2 + 0.3
            ax.plot([xa + BOX_W / 2, side_x, side_x], [ya, ya, yb], color="#333333", lw=1.0)
            ax.annotate("", xy=(xb + BOX_W / 2, yb), xytext=(side_x, yb), arrowprops=arrow)
    for k, (a, b) in enumerate(d.residuals):
        (xa, ya, ha, _), (xb, yb, _, _) = centre[a], centre[b]
        side = cx - BOX_W / 2 - 0.3 - 0.12 * k
        start = ya - ha / 2 - GAP / 2
        ax.plot([xa, side, side], [start, start, yb], color="#666666", lw=1.0, ls="--")
        ax.annotate("", xy=(xb - ADD_R, yb), xytext=(side, yb),
                    arrowprops=dict(arrowstyle="-|>", color="#666666", lw=1.0, ls="--", shrinkA=0, shrinkB=0))
    for j, note in enumerate(d.notes):
        ax.text(0.1, 0.15 + 0.2 * j, note, fontsize=7, color="#555555")
    if d.schedule:
        draw_schedule(ax, d.schedule, 0.25)
    return fig


SCHEDULE_COLOURS = ("#c0392b", "#2e8b57", "#3a7bbf", "#6a3d9a", "#b59b00")


def draw_schedule(ax, schedule: list[str], y: float) -> None:
    """One cell per layer, coloured by its mixer, layer 0 on the left; a legend of the mixers above it."""
    kinds = list(dict.fromkeys(schedule))
    colour = {k: SCHEDULE_COLOURS[i % len(SCHEDULE_COLOURS)] for i, k in enumerate(kinds)}
    x0, width = 0.4, WIDTH - 0.8
    cell = width / len(schedule)
    for i, k in enumerate(schedule):
        ax.add_patch(FancyBboxPatch((x0 + i * cell + 0.01, y), cell - 0.02, 0.3, boxstyle="square,pad=0",
                                    fc=colour[k], ec="white", lw=0.5))
    ax.text(x0, y + 0.42, f"layer schedule (layer 0 -> {len(schedule) - 1}): ", fontsize=8, va="bottom")
    for j, k in enumerate(kinds):
        ax.text(x0 + 2.6 + 1.9 * j, y + 0.42, f"■ {k} ×{schedule.count(k)}", color=colour[k], fontsize=8,
                va="bottom")


def save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".svg", ".png", ".pdf"):
        raise ValueError(f"output {path}: use a .svg, .png or .pdf file for a rendered picture (.mmd for Mermaid)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text (searchable, small)
        fig.savefig(path, dpi=dpi)
    return path
