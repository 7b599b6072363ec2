#!/usr/bin/env python3
"""One hold run for docs/scale.md: `reactor serve --workers W` and
`reactor load --workload hold -c N`, with memory sampled before and while
every connection is held.

    flock -w 3600 /work/team/bench.lock \
        python3 docs/bench/scale.py target/release/reactor 100000 [--hold 20] [--workers W]

Appends one JSON object to docs/bench/scale.json and prints it; then
`python3 docs/bench/scale.py --chart docs/bench/scale.json docs/scale.svg`
draws the chart. What is sampled:
- server user space: VmRSS summed over the workers (and the supervisor),
  less the same sum with no client connected;
- load tool user space: VmRSS summed over the load processes;
- kernel: Slab from /proc/meminfo and the TCP line of /proc/net/sockstat
  (sockets in use, pages of socket buffers), less their values before.
Every process started is ended by PID, and the script checks that none is
left.
"""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out


def sockstat():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                w = line.split()
                d = dict(zip(w[1::2], map(int, w[2::2])))
                return d
    return {}


def children(pid):
    try:
        out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="],
                             capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]
    except OSError:
        return []


def rss(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def sample(server_pids, load_pids=()):
    m = meminfo()
    s = sockstat()
    return {
        "server_rss": rss(server_pids),
        "load_rss": rss(load_pids),
        "slab": m["Slab"],
        "sunreclaim": m["SUnreclaim"],
        "mem_available": m["MemAvailable"],
        "tcp_inuse": s.get("inuse", 0),
        "tcp_mem_pages": s.get("mem", 0),
        "time": time.time(),
    }


# Every process started, so that a failed run still ends them (by PID).
STARTED = []


def run(reactor, n, hold, workers):
    started = STARTED
    server = subprocess.Popen(
        [reactor, "serve", "--addr", "127.0.0.1:0", "--workers", str(workers),
         "--log-level", "warn"],
        stdout=subprocess.PIPE, stderr=open(f"/tmp/scale-server-{n}.log", "w"), text=True)
    started.append(server.pid)
    first = server.stdout.readline()
    addr = first.split()[2]
    time.sleep(1.0)
    worker_pids = children(server.pid)
    started += worker_pids
    server_pids = [server.pid] + worker_pids
    base = sample(server_pids)
    load = subprocess.Popen(
        [reactor, "load", addr, "--workload", "hold", "-c", str(n), "-d", str(hold),
         "--timeout", "30", "--json"],
        stdout=subprocess.PIPE, stderr=open(f"/tmp/scale-load-{n}.log", "w"), text=True)
    started.append(load.pid)
    # The report can pass a pipe's 64 KiB (a million connections: interval
    # rows with their histograms), so it is read while the run goes on; a
    # read only after the exit would leave the load tool blocked writing.
    out_parts = []
    reader = threading.Thread(target=lambda: out_parts.append(load.stdout.read()))
    reader.start()
    t0 = time.time()
    held = None
    peak = None
    while load.poll() is None:
        time.sleep(0.5)
        s = sockstat()
        if held is None and s.get("inuse", 0) >= base["tcp_inuse"] + 2 * n:
            held = time.time() - t0
            time.sleep(2.0)
            load_pids = children(load.pid) or [load.pid]
            started += load_pids
            peak = sample(server_pids, load_pids + [load.pid])
    reader.join()
    report = json.loads("".join(out_parts))
    server.send_signal(signal.SIGTERM)
    try:
        server_rc = server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server_rc = "killed"
    time.sleep(0.5)
    left = [p for p in started if os.path.exists(f"/proc/{p}")]
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    result = {
        "connections": n,
        "workers": workers,
        "load_processes": report.get("processes"),
        "load_ok": report.get("ok"),
        "load_exit_problems": report.get("problems"),
        "opened": report.get("connections_opened"),
        "survived": report.get("survived"),
        "open_secs": report.get("open_secs"),
        "open_rate": round(n / report["open_secs"]) if report.get("open_secs") else None,
        "server_exit": server_rc,
        "left_running": left,
        "uptime": open("/proc/loadavg").read().split()[:3],
        "base": base,
        "peak": peak,
    }
    if peak:
        sockets = peak["tcp_inuse"] - base["tcp_inuse"]
        result.update({
            "sockets": sockets,
            "server_rss_per_conn": round((peak["server_rss"] - base["server_rss"]) / n, 1),
            "load_rss_per_conn": round(peak["load_rss"] / n, 1),
            "slab_per_socket": round((peak["slab"] - base["slab"]) / sockets, 1),
            "sunreclaim_per_socket": round((peak["sunreclaim"] - base["sunreclaim"]) / sockets, 1),
            "buffers_per_socket": round((peak["tcp_mem_pages"] - base["tcp_mem_pages"]) * PAGE / sockets, 1),
            "mem_used_per_socket": round((base["mem_available"] - peak["mem_available"]) / sockets, 1),
        })
    return result


def chart(results_path, svg_path):
    runs = [json.loads(l) for l in open(results_path) if l.strip()]
    runs = [r for r in runs if r.get("peak")]
    best = {}
    for r in runs:
        best[r["connections"]] = r  # the latest run of each size
    pts = sorted(best.values(), key=lambda r: r["connections"])
    series = {
        "server RSS (all workers, less empty)":
            [(r["connections"], (r["peak"]["server_rss"] - r["base"]["server_rss"]) / 2**20) for r in pts],
        "kernel slab (both ends)":
            [(r["connections"], (r["peak"]["slab"] - r["base"]["slab"]) / 2**20) for r in pts],
        "load tool RSS":
            [(r["connections"], r["peak"]["load_rss"] / 2**20) for r in pts],
    }
    colors = ["#1f77b4", "#d62728", "#2ca02c"]
    w, h, left, right, top, bottom = 760, 400, 80, 280, 40, 50
    xs = [r["connections"] for r in pts]
    ys = [y for s in series.values() for _, y in s if y > 0]
    x0, x1 = math.log10(min(xs)), math.log10(max(xs))
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))

    def px(x):
        return left + (math.log10(x) - x0) / ((x1 - x0) or 1) * (w - left - right)

    def py(y):
        return h - bottom - (math.log10(max(y, 10 ** y0)) - y0) / ((y1 - y0) or 1) * (h - top - bottom)

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{(left + w - right) / 2}" y="22" font-size="15" text-anchor="middle">'
         f'Memory against connections held (log-log)</text>',
         f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
         f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>']
    for x in xs:
        o.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{h - bottom}" stroke="#eee"/>')
        o.append(f'<text x="{px(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{x:,}</text>')
    for e in range(y0, y1 + 1):
        t = 10 ** e
        o.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{w - right}" y2="{py(t):.1f}" stroke="#eee"/>')
        o.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g} MiB</text>')
    o.append(f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">connections held</text>')
    for i, (name, s) in enumerate(series.items()):
        c = colors[i]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s)
        o.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for x, y in s:
            o.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>')
        ly = top + 20 + i * 20
        o.append(f'<line x1="{w - right + 15}" y1="{ly}" x2="{w - right + 40}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
        o.append(f'<text x="{w - right + 46}" y="{ly + 4}">{name}</text>')
    o.append("</svg>")
    with open(svg_path, "w") as f:
        f.write("\n".join(o) + "\n")


def main():
    if sys.argv[1] == "--chart":
        chart(sys.argv[2], sys.argv[3])
        return
    reactor, n = sys.argv[1], int(sys.argv[2])
    hold = 20
    workers = None
    args = sys.argv[3:]
    while args:
        k, v, *args = args
        if k == "--hold":
            hold = float(v)
        elif k == "--workers":
            workers = int(v)
    if workers is None:
        workers = max(1, math.ceil(n / 18000))
    try:
        result = run(reactor, n, hold, workers)
    except BaseException:
        for p in reversed(STARTED):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        raise
    line = json.dumps(result)
    print(line)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "scale.json"), "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
