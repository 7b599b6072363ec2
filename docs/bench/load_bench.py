#!/usr/bin/env python3
"""Is `reactor load` cheaper per message than the server it drives?

Runs the C reference echo server (../shared/reference/epoll_echo.c) pinned
to core 0 and one `reactor load` thread pinned to core 1, and measures both
processes over the same window in the middle of the measured period: CPU
(utime + stime from /proc/PID/stat) and system calls (perf stat,
raw_syscalls:sys_enter), each divided by the messages completed in that
window; and each pinned core's busy time from /proc/stat, which also counts
the softirq time (TCP's receive work on loopback) that no process is
charged for. Several loader binaries can be compared in the same run
(alternating, so they meet the same machine).

    cargo build --release
    gcc -O2 -o /tmp/epoll_echo ../shared/reference/epoll_echo.c
    flock -w 1800 /work/team/bench.lock \
        python3 docs/bench/load_bench.py --loader after=target/release/reactor \
            --loader before=/tmp/reactor-before --reps 3

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


def perf_syscalls(pid, secs, out, key):
    r = subprocess.run(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p", str(pid),
                        "--", "sleep", str(secs)], capture_output=True, text=True)
    for line in r.stderr.splitlines():
        parts = line.split(",")
        if len(parts) > 3 and parts[0].strip().isdigit():
            out[key] = int(parts[0])


def run(c_ref, loader, conns, pipeline, warmup=2.0, duration=6.0):
    port = next(PORTS)
    server = subprocess.Popen(["taskset", "-c", "0", c_ref, "--addr", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("listening on"), line
        cmd = ["taskset", "-c", "1", loader, "load", f"127.0.0.1:{port}", "--json",
               "-c", str(conns), "--pipeline", str(pipeline), "-s", "64",
               "-d", str(duration), "--warmup", str(warmup), "--timeout", "30"]
        # Older builds have no --interval; newer ones would print lines.
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        start, length = warmup + 1.5, duration - 2.5
        time.sleep(start)
        w = {}
        c0 = (cpu(server.pid), cpu(p.pid))
        k0 = core_busy()
        t0 = time.monotonic()
        threads = [threading.Thread(target=perf_syscalls, args=(pid, length, w, k))
                   for pid, k in ((server.pid, "server_sys"), (p.pid, "load_sys"))]
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
    msgs = v["msgs_per_sec"] * secs
    return {"conns": conns, "pipeline": pipeline, "ok": v["ok"],
            "msgs_per_sec": v["msgs_per_sec"],
            "server_util": (c1[0] - c0[0]) / secs, "load_util": (c1[1] - c0[1]) / secs,
            "server_ns_per_msg": 1e9 * (c1[0] - c0[0]) / msgs,
            "load_ns_per_msg": 1e9 * (c1[1] - c0[1]) / msgs,
            "server_core_util": (k1[0] - k0[0]) / secs, "load_core_util": (k1[1] - k0[1]) / secs,
            "server_core_ns_per_msg": 1e9 * (k1[0] - k0[0]) / msgs,
            "load_core_ns_per_msg": 1e9 * (k1[1] - k0[1]) / msgs,
            "server_sys_per_msg": w.get("server_sys", 0) / msgs,
            "load_sys_per_msg": w.get("load_sys", 0) / msgs}


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
            med.update(loader=name, conns=conns, pipeline=pipeline, ok=all(r["ok"] for r in rs))
            rows.append(med)
            print(f"{name:8} c={conns:5} p={pipeline:3} {med['msgs_per_sec']:>10.0f} msg/s  "
                  f"server {med['server_util']:.2f} core {med['server_ns_per_msg']:6.0f} ns/msg "
                  f"{med['server_sys_per_msg']:.3f} sys/msg | load {med['load_util']:.2f} core "
                  f"{med['load_ns_per_msg']:6.0f} ns/msg {med['load_sys_per_msg']:.3f} sys/msg || "
                  f"cores: server {med['server_core_util']:.2f} {med['server_core_ns_per_msg']:6.0f} "
                  f"ns/msg, load {med['load_core_util']:.2f} {med['load_core_ns_per_msg']:6.0f} ns/msg",
                  flush=True)
    print("uptime:", open("/proc/loadavg").read().strip())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
