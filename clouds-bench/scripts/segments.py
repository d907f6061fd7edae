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

A message read in two parts (two reads on one connection with no write between) counts once,
at its last part. A call whose events still do not fit that shape (another message between
its marks) is left out, and the calls left out are counted per side. The first 400 marked
calls are the bench's warm-up (200 rounds of `a b` / `b a`) and are skipped.

Which calls are raw's: the bench alternates `a b`, `b a`, ..., and raw is `a` (see
`load::interleaved`). Each side's connection (the one its caller's `PUBLISH` goes on) is
taken from that pattern by a majority, and then every call is labelled by the connection its
first write uses, so a lost event cannot shift the labels of later calls. (A lost mark would
still pair the marks wrongly from there on: those calls fail the shape check and show in the
count left out.)

Timestamps are the system calls' entries (a read: its return). So work done after a read
returns, up to the next write, falls in the segment that read starts. The marks sit outside
each call's own timing in the bench; each costs a system call, on both sides alike. The
medians of the segments need not add up to the median of the whole call.
"""

import collections
import re
import subprocess
import sys

WARM_UP = 400

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
    marks = collections.Counter()
    for line in out.splitlines():
        m = EVENT.match(line)
        if not m:
            continue
        pid, tid, time, event = int(m["pid"]), int(m["tid"]), float(m["time"]) * 1e6, m["event"]
        if event == "sys_enter_getppid":
            marks[pid] += 1
            found.append((time, "mark", None, pid))
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
    if not marks:
        return []
    # The bench's process is the one that marks its calls (Redis runs as another process).
    marker = marks.most_common(1)[0][0]
    return [(e[0], e[1], e[2]) for e in sorted(found, key=lambda e: e[0]) if e[3] == marker]


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
    reads, last_read_fd = [], None
    for event in call:
        if event[1] == "write":
            last_read_fd = None
        elif event[1] == "read":
            if reads and event[2] == last_read_fd:
                reads[-1] = event  # the rest of a message read in two parts
            else:
                reads.append(event)
            last_read_fd = event[2]
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
    return values[len(values) // 2] if values else float("nan")


def main(args):
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    made = calls(events(args[0]))[WARM_UP:]
    if not made:
        print("no marked calls after the warm-up: record with --mark-calls and the events "
              "above", file=sys.stderr)
        return 1
    # Each side's connection, by the alternation; then each call by its connection.
    votes = {"raw": collections.Counter(), "clouds": collections.Counter()}
    parts = [split(call) for call in made]
    for k, part in enumerate(parts):
        if part is not None:
            votes["raw" if k % 4 in (0, 3) else "clouds"][part[1]] += 1
    side_of = {}
    for side, used in votes.items():
        if used:
            fd, n = used.most_common(1)[0]
            if n < 0.95 * sum(used.values()):
                print(f"warning: {side}'s calls do not go out on one connection "
                      f"({dict(used)}): are raw and clouds told apart right?", file=sys.stderr)
            side_of[fd] = side
    sides = {"raw": [], "clouds": []}
    left_out = collections.Counter()
    for k, part in enumerate(parts):
        side = side_of.get(part[1]) if part is not None else None
        if side is None:
            left_out["raw" if k % 4 in (0, 3) else "clouds"] += 1
        else:
            sides[side].append(part[0])
    print(f"{len(made)} marked calls after the warm-up; split: {len(sides['raw'])} raw, "
          f"{len(sides['clouds'])} clouds; left out (another message between the marks): "
          f"{left_out['raw']} raw, {left_out['clouds']} clouds")
    print(f"{'median, µs':44s}{'raw':>8s}{'clouds':>8s}{'clouds - raw':>14s}")
    for i, name in enumerate(SEGMENTS):
        raw = median([c[i] for c in sides["raw"]])
        clouds = median([c[i] for c in sides["clouds"]])
        print(f"{name:44s}{raw:8.1f}{clouds:8.1f}{clouds - raw:+14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
