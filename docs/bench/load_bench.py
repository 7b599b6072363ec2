#!/usr/bin/env python3
"""Is `reactor load` cheaper per message than the server it drives?

Runs the C reference echo server (../shared/reference/epoll_echo.c) pinned
to core 0 and one `reactor load` thread pinned to core 1, and measures both
processes over the same window in the middle of the measured period: CPU
(`perf stat -e task-clock`, every thread), context switches and system
calls (raw_syscalls:sys_enter), each divided by the messages completed in
exactly that window (from the loader's quarter-second intervals); and each
pinned core's busy time from /proc/stat, which also counts the softirq
time (TCP's receive work on loopback) that no process is charged for.
"load/server" is the ratio of the two processes' CPU in each run: the same
messages divide both, so it is the steadiest figure when other work on the
machine moves the rate. Several loader binaries can be compared in the
same run (alternating, so they meet the same machine). A loader may carry
flags of its own after its path, e.g. the io_uring loop against the mio one
with one binary:

    --loader mio="target/release/reactor --engine reactor" \
    --loader uring="target/release/reactor --engine uring"

A loader without flags runs `reactor load`'s default engine (`auto`:
the uring loop for echo where io_uring can run). Each run also records the
1-minute load average when it began.

    cargo build --release && cp target/release/reactor /tmp/reactor-after
    gcc -O2 -o /tmp/epoll_echo ../shared/reference/epoll_echo.c
    flock -w 1800 /work/team/bench.lock \
        python3 docs/bench/load_bench.py --loader after=/tmp/reactor-after \
            --loader before=/tmp/reactor-before --reps 4

Only ever talks to 127.0.0.1.
"""

import argparse
import json
import os
import statistics
import subprocess
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")
PORTS = iter(range(16100, 17000))


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def core_busy():
    """Busy seconds of core 0 and core 1 (everything but idle and iowait,
    so softirq time, which /proc/PID/stat does not charge to any process,
    is included: on loopback much of TCP's work runs there)."""
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *v = line.split()
            if name in ("cpu0", "cpu1"):
                v = list(map(int, v))
                busy[name] = (sum(v[:8]) - v[3] - v[4]) / TICK
    return busy["cpu0"], busy["cpu1"]


def perf_stat(pid, secs, out, key):
    """CPU (task-clock: every thread of the process, exact rather than in
    clock ticks), context switches and system calls of `pid` over `secs`."""
    r = subprocess.run(["perf", "stat", "-x,", "-e",
                        "task-clock,context-switches,raw_syscalls:sys_enter",
                        "-p", str(pid), "--", "sleep", str(secs)],
                       capture_output=True, text=True)
    got = {}
    for line in r.stderr.splitlines():
        parts = line.split(",")
        if len(parts) > 3:
            try:
                got[parts[2]] = float(parts[0])
            except ValueError:
                pass
    out[key] = (got.get("task-clock", 0.0) / 1e3, got.get("context-switches", 0.0),
                got.get("raw_syscalls:sys_enter", 0.0))


def window_messages(intervals, w0, w1):
    """Messages completed between w0 and w1 (seconds from the loader's
    start), from its quarter-second intervals: the run's average rate
    times the window would be off whenever the rate moved (other work on
    the machine), and every per-message figure with it."""
    total, begin = 0.0, 0.0
    for row in intervals:
        end = row["t"]
        overlap = min(end, w1) - max(begin, w0)
        if overlap > 0 and end > begin:
            total += row["messages"] * overlap / (end - begin)
        begin = end
    return total


