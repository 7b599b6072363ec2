#!/usr/bin/env python3
"""What watching the loop costs: alternating pairs of echo runs.

Two questions, each answered by pairs run back to back, in alternating
order, so both sides meet the same machine:

  counters  the hot-path counters: BASE (a build without them) against
            REACTOR (this build), neither with --metrics.
  scrape    the endpoint under scraping: REACTOR --metrics scraped 200
            times a second (curl --rate 200/s over one keep-alive
            connection) against the same server while the same scraper
            scrapes a decoy (another REACTOR --metrics, idle, on core 1).
            Both sides pay for the scraper's own CPU on core 1, so the
            ratio is what answering the scrapes costs the measured server.
  endpoint  REACTOR against REACTOR --metrics, nobody scraping: what the
            endpoint costs by being there (the loop looks at its Poll once
            per millisecond).
  scrape-naive  the same without the decoy: no scraper at all on side A
            (what a user would see, the scraper's own CPU included).
  latency   the endpoint's answer time while `reactor load` holds
            CONNS connections busy: curl time_total of SAMPLES scrapes,
            curl run SCHED_FIFO (chrt) so that its own wait for a CPU on
            a machine whose two cores are both busy is not counted.
  latency-pairs  `latency` for BASE and REACTOR, alternating, PAIRS times
            (before/after a change to how soon the loop serves a scrape).
  percost   what one scrape costs the server: its CPU time over 5,000
            back-to-back scrapes while 1,000 idle clients are held.

Each run also reports the server's CPU use (user + system, from
/proc/PID/stat) over the load run: with only two cores, the scraper
shares core 1 with `reactor load`, so a throughput drop in `scrape` pairs
can be the scraper's own CPU taken from the load generator; the server's
CPU per message tells the two apart.

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


def start(binary, metrics, workers=1):
    # One loop: pinned to core 0. Workers: unpinned (they are the cores).
    pin = ["taskset", "-c", "0"] if workers == 1 else []
    args = pin + [binary, "serve", "--addr", "127.0.0.1:0", "--log-level", "warn"]
    if workers > 1:
        args += ["--workers", str(workers)]
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


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(reactor, addr, a):
    out = subprocess.run(
        ["taskset", "-c", "1", reactor, "load", addr, "--engine", "reactor", "-c", str(a.conns),
         "--pipeline",
         str(a.pipeline), "-d", str(a.duration), "--warmup", str(a.warmup),
         "--json"],
        capture_output=True, text=True, timeout=600)
    r = json.loads(out.stdout)
    assert r["ok"], r["errors"]
    return r["msgs_per_sec"]


def scraper(maddr, seconds, rate):
    n = int(seconds * rate)
    # One curl, one keep-alive connection, --rate paces the requests.
    return subprocess.Popen(
        ["taskset", "-c", "1", "curl", "-s", "-o", "/dev/null", "--rate", f"{rate}/s",
         "-w", "%{http_code}\n", f"http://{maddr}/metrics?[1-{n}]"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def one(binary, reactor, a, metrics=False, scrape_rate=0, decoy=False):
    p, addr, maddr = start(binary, metrics)
    d = None
    try:
        target = maddr
        if decoy:
            d = subprocess.Popen(["taskset", "-c", "1", binary, "serve", "--addr", "127.0.0.1:0",
                                  "--metrics", "127.0.0.1:0", "--log-level", "warn"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            d.stdout.readline()
            target = d.stdout.readline().split()[3]
        s = scraper(target, a.warmup + a.duration + 1, scrape_rate) if scrape_rate else None
        cpu0 = cpu_seconds(p.pid)
        rate = load(reactor, addr, a)
        cpu = cpu_seconds(p.pid) - cpu0
        # ns of server CPU per message, over warm-up and run alike.
        ns_per_msg = cpu / (rate * (a.duration + a.warmup)) * 1e9
        scrapes = None
        if s:
            # It was sized to end a second after the load; let it finish,
            # so its count is complete.
            out, _ = s.communicate(timeout=120)
            scrapes = out.count("200")
        return rate, scrapes, ns_per_msg
    finally:
        stop(p)
        if d:
            stop(d)


def pairs(name, a, side_a, side_b):
    ratios, cpu_ratios, rows = [], [], []
    for i in range(a.pairs):
        order = [("A", side_a), ("B", side_b)] if i % 2 == 0 else [("B", side_b), ("A", side_a)]
        got = {}
        for label, run in order:
            got[label] = run()
        ratio = got["B"][0] / got["A"][0]
        cpu_ratio = got["B"][2] / got["A"][2]
        ratios.append(ratio)
        cpu_ratios.append(cpu_ratio)
        rows.append({"A": got["A"], "B": got["B"], "ratio": ratio, "cpu_ratio": cpu_ratio,
                     "load": os.getloadavg()[0]})
        print(f"{name} pair {i}: A {got['A'][0]:,.0f}  B {got['B'][0]:,.0f} msgs/s  "
              f"B/A {ratio:.3f}  server ns/msg A {got['A'][2]:.0f} B {got['B'][2]:.0f} "
              f"(B/A {cpu_ratio:.3f})  scrapes {got['B'][1]}  load {os.getloadavg()[0]:.1f}",
              flush=True)
    for what, r in (("msgs/s", ratios), ("server CPU/msg", cpu_ratios)):
        print(f"{name}: {what} B/A median {statistics.median(r):.3f}, "
              f"min {min(r):.3f}, max {max(r):.3f} over {len(r)} pairs", flush=True)
    return {"pairs": rows, "median": statistics.median(ratios),
            "cpu_median": statistics.median(cpu_ratios)}


def latency(a, binary=None):
    binary = binary or a.reactor
    p, addr, maddr = start(binary, True, a.lat_workers)
    try:
        lp = subprocess.Popen(
            ["taskset", "-c", "1", a.reactor, "load", addr, "--engine", "reactor",
             "-c", str(a.lat_conns), "-d",
             str(a.lat_duration), "--warmup", "1", "--json", "--pipeline", str(a.lat_pipeline),
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
        times, naive = [], []
        for _ in range(a.samples):
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{time_total}",
                                  f"http://{maddr}/metrics"], capture_output=True, text=True)
            naive.append(float(out.stdout) * 1000)
            out = subprocess.run(["chrt", "-f", "50", "curl", "-s", "-o", "/dev/null", "-w",
                                  "%{time_total}",
                                  f"http://{maddr}/metrics"], capture_output=True, text=True)
            times.append(float(out.stdout) * 1000)
            time.sleep(0.05)
        out, _ = lp.communicate(timeout=600)
        r = json.loads(out)
        times.sort()
        res = {"binary": binary, "uptime_load": os.getloadavg(), "workers": a.lat_workers,
               "connections": a.lat_conns, "load_msgs_per_sec": r["msgs_per_sec"],
               "load_ok": r["ok"], "scrape_ms_p50": statistics.median(times),
               "scrape_ms_p90": times[int(len(times) * 0.9)], "scrape_ms_max": times[-1],
               "samples": len(times),
               "unprioritized_curl_ms_p50": statistics.median(naive),
               "unprioritized_curl_ms_max": max(naive)}
        print("latency:", json.dumps(res), flush=True)
        return res
    finally:
        stop(p)


def percost(a):
    p, addr, maddr = start(a.reactor, True)
    try:
        hold = subprocess.Popen(
            ["taskset", "-c", "1", a.reactor, "load", addr, "--workload", "hold", "-c", "1000",
             "-d", "30", "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            txt = subprocess.run(["curl", "-s", f"http://{maddr}/metrics"],
                                 capture_output=True, text=True).stdout
            if "reactor_connections_active 1000" in txt:
                break
            time.sleep(0.2)
        n = 5000
        cpu0 = cpu_seconds(p.pid)
        t0 = time.time()
        out = subprocess.run(["taskset", "-c", "1", "curl", "-s", "-o", "/dev/null", "-w",
                              "%{http_code}\n", f"http://{maddr}/metrics?[1-{n}]"],
                             capture_output=True, text=True).stdout
        wall = time.time() - t0
        cpu = cpu_seconds(p.pid) - cpu0
        hold.kill()
        hold.wait()
        res = {"scrapes": out.count("200"), "server_cpu_us_per_scrape": cpu / n * 1e6,
               "scrapes_per_sec": n / wall, "idle_clients": 1000}
        print("percost:", json.dumps(res), flush=True)
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
    ap.add_argument("--lat-pipeline", type=int, default=16)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--lat-workers", type=int, default=1,
                    help="latency: serve --workers N (unpinned; the load stays on core 1)")
    ap.add_argument("--out")
    ap.add_argument("parts", nargs="+", choices=["counters", "endpoint", "scrape", "scrape-naive", "latency",
                             "latency-pairs", "percost"])
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
            lambda: one(a.reactor, a.reactor, a, metrics=True, scrape_rate=a.scrape_rate,
                        decoy=True),
            lambda: one(a.reactor, a.reactor, a, metrics=True, scrape_rate=a.scrape_rate))
    if "endpoint" in a.parts:
        results["endpoint"] = pairs(
            "endpoint", a,
            lambda: one(a.reactor, a.reactor, a),
            lambda: one(a.reactor, a.reactor, a, metrics=True))
    if "scrape-naive" in a.parts:
        results["scrape_naive"] = pairs(
            "scrape-naive", a,
            lambda: one(a.reactor, a.reactor, a, metrics=True),
            lambda: one(a.reactor, a.reactor, a, metrics=True, scrape_rate=a.scrape_rate))
    if "percost" in a.parts:
        results["percost"] = percost(a)
    if "latency" in a.parts:
        results["latency"] = latency(a)
    if "latency-pairs" in a.parts:
        runs = []
        for i in range(a.pairs):
            order = [a.base, a.reactor] if i % 2 == 0 else [a.reactor, a.base]
            for b in order:
                runs.append(latency(a, b))
        results["latency_pairs"] = runs
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
