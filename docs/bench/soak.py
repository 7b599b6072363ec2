#!/usr/bin/env python3
"""The soak and the memory flood: reactor under abuse, measured.

    cargo build --release
    flock -w 3600 /work/team/bench.lock python3 docs/bench/soak.py soak --minutes 10
    flock -w 3600 /work/team/bench.lock python3 docs/bench/soak.py flood --clients 19000

`soak` runs at least --minutes of mixed abuse against one release echo
server and one release chat server (a process serves one protocol, so chat
abuse needs its own), sampling each server's RSS and open descriptors
every second, and writes docs/bench/soak.json and docs/reliability.svg.
At the same time, all the while:
  - pipelined echo verifying every byte (`reactor load --pipeline 16`);
  - churn (`reactor load --workload churn`);
  - chat talkers, whose every line must reach every listener once, in order;
  - stalled chat readers that never read (dropped as slow consumers);
  - RST aborts (SO_LINGER 0) on both servers;
  - slow-loris clients that send one byte every two seconds (echo: read
    back and checked; chat: a line that never ends, reading the room);
  - a `/who` flood every 30 s, every answer counted;
  - a memory flood every 60 s: 1,000 echo clients write until blocked and
    read nothing for 20 s, then read everything back, checked byte for byte.

`flood` is the --max-memory target: CLIENTS clients write EACH bytes and
never read, while `reactor load` measures a well-behaved client; then the
flood reads everything back. Writes docs/bench/flood.json.

Every result says whether it held; the exit status is 0 only if all did.
"""

import argparse
import json
import os
import random
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "release", "reactor")
STOP = threading.Event()
LOCK = threading.Lock()
FAILURES = []


def fail(what):
    with LOCK:
        FAILURES.append(what)
    print("FAIL:", what, file=sys.stderr, flush=True)


def start_server(*args):
    p = subprocess.Popen(["taskset", "-c", "0", BIN, "serve", "--addr", "127.0.0.1:0", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline().split()
    host, port = line[2].rsplit(":", 1)
    return p, (host, int(port))


def stop_server(p):
    p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        return "killed"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def small_socket(rcv=4096, snd=16384):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcv)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, snd)
    return s


def drain(s):
    """Reads whatever is waiting, without waiting. (On a socket with a
    timeout, Python waits out the timeout even with MSG_DONTWAIT.)"""
    t = s.gettimeout()
    s.settimeout(0.0)
    try:
        while s.recv(1 << 20):
            pass
    except BlockingIOError:
        pass
    finally:
        s.settimeout(t)


def load(addr, *args):
    """Runs `reactor load` pinned to CPU 1; returns its JSON report."""
    # The mio loop, as in every published soak (the default became auto).
    cmd = ["taskset", "-c", "1", BIN, "load", f"{addr[0]}:{addr[1]}", "--json",
           "--engine", "reactor", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"ok": False, "stderr": out.stderr[-2000:]}


# --- the flood: clients that write and do not read -------------------------

class Flood:
    """N clients, each writing its own slice of one random block."""

    def __init__(self, addr, n, each):
        self.each = each
        self.block = random.Random(1).randbytes(each + 65536)
        self.socks = []
        for _ in range(n):
            s = small_socket()
            s.connect(addr)
            s.setblocking(False)
            self.socks.append(s)
        self.sent = [0] * n

    def data(self, i):
        off = (i * 7919) % 65536
        return self.block[off:off + self.each]

    def write(self, quiet=2.0, limit=300.0):
        """Writes until every client is blocked for `quiet` seconds."""
        views = [memoryview(self.data(i)) for i in range(len(self.socks))]
        last, start = time.time(), time.time()
        while time.time() - last < quiet and time.time() - start < limit:
            progress = False
            for i, s in enumerate(self.socks):
                if self.sent[i] >= self.each:
                    continue
                try:
                    n = s.send(views[i][self.sent[i]:self.sent[i] + 65536])
                    self.sent[i] += n
                    progress = True
                except BlockingIOError:
                    pass
            if progress:
                last = time.time()
            else:
                time.sleep(0.05)
        return sum(self.sent)

    def read_back(self, limit=600.0):
        """Reads every client's bytes back; returns the bytes that matched."""
        sel = selectors.DefaultSelector()
        got = {}
        for i, s in enumerate(self.socks):
            if self.sent[i]:
                got[i] = bytearray()
                sel.register(s, selectors.EVENT_READ, i)
        deadline = time.time() + limit
        pending = len(got)
        while pending and time.time() < deadline:
            for key, _ in sel.select(timeout=1.0):
                i = key.data
                try:
                    chunk = key.fileobj.recv(262144)
                except BlockingIOError:
                    continue
                except OSError as e:
                    fail(f"flood client {i}: {e}")
                    chunk = b""
                if chunk:
                    got[i] += chunk
                if not chunk or len(got[i]) >= self.sent[i]:
                    sel.unregister(key.fileobj)
                    pending -= 1
        good = 0
        for i, g in got.items():
            if bytes(g) == self.data(i)[:self.sent[i]]:
                good += len(g)
            else:
                fail(f"flood client {i}: {len(g)} of {self.sent[i]} bytes back, or different")
        return good

    def close(self):
        for s in self.socks:
            s.close()


