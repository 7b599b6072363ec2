#!/usr/bin/env python3
"""Draws the SVG charts in docs/ from docs/bench/results.json.

    python3 docs/bench/charts.py docs/bench/results.json docs/

Plain SVG written by hand, so nothing needs installing.
"""

import json
import math
import sys

COLORS = {"reactor": "#1f77b4", "c-ref": "#2ca02c", "threads": "#d62728"}
LABELS = {"reactor": "reactor (poll loop)", "c-ref": "C epoll reference", "threads": "--engine threads"}


def line_chart(path, title, xlabel, ylabel, series, log_y=False):
    """series: {name: [(x, y), ...]}; x on a log scale (connection counts)."""
    w, h, left, right, top, bottom = 760, 380, 80, 270, 40, 50
    xs = sorted({x for pts in series.values() for x, _ in pts})
    ys = [y for pts in series.values() for _, y in pts if y is not None and y > 0]
    x0, x1 = math.log10(min(xs)), math.log10(max(xs))
    if log_y:
        y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    else:
        y0, y1 = 0.0, max(ys) * 1.1

    def px(x):
        return left + (math.log10(x) - x0) / ((x1 - x0) or 1) * (w - left - right)

    def py(y):
        v = math.log10(y) if log_y else y
        return h - bottom - (v - y0) / ((y1 - y0) or 1) * (h - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2 - 60}" y="22" font-size="15" text-anchor="middle">{title}</text>']
    # Axes and grid.
    out.append(f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>')
    for x in xs:
        out.append(f'<text x="{px(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{x:,}</text>')
        out.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{h - bottom}" stroke="#eee"/>')
    if log_y:
        ticks = [10 ** e for e in range(int(y0), int(y1) + 1)]
    else:
        step = 10 ** math.floor(math.log10(y1 / 5))
        step *= 2 if y1 / step > 10 else 1
        ticks = [i * step for i in range(int(y1 / step) + 1)]
    for t in ticks:
        out.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{w - right}" y2="{py(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{fmt(t)}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="16" y="{(top + h - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(top + h - bottom) / 2})">{ylabel}</text>')
    # Series.
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS.get(name.split(" ")[0], "#555")
        dash = ' stroke-dasharray="6 4"' if "16" in name else ""
        pts = [(x, y) for x, y in pts if y is not None and y > 0]
        d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
        ly = top + 10 + i * 18
        out.append(f'<line x1="{w - right + 12}" y1="{ly}" x2="{w - right + 36}" y2="{ly}" '
                   f'stroke="{color}" stroke-width="2"{dash}/>')
        label = LABELS.get(name.split(" ")[0], name) + (", " + name.split(" ", 1)[1] if " " in name else "")
        out.append(f'<text x="{w - right + 40}" y="{ly + 4}">{label}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def fmt(v):
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def main():
    results = json.load(open(sys.argv[1]))
    outdir = sys.argv[2].rstrip("/")
    echo = results.get("echo", [])
    series = {}
    for r in echo:
        key = f'{r["server"]} pipeline {r["pipeline"]}'
        series.setdefault(key, []).append((r["connections"], r.get("msgs_per_sec")))
    for v in series.values():
        v.sort()
    if series:
        line_chart(f"{outdir}/throughput.svg", "Echo throughput, 64-byte messages",
                   "connections", "messages per second (log)", series, log_y=True)
    hold = results.get("hold", [])
    mem = {}
    for r in hold:
        mem.setdefault(r["server"], []).append((r["connections"], r.get("bytes_per_conn")))
    for v in mem.values():
        v.sort()
    if mem:
        line_chart(f"{outdir}/memory.svg", "Server memory per idle connection",
                   "idle connections held", "bytes of RSS per connection (log)", mem, log_y=True)


if __name__ == "__main__":
    main()
