#!/usr/bin/env python3
"""Benchmarks behind docs/benchmarks.md and docs/threads-vs-reactor.md.

Runs reactor (the poll loop), reactor --engine threads (one thread per
client) and the C reference (../shared/reference/epoll_echo.c) side by side
on loopback: the server pinned to core 0 with taskset, `reactor load` pinned
to core 1. Every figure is the median of --reps runs, and servers are
interleaved within each repetition, so they meet the same machine.

    cargo build --release
    gcc -O2 -o /tmp/epoll_echo ../shared/reference/epoll_echo.c
    python3 docs/bench/bench.py --reps 3 --out docs/bench/results.json
    python3 docs/bench/charts.py docs/bench/results.json docs/

Parts (`--only`, comma-separated): echo, syscalls, hold, churn (medians of
--reps), and the alternating pairs against the reference (--pairs each):
pairs (closed loop, 1,000 connections), fixed (an equal offered load with
`--rate`, where CPU per message compares the servers alone), spread (the
same 20,000 msgs/s over 1 to 1,000 connections: how often each server
sleeps) and churn-pairs. The io_uring engine (issue 15): uring (pairs of
uring, reactor and the reference at equal load, ping-pong, --pipeline 16,
and --pipeline 16 with 4 KiB messages), uring-syscalls, uring-hold.

Needs Linux, python3, taskset, and perf (for system-call counts; skipped
when missing). Only ever talks to 127.0.0.1.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REACTOR = os.path.join(ROOT, "target", "release", "reactor")
TICK = os.sysconf("SC_CLK_TCK")
SERVER_CORE, LOAD_CORE = "0", "1"


def server_cmd(kind, port, extra=()):
    addr = ["--addr", f"127.0.0.1:{port}"]
    if kind == "reactor":
        return [REACTOR, "serve", "--log-level", "warn", *addr, *extra]
    if kind.startswith("reactor@"):
        # Another build of reactor (say, an older commit) for before/after
        # pairs: `--servers reactor,reactor@/tmp/old/target/release/reactor`.
        return [kind.split("@", 1)[1], "serve", "--log-level", "warn", *addr, *extra]
    if kind.startswith("uring@"):
        # Another build's uring engine, for before/after pairs.
        return [kind.split("@", 1)[1], "serve", "--engine", "uring", "--log-level", "warn", *addr,
                *extra]
    if kind in ("threads", "uring"):
        return [REACTOR, "serve", "--engine", kind, "--log-level", "warn", *addr, *extra]
    if kind == "c-ref":
        return [ARGS.c_ref, *addr]
    if kind.startswith("peer@"):
        # A peer server outside the repository (issue 15's tokio cell: a
        # throwaway tokio echo) that takes its address as its one argument
        # and prints a `listening on` line:
        # `--uring-kinds reactor,peer@/tmp/tokio_echo/target/release/tokio_echo,c-ref`.
        return [kind.split("@", 1)[1], f"127.0.0.1:{port}"]
    raise ValueError(kind)


class Server:
    """A server pinned to SERVER_CORE, stopped on exit."""

    def __init__(self, kind, port, extra=()):
        cmd = ["taskset", "-c", SERVER_CORE, *server_cmd(kind, port, extra)]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.p.stdout.readline()
        if not line.startswith("listening on"):
            raise RuntimeError(f"{kind} did not start: {line!r}")
        self.pid = self.p.pid
        self.port = port

    def cpu(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def status(self, field):
        """A number from /proc/PID/status (the first word after `field:`)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def sleeps(self):
        """How many times the server has gone to sleep (voluntary context switches)."""
        return self.status("voluntary_ctxt_switches")

    def rss_kib(self):
        return self.status("VmRSS")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.p.terminate()
        try:
            self.p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def load(port, args, during=None):
    """Runs `reactor load` on LOAD_CORE; `during(elapsed)` is called meanwhile."""
    cmd = ["taskset", "-c", LOAD_CORE, REACTOR, "load", f"127.0.0.1:{port}", "--json",
           "--engine", ARGS.load_engine, *map(str, args)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if during:
        during(p)
    out, _ = p.communicate(timeout=600)
    return json.loads(out)


def window(server, start, length, perf_events=None):
    """Measures server CPU (and syscalls) from `start` s after now for `length` s."""
    result = {}

    def run():
        time.sleep(start)
        c0, z0 = server.cpu(), server.sleeps()
        t0 = time.monotonic()
        if perf_events:
            r = subprocess.run(
                ["perf", "stat", "-x,", "-e", ",".join(perf_events), "-p", str(server.pid),
                 "--", "sleep", str(length)],
                capture_output=True, text=True)
            for line in r.stderr.splitlines():
                parts = line.split(",")
                if len(parts) > 3 and parts[0].strip().isdigit():
                    result[parts[2]] = int(parts[0])
        else:
            time.sleep(length)
        result["cpu_s"] = server.cpu() - c0
        result["sleeps"] = server.sleeps() - z0
        result["secs"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    return t, result


PORTS = iter(range(15100, 16000))

SYSCALLS = ["raw_syscalls:sys_enter", "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_epoll_ctl",
            "syscalls:sys_enter_read", "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_write",
            "syscalls:sys_enter_sendto", "syscalls:sys_enter_writev",
            "syscalls:sys_enter_io_uring_enter"]


def echo_run(kind, conns, pipeline, perf=False, rate=None, size=64):
    """One closed-loop run (or open-loop at `rate` messages/s per connection)."""
    warmup, duration = 2, 6
    with Server(kind, next(PORTS)) as s:
        port = s.port
        # The window starts after the ramp-up and the warm-up, and ends
        # before the measured period does.
        holder = {}

        def during(p):
            holder["t"], holder["r"] = window(s, warmup + 1.0, duration - 2.0,
                                              SYSCALLS if perf else None)

        pace = ["--rate", rate] if rate else ["--pipeline", pipeline]
        v = load(port, ["-c", conns, *pace, "-s", size, "-d", duration,
                        "--warmup", warmup, "--timeout", 30], during)
        holder["t"].join()
        w = holder["r"]
    msgs = v["msgs_per_sec"] * w["secs"]
    row = {"server": kind, "connections": conns, "pipeline": pipeline, "size": size, "ok": v["ok"],
           "msgs_per_sec": v["msgs_per_sec"], "p50_us": v["latency_us"]["p50"],
           "p99_us": v["latency_us"]["p99"],
           "cpu_ns_per_msg": 1e9 * w["cpu_s"] / msgs if msgs else None,
           "server_cpu_util": w["cpu_s"] / w["secs"],
           "sleeps_per_msg": w["sleeps"] / msgs if msgs else None}
    if rate:
        row["rate_per_conn"] = rate
        # Whether the load tool kept its schedule. Its latency counts from
        # when each message was due, so a median past 1 ms means it fell
        # behind and sent late messages in bursts: the server then wakes
        # for several at once and spends about a quarter less CPU per
        # message than in a round on schedule. Compare rounds alike.
        row["on_schedule"] = v["latency_us"]["p50"] < 1000
    if perf:
        row["syscalls_per_msg"] = {k.split(":")[1].replace("sys_enter_", ""): round(n / msgs, 3)
                                   for k, n in w.items() if ":" in k}
    return row


def hold_run(kind, conns):
    with Server(kind, next(PORTS)) as s:
        time.sleep(0.3)
        before = s.rss_kib()
        peak = [before]

        def during(p):
            while p.poll() is None:
                peak[0] = max(peak[0], s.rss_kib())
                time.sleep(0.1)

        hold = max(4, conns // 2000)
        v = load(s.port, ["--workload", "hold", "-c", conns, "-d", hold,
                                           "--timeout", 20], during)
    return {"server": kind, "connections": conns, "ok": v["ok"], "survived": v["survived"],
            "open_secs": v["open_secs"], "rss_before_kib": before, "rss_peak_kib": peak[0],
            "bytes_per_conn": round((peak[0] - before) * 1024 / conns, 1)}


def churn_run(kind):
    with Server(kind, next(PORTS)) as s:
        v = load(s.port, ["--workload", "churn", "-c", 32, "-d", 5,
                                           "--warmup", 1])
    return {"server": kind, "ok": v["ok"], "connections_per_sec": v["connections_per_sec"],
            "connect_p99_us": v["connect_latency_us"]["p99"]}


def paired(kinds, reps, run):
    """Runs `run(kind)` for each kind, `reps` times, alternating the order,
    and returns the rows plus, per measure, every pair's ratio of the first
    kind to the last and their median: ratios taken within one pair are
    what this noisy machine can compare."""
    rows, ratios = [], {}
    for rep in range(reps):
        order = kinds if rep % 2 == 0 else kinds[::-1]
        pair = {}
        for kind in order:
            pair[kind] = run(kind)
            print(rep, pair[kind], flush=True)
            rows.append(pair[kind])
        first, last = pair[kinds[0]], pair[kinds[-1]]
        for measure in ("msgs_per_sec", "cpu_ns_per_msg", "p99_us", "sleeps_per_msg",
                        "connections_per_sec"):
            if first.get(measure) and last.get(measure):
                ratios.setdefault(measure, []).append(round(first[measure] / last[measure], 3))
    return {"rows": rows, "ratios": ratios,
            "median_ratio": {m: statistics.median(v) for m, v in ratios.items()}}


def median_rows(rows, keys):
    """Groups rows by `keys` and takes the median of every number."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        m = dict(zip(keys, key))
        m["runs"] = len(rs)
        m["ok"] = all(r["ok"] for r in rs)
        for field in rs[0]:
            vals = [r[field] for r in rs if isinstance(r.get(field), (int, float))
                    and not isinstance(r.get(field), bool)]
            if field not in keys and vals:
                m[field] = round(statistics.median(vals), 3)
        for field in rs[0]:
            if isinstance(rs[0][field], dict):
                m[field] = rs[0][field]
        out.append(m)
    return out


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--c-ref", default="/tmp/epoll_echo")
    ap.add_argument("--out", default="docs/bench/results.json")
    ap.add_argument("--only", default="echo,syscalls,pairs,fixed,spread,hold,churn",
                    help="comma-separated parts to run")
    ap.add_argument("--servers", default="reactor,c-ref,threads")
    ap.add_argument("--hold-reps", type=int, default=None)
    ap.add_argument("--cells", default=None, help="uring part: which cells (default all)")
    ap.add_argument("--load-engine", default="reactor",
                    help="reactor load --engine: reactor (the mio loop, every run published before "
                         "the load tool's default became auto), uring or auto")
    ap.add_argument("--uring-kinds", default="uring,reactor,c-ref",
                    help="uring part: servers, alternating; ratios are each to the last")
    ap.add_argument("--pairs", type=int, default=8, help="alternating pairs for pairs,fixed,spread,churn-pairs")
    ARGS = ap.parse_args()
    servers = ARGS.servers.split(",")
    only = ARGS.only.split(",")
    results = {"machine": {"cores": os.cpu_count(), "kernel": os.uname().release},
               "date": time.strftime("%Y-%m-%d")}
    if os.path.exists(ARGS.out):
        with open(ARGS.out) as f:
            results.update(json.load(f))

    def save():
        with open(ARGS.out, "w") as f:
            json.dump(results, f, indent=1)

    if "echo" in only:
        rows = []
        for rep in range(ARGS.reps):
            for conns in (1, 100, 1000, 10000):
                for pipeline in (1, 16):
                    for kind in servers:
                        r = echo_run(kind, conns, pipeline)
                        print(rep, r, flush=True)
                        rows.append(r)
        results["echo"] = median_rows(rows, ["server", "connections", "pipeline"])
        save()
    if "syscalls" in only and shutil.which("perf"):
        rows = []
        for pipeline in (1, 16):
            for kind in servers:
                r = echo_run(kind, 1000, pipeline, perf=True)
                print(r, flush=True)
                rows.append(r)
        results["syscalls"] = rows
        save()
    if "pairs" in only:
        # Closed loop at 1,000 connections, reactor and the reference
        # alternating: the throughput and CPU targets in benchmarks.md.
        results["pairs"] = {}
        for pipeline in (1, 16):
            results["pairs"][f"pipeline_{pipeline}"] = paired(
                ["reactor", "c-ref"], ARGS.pairs, lambda kind: echo_run(kind, 1000, pipeline))
            save()
    if "fixed" in only:
        # The same offered load for both servers (open loop, --rate per
        # connection), so CPU per message compares the servers and not how
        # fast the load generator happened to run.
        results["fixed"] = {}
        for rate in (30, 60):
            results["fixed"][f"rate_{rate}"] = paired(
                ["reactor", "c-ref"], ARGS.pairs, lambda kind: echo_run(kind, 1000, 1, rate=rate))
            save()
    if "spread" in only:
        # 20,000 messages per second in all, spread over 1 to 1,000
        # connections: how often each server sleeps, and what a sleep costs.
        results["spread"] = {}
        for conns, rate in ((1, 20000), (10, 2000), (100, 200), (1000, 20)):
            results["spread"][f"c{conns}"] = paired(
                ["reactor", "c-ref"], ARGS.pairs, lambda kind: echo_run(kind, conns, 1, rate=rate))
            save()
    if "hold" in only:
        rows = []
        for rep in range(ARGS.hold_reps or ARGS.reps):
            for conns in (100, 1000, 10000, 19900):
                for kind in servers:
                    if kind == "threads" and conns > 10000:
                        # Two descriptors per client (reader and writer
                        # handles): 19,900 clients cannot fit in 20,000.
                        continue
                    r = hold_run(kind, conns)
                    print(rep, r, flush=True)
                    rows.append(r)
        results["hold"] = median_rows(rows, ["server", "connections"])
        save()
    if "churn" in only:
        rows = []
        for rep in range(ARGS.reps):
            for kind in servers:
                r = churn_run(kind)
                print(rep, r, flush=True)
                rows.append(r)
        results["churn"] = median_rows(rows, ["server"])
        save()
    if "uring" in only:
        # Issue 15's targets: the uring engine, the reactor and the C
        # reference alternating (ratios are uring / C; the reactor runs in
        # the same rounds for the readiness-vs-completion table).
        kinds = ARGS.uring_kinds.split(",")
        u = results.setdefault("uring", {})
        cells = {
            "fixed_rate_60": lambda k: echo_run(k, 1000, 1, rate=60),
            "pipeline_1": lambda k: echo_run(k, 1000, 1),
            "pipeline_16": lambda k: echo_run(k, 1000, 16),
            "pipeline_16_4k": lambda k: echo_run(k, 1000, 16, size=4096),
        }
        for name in ARGS.cells.split(",") if ARGS.cells else cells:
            u[name] = paired(kinds, ARGS.pairs, cells[name])
            for k in kinds[1:-1]:
                u[name]["median_ratio_" + k] = {
                    m: statistics.median(
                        [a[m] / b[m] for a, b in zip(
                            [r for r in u[name]["rows"] if r["server"] == k],
                            [r for r in u[name]["rows"] if r["server"] == kinds[-1]])
                         if a.get(m) and b.get(m)])
                    for m in ("msgs_per_sec", "cpu_ns_per_msg", "p99_us")}
            save()
    if "uring-syscalls" in only and shutil.which("perf"):
        rows = []
        for pipeline in (1, 16):
            for kind in ("uring", "reactor", "c-ref"):
                r = echo_run(kind, 1000, pipeline, perf=True)
                print(r, flush=True)
                rows.append(r)
        results["uring_syscalls"] = rows
        save()
    if "uring-hold" in only:
        rows = []
        for rep in range(ARGS.hold_reps or ARGS.reps):
            for kind in ARGS.uring_kinds.split(",")[:-1]:
                r = hold_run(kind, 19900)
                print(rep, r, flush=True)
                rows.append(r)
        results["uring_hold"] = median_rows(rows, ["server", "connections"])
        save()
    if "churn-pairs" in only:
        results["churn_pairs"] = paired(["reactor", "c-ref"], ARGS.pairs, churn_run)
        save()
    save()


if __name__ == "__main__":
    sys.exit(main())