# --- soak parts ------------------------------------------------------------

def part_load(name, addr, results, *args):
    r = load(addr, *args)
    results[name] = {k: r.get(k) for k in ("ok", "messages", "msgs_per_sec", "latency_us", "errors",
                                           "connections_opened", "stderr")}
    if not r.get("ok"):
        fail(f"{name}: reactor load reported failure: {r.get('errors')} {r.get('stderr', '')}")


def part_chat(addr, results, talkers=20, listeners=5, rate=5.0):
    """Talkers send numbered lines; listeners check each sender's order."""
    ls = []
    for _ in range(listeners):
        s = socket.create_connection(addr)
        s.settimeout(30)
        f = s.makefile("rb")
        f.readline()  # welcome
        ls.append((s, f))
    ts = []
    for _ in range(talkers):
        s = socket.create_connection(addr)
        s.settimeout(30)
        f = s.makefile("rb")
        name = f.readline().split()[-1].decode()
        ts.append((s, name))
    sent = {name: 0 for _, name in ts}
    received = [0] * listeners
    errors = []

    def listen(k, f):
        seen = {}
        while True:
            try:
                line = f.readline()
            except OSError:
                break
            if not line:
                break
            if line.startswith(b"* "):
                continue
            name, _, text = line.decode(errors="replace").partition(": ")
            if name not in sent:
                continue  # another client's line (the /who flooder, ...)
            n = int(text.split()[0])
            if n != seen.get(name, -1) + 1:
                errors.append(f"listener {k}: {name} line {n} after {seen.get(name)}")
            seen[name] = n
            received[k] += 1

    threads = [threading.Thread(target=listen, args=(k, f), daemon=True) for k, (_, f) in enumerate(ls)]
    for t in threads:
        t.start()
    period = 1.0 / rate
    while not STOP.is_set():
        for s, name in ts:
            s.sendall(f"{sent[name]} {'x' * 40}\n".encode())
            sent[name] += 1
            # Talkers read what the room says too, or they would be slow
            # consumers and rightly dropped.
            drain(s)
        time.sleep(period)
    time.sleep(3)
    for s, _ in ls:
        s.shutdown(socket.SHUT_RDWR)
    for t in threads:
        t.join(10)
    total = sum(sent.values())
    results["chat_talkers"] = {"lines_sent": total, "lines_received_per_listener": received,
                               "order_errors": errors[:10]}
    if errors or any(r != total for r in received):
        fail(f"chat: {total} lines sent, listeners got {received}, {len(errors)} order errors")
    for s, _ in ts + [(s, None) for s, _ in ls]:
        s.close()


def part_stalled_readers(addr, results, n=50):
    """Chat clients that never read, 20 s at a time, while one client
    sends 4 KB lines at 100 a second: they must be dropped as slow
    consumers (past --max-buffer, or the biggest at --max-memory)."""
    rounds = dropped = 0
    line = b"%s\n" % (b"b" * 4000)
    while not STOP.is_set():
        socks = []
        for _ in range(n):
            s = small_socket()
            s.connect(addr)
            socks.append(s)
        blaster = socket.create_connection(addr)
        end = time.time() + 20
        while time.time() < end and not STOP.is_set():
            blaster.sendall(line * 20)
            try:
                while blaster.recv(1 << 20, socket.MSG_DONTWAIT):
                    pass
            except BlockingIOError:
                pass
            time.sleep(0.2)
        blaster.close()
        for s in socks:
            s.setblocking(False)
            try:
                while True:
                    if not s.recv(1 << 20):
                        dropped += 1
                        break
            except BlockingIOError:
                pass
            except OSError:
                dropped += 1
            s.close()
        rounds += 1
    results["stalled_readers"] = {"rounds": rounds, "clients": rounds * n, "dropped_as_slow": dropped}
    if dropped < rounds * n // 2:
        fail(f"stalled readers: only {dropped} of {rounds * n} dropped as slow consumers")