def run(c_ref, loader, conns, pipeline, warmup=2.0, duration=6.0):
    """One run: the C server on core 0, `loader` on core 1; both measured
    over the same window in the middle of the measured period."""
    port = next(PORTS)
    server = subprocess.Popen(["taskset", "-c", "0", c_ref, "--addr", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("listening on"), line
        path, *flags = loader.split()
        cmd = ["taskset", "-c", "1", path, "load", *flags, f"127.0.0.1:{port}", "--json",
               "-c", str(conns), "--pipeline", str(pipeline), "-s", "64",
               "-d", str(duration), "--warmup", str(warmup), "--timeout", "30",
               "--interval", "0.25"]
        loadavg = float(open("/proc/loadavg").read().split()[0])
        launched = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        start, length = warmup + 1.5, duration - 2.5
        time.sleep(start)
        w = {}
        c0 = (cpu(server.pid), cpu(p.pid))
        k0 = core_busy()
        t0 = time.monotonic()
        threads = [threading.Thread(target=perf_stat, args=(pid, length, w, k))
                   for pid, k in ((server.pid, "server"), (p.pid, "load"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        secs = time.monotonic() - t0
        c1 = (cpu(server.pid), cpu(p.pid))
        k1 = core_busy()
        out, _ = p.communicate(timeout=300)
        v = json.loads(out)
    finally:
        server.terminate()
        server.wait()
    msgs = window_messages(v["intervals"], t0 - launched, t0 - launched + secs)
    row = {"conns": conns, "pipeline": pipeline, "ok": v["ok"],
           "msgs_per_sec": v["msgs_per_sec"], "window_msgs_per_sec": msgs / secs,
           "loadavg": loadavg,
           "server_core_util": (k1[0] - k0[0]) / secs, "load_core_util": (k1[1] - k0[1]) / secs,
           "server_core_ns_per_msg": 1e9 * (k1[0] - k0[0]) / msgs,
           "load_core_ns_per_msg": 1e9 * (k1[1] - k0[1]) / msgs,
           "server_stat_ns_per_msg": 1e9 * (c1[0] - c0[0]) / msgs,
           "load_stat_ns_per_msg": 1e9 * (c1[1] - c0[1]) / msgs}
    for who in ("server", "load"):
        cpu_secs, switches, syscalls = w.get(who, (0.0, 0.0, 0.0))
        row[f"{who}_util"] = cpu_secs / secs
        row[f"{who}_ns_per_msg"] = 1e9 * cpu_secs / msgs
        row[f"{who}_cs_per_msg"] = switches / msgs
        row[f"{who}_sys_per_msg"] = syscalls / msgs
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--c-ref", default="/tmp/epoll_echo")
    ap.add_argument("--loader", action="append", required=True, help="NAME=PATH")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", default="100:1,100:16,1000:1,1000:16")
    ap.add_argument("--out")
    args = ap.parse_args()
    loaders = [x.split("=", 1) for x in args.loader]
    cases = [tuple(map(int, c.split(":"))) for c in args.cases.split(",")]
    rows = []
    for conns, pipeline in cases:
        runs = {name: [] for name, _ in loaders}
        for _ in range(args.reps):
            for name, path in loaders:
                runs[name].append(run(args.c_ref, path, conns, pipeline))
        for name, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs)
                   for k in rs[0] if k not in ("ok", "conns", "pipeline")}
            med.update(loader=name, conns=conns, pipeline=pipeline, ok=all(r["ok"] for r in rs),
                       ratios=[r["load_ns_per_msg"] / r["server_ns_per_msg"] for r in rs],
                       loadavgs=[r["loadavg"] for r in rs])
            rows.append(med)
            print(f"{name:8} c={conns:5} p={pipeline:3} {med['msgs_per_sec']:>10.0f} msg/s  "
                  f"server {med['server_util']:.2f} CPU {med['server_ns_per_msg']:6.0f} ns/msg "
                  f"{med['server_sys_per_msg']:.3f} sys/msg {med['server_cs_per_msg']:.3f} cs/msg | "
                  f"load {med['load_util']:.2f} CPU {med['load_ns_per_msg']:6.0f} ns/msg "
                  f"{med['load_sys_per_msg']:.3f} sys/msg {med['load_cs_per_msg']:.3f} cs/msg || "
                  f"cores: server {med['server_core_util']:.2f}, load {med['load_core_util']:.2f} "
                  f"| load/server ns {statistics.median(med['ratios']):.3f} "
                  f"({' '.join(f'{x:.3f}' for x in med['ratios'])}) "
                  f"| load avg {' '.join(f'{x:.1f}' for x in med['loadavgs'])}",
                  flush=True)
    print("uptime:", open("/proc/loadavg").read().strip())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
