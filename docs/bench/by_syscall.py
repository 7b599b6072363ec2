#!/usr/bin/env python3
"""Splits a server's CPU profile by the system call it was spent in.

    perf record -e cpu-clock -F 20000 -g -p SERVER_PID -- sleep 3
    perf script -F ip,sym > stacks.txt
    python3 docs/bench/by_syscall.py stacks.txt [--ns-per-msg N]

Every sample is charged to the first system call found on its stack
(send/write, recv/read, epoll_wait), or to "user and other" when there is
none; within each, a few kernel functions worth watching are broken out
(a sample counts under each of them that is on its stack). With
--ns-per-msg (the server's measured CPU per message) shares are also
given as nanoseconds per message.
"""

import argparse
import collections

CALLS = [
    ("send / write", ("__sys_sendto", "ksys_write")),
    ("recv / read", ("__x64_sys_recvfrom", "ksys_read")),
    ("epoll_wait", ("do_epoll_wait",)),
]
WATCH = [
    "handle_softirqs",  # loopback: the peer's receive path, run in our send
    "__tcp_transmit_skb",
    "tcp_ack",
    "__schedule",  # going to sleep in epoll_wait and waking up
    "tcp_recvmsg",
]


def stacks(path):
    frames = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                if frames:
                    yield frames
                frames = []
                continue
            parts = line.split(None, 1)
            frames.append(parts[-1])
    if frames:
        yield frames


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stacks")
    ap.add_argument("--ns-per-msg", type=float)
    args = ap.parse_args()
    total = 0
    by_call = collections.Counter()
    by_watch = collections.Counter()
    for frames in stacks(args.stacks):
        total += 1
        call = next((name for name, roots in CALLS if any(r in frames for r in roots)),
                    "user and other")
        by_call[call] += 1
        for w in WATCH:
            if any(fr.startswith(w) for fr in frames):
                by_watch[call, w] += 1
    if not total:
        raise SystemExit("no samples")

    def show(label, n):
        pct = 100 * n / total
        ns = f"  {args.ns_per_msg * n / total:6.0f} ns/msg" if args.ns_per_msg else ""
        print(f"{label:40s} {pct:5.1f} %{ns}")

    for name, _ in CALLS + [("user and other", ())]:
        show(name, by_call[name])
        for w in WATCH:
            if by_watch[name, w]:
                show(f"  of which {w}", by_watch[name, w])


if __name__ == "__main__":
    main()