def part_rst(addrs, results, per_sec=50):
    n = 0
    while not STOP.is_set():
        for addr in addrs:
            try:
                s = socket.create_connection(addr)
                s.sendall(b"abort me\n" * 100)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                n += 1
            except OSError as e:
                fail(f"rst: {e}")
        time.sleep(1.0 / per_sec)
    results["rst_aborts"] = n


def part_loris(echo, chat, results, n=100):
    """One byte every two seconds: echo must echo it, chat holds a partial
    line (those clients read what the room says)."""
    es = [socket.create_connection(echo) for _ in range(n)]
    cs = [socket.create_connection(chat) for _ in range(n)]
    for s in es + cs:
        s.settimeout(30)
    ticks = 0
    while not STOP.is_set():
        b = bytes([97 + ticks % 26])
        for s in cs:
            s.sendall(b)
            # They read what the room says, or they would be slow
            # consumers rather than slow senders.
            drain(s)
        for s in es:
            s.sendall(b)
        for i, s in enumerate(es):
            try:
                got = s.recv(1)
            except OSError as e:
                got = repr(e).encode()
            if got != b:
                fail(f"loris {i}: sent {b!r}, got {got!r}")
                break
        ticks += 1
        # Two seconds to the next byte; meanwhile the chat ones read what
        # the room says, often, so they are never slow consumers.
        for _ in range(20):
            if STOP.wait(0.1):
                break
            for s in cs:
                drain(s)
    results["slow_loris"] = {"clients": 2 * n, "bytes_each": ticks}
    for s in es + cs:
        s.close()


def part_who(addr, results):
    floods = answers = 0
    while not STOP.wait(30):
        s = socket.create_connection(addr)
        s.settimeout(60)
        f = s.makefile("rb")
        count = 65536 // 5
        s.sendall(b"/who\n" * count)
        got = 0
        while got < count:
            line = f.readline()
            if not line:
                fail(f"/who flood: closed after {got} of {count} answers")
                break
            if line.startswith(b"* online: "):
                got += 1
        answers += got
        floods += 1
        s.close()
    results["who_floods"] = {"floods": floods, "answers": answers}


def part_memory_flood(addr, results, clients=1000, each=1 << 20):
    rounds = sent = verified = 0
    while not STOP.wait(40):
        f = Flood(addr, clients, each)
        sent_now = f.write(quiet=2.0, limit=60)
        STOP.wait(20)
        verified_now = f.read_back()
        f.close()
        rounds += 1
        sent += sent_now
        verified += verified_now
        if verified_now != sent_now:
            fail(f"memory flood: {sent_now} bytes sent, {verified_now} came back right")
    results["memory_flood"] = {"rounds": rounds, "clients_each_round": clients, "bytes_sent": sent,
                               "bytes_verified": verified}


def guarded(part):
    """Runs a soak part; an exception is a failure of the soak, not a
    silently dead thread."""
    def run(*args):
        try:
            part(*args)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            fail(f"{part.__name__}: {type(e).__name__}: {e}")
    return run


def sampler(procs, samples):
    start = time.time()
    while not STOP.wait(1.0):
        row = {"t": round(time.time() - start, 1)}
        for name, p in procs.items():
            try:
                row[name + "_rss_kib"] = rss_kib(p.pid)
                row[name + "_fds"] = fds(p.pid)
            except OSError:
                pass
        samples.append(row)


