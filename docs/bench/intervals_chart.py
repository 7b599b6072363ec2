#!/usr/bin/env python3
"""Draws one `reactor load` run's intervals as an SVG: msgs/s (left axis)
and p99 latency (right axis) over time, from the `--json` report.

    reactor load ... --interval 0.5 --json > run.json
    python3 docs/bench/intervals_chart.py run.json docs/load-intervals.svg "title"

Plain SVG written by hand, so nothing needs installing.
"""

import json
import sys


def nice_max(v):
    """A round number at or above v, for an axis."""
    if v <= 0:
        return 1.0
    mag = 10 ** len(str(int(v))) / 10
    for step in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if step * mag >= v:
            return step * mag
    return 10 * mag


def chart(rows, title):
    w, h, left, right, top, bottom = 760, 360, 90, 90, 40, 50
    pw, ph = w - left - right, h - top - bottom
    t = [r["t"] for r in rows]
    rate = [r["msgs_per_sec"] for r in rows]
    p99 = [r["latency_us"]["p99"] / 1000.0 for r in rows]
    tmax = max(t)
    rmax, lmax = nice_max(max(rate) * 1.05), nice_max(max(p99) * 1.05)

    def px(x):
        return left + x / tmax * pw

    def py(y, top_value):
        return top + ph - y / top_value * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']
    for i in range(6):
        y = top + ph * i / 5
        out.append(f'<line x1="{left}" y1="{y}" x2="{left + pw}" y2="{y}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end" fill="#1f77b4">'
                   f'{rmax * (5 - i) / 5:,.0f}</text>')
        out.append(f'<text x="{left + pw + 6}" y="{y + 4}" fill="#d62728">'
                   f'{lmax * (5 - i) / 5:.3g}</text>')
    step = nice_max(tmax / 8)
    x = 0.0
    while x <= tmax + 1e-9:
        out.append(f'<text x="{px(x)}" y="{top + ph + 18}" text-anchor="middle">{x:g}</text>')
        x += step
    out.append(f'<text x="{left + pw / 2}" y="{h - 8}" text-anchor="middle">seconds</text>')
    out.append(f'<text x="18" y="{top + ph / 2}" fill="#1f77b4" text-anchor="middle" '
               f'transform="rotate(-90 18 {top + ph / 2})">msgs/s in the interval</text>')
    out.append(f'<text x="{w - 14}" y="{top + ph / 2}" fill="#d62728" text-anchor="middle" '
               f'transform="rotate(90 {w - 14} {top + ph / 2})">p99 latency, ms</text>')
    # Each interval is drawn as a step over the time it covers.
    for values, top_value, color in ((rate, rmax, "#1f77b4"), (p99, lmax, "#d62728")):
        pts, prev = [], 0.0
        for ti, v in zip(t, values):
            pts += [(px(prev), py(v, top_value)), (px(ti), py(v, top_value))]
            prev = ti
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    src, dst = sys.argv[1], sys.argv[2]
    title = sys.argv[3] if len(sys.argv) > 3 else "reactor load: one run, interval by interval"
    with open(src) as f:
        rows = json.load(f)["intervals"]
    with open(dst, "w") as f:
        f.write(chart(rows, title))


if __name__ == "__main__":
    main()
