#!/usr/bin/env python3
"""What watching the loop costs: alternating pairs of echo runs.

Two questions, each answered by pairs run back to back, in alternating
order, so both sides meet the same machine:

  counters  the hot-path counters: BASE (a build without them) against
            REACTOR (this build), neither with --metrics.
  scrape    the endpoint under scraping: REACTOR --metrics with no scraper
            against the same with a scraper asking 200 times a second
            (curl --rate 200/s over one keep-alive connection).
  latency   the endpoint's answer time while `reactor load` holds
            CONNS connections busy: curl time_total of SAMPLES scrapes.

The server is pinned to core 0, `reactor load` (and the scraper) to core 1.
Run it under the team's benchmark lock:

  flock -w 1800 /work/team/bench.lock python3 docs/bench/metrics_cost.py \\
      --base /tmp/reactor-main/target/release/reactor \\
      --reactor target/release/reactor --pairs 6 counters scrape latency
"""

import argparse
import json
import os
import statistics
import subprocess
import time


def start(binary, metrics):
    args = ["taskset", "-c", "0", binary, "serve", "--addr", "127.0.0.1:0", "--log-level", "warn"]
    if metrics:
        args += ["--metrics", "127.0.0.1:0"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    addr = p.stdout.readline().split()[2]
    maddr = None
    if metrics:
        maddr = p.stdout.readline().split()[3]
    return p, addr, maddr


def stop(p):
    p.terminate()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def load(reactor, addr, a):
    out = subprocess.run(
        ["taskset", "-c", "1", reactor, "load", addr, "-c", str(a.conns), "--pipeline",
         str(a.pipeline), "-d", str(a.duration), "--warmup", str(a.warmup), "--interval", "0",
         "--json"],
        capture_output=True, text=True, timeout=600)
    r = json.loads(out.stdout)
    assert r["ok"], r["errors"]
    return r["msgs_per_sec"]


def scraper(maddr, seconds, rate):
    n = int(seconds * rate)
    return subprocess.Popen(
        ["taskset", "-c", "1", "curl", "-s", "-o", "/dev/null", "--rate", f"{rate}/s",
         "-w", "%{http_code}\n", f"http://{maddr}/metrics?[1-{n}]"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def one(binary, reactor, a, metrics=False, scrape_rate=0):
    p, addr, maddr = start(binary, metrics)
    try:
        s = scraper(maddr, a.warmup + a.duration + 1, scrape_rate) if scrape_rate else None
        rate = load(reactor, addr, a)
        scrapes = None
        if s:
            s.terminate()
            out, _ = s.communicate()
            scrapes = out.count("200")
        return rate, scrapes
    finally:
        stop(p)


def pairs(name, a, side_a, side_b):
    ratios, rows = [], []
    for i in range(a.pairs):
        order = [("A", side_a), ("B", side_b)] if i % 2 == 0 else [("B", side_b), ("A", side_a)]
        got = {}
        for label, run in order:
            got[label] = run()
        ratio = got["B"][0] / got["A"][0]
        ratios.append(ratio)
        rows.append({"A": got["A"], "B": got["B"], "ratio": ratio, "load": os.getloadavg()[0]})
        print(f"{name} pair {i}: A {got['A'][0]:,.0f}  B {got['B'][0]:,.0f} msgs/s  "
              f"B/A {ratio:.3f}  scrapes {got['B'][1]}  load {os.getloadavg()[0]:.1f}",
              flush=True)
    print(f"{name}: B/A median {statistics.median(ratios):.3f}, "
          f"min {min(ratios):.3f}, max {max(ratios):.3f} over {len(ratios)} pairs", flush=True)
    return {"pairs": rows, "median": statistics.median(ratios)}


def latency(a):
    p, addr, maddr = start(a.reactor, True)
    try:
        lp = subprocess.Popen(
            ["taskset", "-c", "1", a.reactor, "load", addr, "-c", str(a.lat_conns), "-d",
             str(a.lat_duration), "--warmup", "1", "--interval", "0", "--json",
             "--connect-rate", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # Wait until the connections are all open.
        deadline = time.time() + 300
        while time.time() < deadline:
            txt = subprocess.run(["curl", "-s", f"http://{maddr}/metrics"],
                                 capture_output=True, text=True).stdout
            active = [l for l in txt.splitlines() if l.startswith("reactor_connections_active ")]
            if active and float(active[0].split()[1]) >= a.lat_conns * 0.99:
                break
            time.sleep(0.5)
        times = []
        for _ in range(a.samples):
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{time_total}",
                                  f"http://{maddr}/metrics"], capture_output=True, text=True)
            times.append(float(out.stdout) * 1000)
            time.sleep(0.05)
        out, _ = lp.communicate(timeout=600)
        r = json.loads(out)
        times.sort()
        res = {"connections": a.lat_conns, "load_msgs_per_sec": r["msgs_per_sec"],
               "load_ok": r["ok"], "scrape_ms_p50": statistics.median(times),
               "scrape_ms_p90": times[int(len(times) * 0.9)], "scrape_ms_max": times[-1],
               "samples": len(times)}
        print("latency:", json.dumps(res), flush=True)
        return res
    finally:
        stop(p)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="a reactor build without the counters (counters)")
    ap.add_argument("--reactor", default="target/release/reactor")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--pipeline", type=int, default=16)
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--scrape-rate", type=int, default=200)
    ap.add_argument("--lat-conns", type=int, default=19000)
    ap.add_argument("--lat-duration", type=float, default=40)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--out")
    ap.add_argument("parts", nargs="+", choices=["counters", "scrape", "latency"])
    a = ap.parse_args()
    results = {"uptime_load_start": os.getloadavg()}
    if "counters" in a.parts:
        results["counters"] = pairs(
            "counters", a,
            lambda: one(a.base, a.reactor, a),
            lambda: one(a.reactor, a.reactor, a))
    if "scrape" in a.parts:
        results["scrape"] = pairs(
            "scrape", a,
            lambda: one(a.reactor, a.reactor, a, metrics=True),
            lambda: one(a.reactor, a.reactor, a, metrics=True, scrape_rate=a.scrape_rate))
    if "latency" in a.parts:
        results["latency"] = latency(a)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