def soak(args):
    echo_p, echo = start_server("--max-memory", str(args.echo_memory), "--idle-timeout", "3600",
                                "--log-level", "warn")
    chat_p, chat = start_server("--mode", "chat", "--max-memory", str(args.chat_memory),
                                "--idle-timeout", "3600", "--log-level", "warn")
    procs = {"echo": echo_p, "chat": chat_p}
    seconds = int(args.minutes * 60)
    results, samples = {}, []
    idle_fds = {name: fds(p.pid) for name, p in procs.items()}
    parts = [
        threading.Thread(target=sampler, args=(procs, samples)),
        threading.Thread(target=guarded(part_load), args=("pipelined_echo", echo, results, "-c", "50", "--pipeline", "16",
                                                  "-s", "512", "-d", str(seconds), "--warmup", "0",
                                                  "--rate", "200")),
        threading.Thread(target=guarded(part_load), args=("churn", echo, results, "--workload", "churn", "-c", "10",
                                                  "-d", str(seconds), "--warmup", "0",
                                                  "--connect-rate", "300")),
        threading.Thread(target=guarded(part_chat), args=(chat, results)),
        threading.Thread(target=guarded(part_stalled_readers), args=(chat, results)),
        threading.Thread(target=guarded(part_rst), args=([echo, chat], results)),
        threading.Thread(target=guarded(part_loris), args=(echo, chat, results)),
        threading.Thread(target=guarded(part_who), args=(chat, results)),
        threading.Thread(target=guarded(part_memory_flood), args=(echo, results)),
    ]
    for t in parts:
        t.start()
    time.sleep(seconds)
    STOP.set()
    for t in parts:
        t.join(900)
    time.sleep(2)
    final = {name: {"rss_kib": rss_kib(p.pid), "fds": fds(p.pid)} for name, p in procs.items()}
    results["exit"] = {name: stop_server(p) for name, p in procs.items()}
    for name, code in results["exit"].items():
        if code != 0:
            fail(f"{name} server exited {code}")
    results["final"] = final
    results["verdict"] = flatness(samples, final, idle_fds)
    results["failures"] = FAILURES
    results["settings"] = vars(args)
    results["samples"] = samples
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    draw(samples, args.svg)
    summary = {k: v for k, v in results.items() if k not in ("samples",)}
    print(json.dumps(summary, indent=1))
    return 0 if not FAILURES else 1


def flatness(samples, final, idle_fds):
    """RSS after warm-up (the first minute): the peak of the second half
    against the peak of the first; descriptors at the end against the start."""
    out = {}
    warm = [s for s in samples if s["t"] >= 60]
    for name in ("echo", "chat"):
        key = name + "_rss_kib"
        rows = [s[key] for s in warm if key in s]
        if len(rows) < 4:
            continue
        half = len(rows) // 2
        first, second = max(rows[:half]), max(rows[half:])
        fd0 = idle_fds[name]
        out[name] = {"peak_rss_first_half_kib": first, "peak_rss_second_half_kib": second,
                     "rss_flat": second <= first * 1.1 + 4096, "fds_at_start": fd0,
                     "fds_after_stop": final[name]["fds"], "fds_back": final[name]["fds"] <= fd0 + 2}
        if not out[name]["rss_flat"]:
            fail(f"{name}: RSS grew after warm-up ({first} -> {second} KiB)")
        if not out[name]["fds_back"]:
            fail(f"{name}: {final[name]['fds']} descriptors open at the end, {fd0} at the start")
    return out


