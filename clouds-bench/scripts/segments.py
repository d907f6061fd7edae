#!/usr/bin/env python3
"""Where the time of a call made alone goes: raw's round trip against clouds', segment by segment.

Reads a `perf record` of the bench's interleaved calls (`--alone --mark-calls`, or the full
table with `--mark-calls`), made with these events:

    perf record -o segments.data -e syscalls:sys_enter_getppid,syscalls:sys_enter_writev,\
syscalls:sys_enter_recvfrom,syscalls:sys_exit_recvfrom \
        target/release/clouds-bench --alone --reps 1 --mark-calls
    python3 clouds-bench/scripts/segments.py segments.data

`--mark-calls` makes one `getppid` right before and right after each call (nothing else in
the bench makes that system call). Between the two marks, a call alone over one Redis makes
two `writev`s (fred writes the caller's `PUBLISH`, then the provider's) and reads two messages
(the provider its call, then the caller its reply; reads of 8 bytes or less are the
`PUBLISH`es' answers). So each call splits into five segments:

    1  call starts         -> caller's PUBLISH written   (caller's work, and waking fred's writer)
    2  PUBLISH written     -> provider reads the call    (kernel, Redis, waking the reader)
    3  provider reads      -> provider's PUBLISH written (the provider's whole work)
    4  PUBLISH written     -> caller reads the reply     (kernel, Redis, waking the reader)
    5  caller reads reply  -> call ends                  (caller's work, and waking the caller)

A call whose events do not fit that shape (another message between its marks, a read split
in two) is left out and counted. Which calls are raw's: the bench alternates `a b`, `b a`,
..., and raw is `a` (see `load::interleaved`); the script also checks that each side's calls
all start with a write on the same connection. The medians of the segments need not add up
to the median of the whole call.

Timestamps are the system calls' entries (a read: its return), so work between a read's
return and the next entry into the kernel is in the segment it ends. The marks cost about a
microsecond each, on both sides alike.
"""

import collections
import re
import subprocess
import sys

EVENT = re.compile(
    r"^\s*(?P<comm>.+?)\s+(?P<pid>\d+)/(?P<tid>\d+)\s+(?P<time>[\d.]+):\s+"
    r"syscalls:(?P<event>\w+):\s*(?P<args>.*)$")
FD = re.compile(r"fd: (0x[0-9a-f]+)")

SEGMENTS = [
    "1 call starts -> caller's PUBLISH written",
    "2 -> provider reads the call",
    "3 -> provider's PUBLISH written",
    "4 -> caller reads the reply",
    "5 -> call ends",
    "  the whole call",
]


def events(path):
    """(time in µs, kind, fd) of the marking process, in time order: kind is `mark`, `write`,
    `read` (a message) or `ack` (8 bytes or less)."""
    out = subprocess.run(["perf", "script", "--ns", "-i", path, "-F",
                          "comm,pid,tid,time,event,trace"],
                         capture_output=True, text=True, check=True).stdout
    found, reading = [], {}
    marker = None
    for line in out.splitlines():
        m = EVENT.match(line)
        if not m:
            continue
        pid, tid, time, event = int(m["pid"]), int(m["tid"]), float(m["time"]) * 1e6, m["event"]
        if event == "sys_enter_getppid":
            # The bench's process is the one that marks (Redis runs as another process).
            marker = marker or pid
            if pid == marker:
                found.append((time, "mark", None))
        elif event == "sys_enter_writev":
            found.append((time, "write", int(FD.search(m["args"])[1], 16), pid))
        elif event == "sys_enter_recvfrom":
            reading[tid] = int(FD.search(m["args"])[1], 16)
        elif event == "sys_exit_recvfrom" and tid in reading:
            fd = reading.pop(tid)
            value = m["args"].strip()
            got = int(value, 16) if value.startswith("0x") else int(value)
            if 0 < got < 1 << 62:
                found.append((time, "read" if got > 8 else "ack", fd, pid))
    return [(e[0], e[1], e[2]) for e in sorted(found, key=lambda e: e[0])
            if e[1] == "mark" or e[3] == marker]


def calls(found):
    """The events between each pair of marks, one list per call, in order."""
    made, current = [], None
    for event in found:
        if event[1] == "mark":
            if current is None:
                current = [event]
            else:
                current.append(event)
                made.append(current)
                current = None
        elif current is not None:
            current.append(event)
    return made


def split(call):
    """The five segments of one call (µs), and the connection its PUBLISH went on; None if the
    call does not have the expected shape."""
    writes = [e for e in call if e[1] == "write"]
    reads = [e for e in call if e[1] == "read"]
    if len(writes) != 2 or len(reads) != 2:
        return None
    start, end = call[0][0], call[-1][0]
    (sent, _, fd), (replied, _, _) = writes
    (arrived, _, _), (back, _, _) = reads
    if not start <= sent <= arrived <= replied <= back <= end:
        return None
    return [sent - start, arrived - sent, replied - arrived, back - replied, end - back,
            end - start], fd


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def main(args):
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    made = calls(events(args[0]))
    if not made:
        print("no marked calls: record with --mark-calls and the events above", file=sys.stderr)
        return 1
    sides = {"raw": [], "clouds": []}
    connections = {"raw": collections.Counter(), "clouds": collections.Counter()}
    left_out = 0
    for k, call in enumerate(made):
        side = "raw" if k % 4 in (0, 3) else "clouds"
        parts = split(call)
        if parts is None:
            left_out += 1
            continue
        sides[side].append(parts[0])
        connections[side][parts[1]] += 1
    for side, used in connections.items():
        fd, n = used.most_common(1)[0] if used else (None, 0)
        if n < 0.99 * sum(used.values()):
            print(f"warning: {side}'s calls do not all go out on one connection ({dict(used)}): "
                  "are raw and clouds told apart right?", file=sys.stderr)
    print(f"{len(made)} marked calls; {len(sides['raw'])} raw and {len(sides['clouds'])} "
          f"clouds split, {left_out} left out (another message between the marks, or a "
          "read in two)")
    print(f"{'median, µs':44s}{'raw':>8s}{'clouds':>8s}{'clouds - raw':>14s}")
    for i, name in enumerate(SEGMENTS):
        raw = median([c[i] for c in sides["raw"]])
        clouds = median([c[i] for c in sides["clouds"]])
        print(f"{name:44s}{raw:8.1f}{clouds:8.1f}{clouds - raw:+14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