def draw(samples, path):
    """Two panels (RSS MiB, open descriptors) over time, plain SVG."""
    w, ph, left, right, top = 760, 200, 70, 150, 40
    colors = {"echo": "#1f77b4", "chat": "#d62728"}
    tmax = max(s["t"] for s in samples) if samples else 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{2 * ph + 90}" '
           f'font-family="sans-serif" font-size="12">', f'<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{w / 2 - 50}" y="22" font-size="15" text-anchor="middle">'
           f'Soak: server RSS and open descriptors, sampled every second</text>']
    for panel, (suffix, label, scale) in enumerate([("_rss_kib", "RSS (MiB)", 1 / 1024),
                                                     ("_fds", "open descriptors", 1)]):
        y0 = top + panel * (ph + 30)
        vals = [s[n + suffix] * scale for s in samples for n in colors if n + suffix in s] or [1]
        vmax = max(vals) * 1.1

        def px(t):
            return left + t / tmax * (w - left - right)

        def py(v):
            return y0 + ph - v / vmax * ph

        out.append(f'<line x1="{left}" y1="{y0 + ph}" x2="{w - right}" y2="{y0 + ph}" stroke="black"/>')
        out.append(f'<line x1="{left}" y1="{y0}" x2="{left}" y2="{y0 + ph}" stroke="black"/>')
        for k in range(5):
            v = vmax * k / 4
            out.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{w - right}" y2="{py(v):.1f}" stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
        for k in range(0, int(tmax) + 1, 60):
            out.append(f'<text x="{px(k):.1f}" y="{y0 + ph + 14}" text-anchor="middle">{k // 60} min</text>')
        out.append(f'<text x="14" y="{y0 + ph / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 14 {y0 + ph / 2})">{label}</text>')
        for i, (name, color) in enumerate(colors.items()):
            pts = " ".join(f"{px(s['t']):.1f},{py(s[name + suffix] * scale):.1f}"
                           for s in samples if name + suffix in s)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>')
            out.append(f'<text x="{w - right + 10}" y="{y0 + 20 + 18 * i}" fill="{color}">{name} server</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def flood(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server, addr = start_server("--max-memory", str(args.max_memory), "--log-level", "warn")
    base = rss_kib(server.pid)
    peak = [base]

    def watch():
        while not STOP.wait(1.0):
            peak[0] = max(peak[0], rss_kib(server.pid))

    w = threading.Thread(target=watch)
    w.start()
    t0 = time.time()
    f = Flood(addr, args.clients, args.each)
    connected = time.time() - t0
    sent = f.write(quiet=3.0)
    held_rss = rss_kib(server.pid)
    healthy = load(addr, "-c", "10", "-s", "64", "-d", str(args.healthy_seconds), "--warmup", "1",
                   "--rate", "100")
    verified = f.read_back()
    f.close()
    STOP.set()
    w.join()
    after = load(addr, "-c", "10", "-s", "64", "-d", "5", "--warmup", "1", "--rate", "100")
    code = stop_server(server)
    cap_mib = args.max_memory / (1 << 20)
    result = {
        "clients": args.clients, "each_bytes": args.each, "max_memory": args.max_memory,
        "connect_seconds": round(connected, 1), "bytes_sent": sent, "bytes_verified": verified,
        "rss_base_kib": base, "rss_while_flooded_kib": held_rss, "rss_peak_kib": peak[0],
        "rss_peak_mib": round(peak[0] / 1024, 1), "bound_mib": cap_mib + 64,
        "healthy_during": {k: healthy.get(k) for k in ("ok", "messages", "latency_us", "errors")},
        "healthy_after": {k: after.get(k) for k in ("ok", "messages", "latency_us")},
        "server_exit": code,
    }
    if peak[0] / 1024 > cap_mib + 64:
        fail(f"RSS peaked at {peak[0] / 1024:.0f} MiB, over the cap plus 64 MiB")
    if not healthy.get("ok") or (healthy.get("latency_us") or {}).get("p99", 1e9) > 10_000:
        fail(f"healthy client during the flood: {healthy.get('latency_us')} ok={healthy.get('ok')}")
    if verified != sent:
        fail(f"{sent} bytes sent, {verified} came back right")
    result["failures"] = FAILURES
    with open(args.out, "w") as fo:
        json.dump(result, fo, indent=1)
    print(json.dumps(result, indent=1))
    return 0 if not FAILURES else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("soak")
    s.add_argument("--minutes", type=float, default=10)
    s.add_argument("--echo-memory", type=int, default=64 << 20)
    s.add_argument("--chat-memory", type=int, default=8 << 20)
    s.add_argument("--out", default=os.path.join(ROOT, "docs", "bench", "soak.json"))
    s.add_argument("--svg", default=os.path.join(ROOT, "docs", "reliability.svg"))
    fl = sub.add_parser("flood")
    fl.add_argument("--clients", type=int, default=19000)
    # 19,000 x 64 KiB in flight stays inside the kernel's TCP memory
    # (tcp_mem); 256 KiB each made the kernel time connections out.
    fl.add_argument("--each", type=int, default=64 << 10)
    fl.add_argument("--max-memory", type=int, default=256 << 20)
    fl.add_argument("--healthy-seconds", type=int, default=20)
    fl.add_argument("--out", default=os.path.join(ROOT, "docs", "bench", "flood.json"))
    args = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: run cargo build --release first")
    sys.exit(soak(args) if args.cmd == "soak" else flood(args))


if __name__ == "__main__":
    main()
