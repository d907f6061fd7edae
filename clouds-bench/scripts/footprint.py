#!/usr/bin/env python3
"""Code footprint of one round trip: the distinct 64-byte lines of machine code it executes.

Reads Callgrind outputs made with `--dump-instr=yes --compress-pos=no --compress-strings=no`
of two runs of the same scenario that differ only in their number of calls (N and N + EXTRA,
as `clouds-bench --profile ... --calls N`). An instruction counts as executed by every round
trip when its count grew by at least 3/4 of EXTRA between the two runs; its 64-byte line is
part of the footprint. Instructions per round trip are the whole difference over EXTRA.
It also estimates the bytes of those instructions and the lines they would fill packed end
to end (the same machine code with every instruction that did not run moved out of the way).
Callgrind gives addresses, not sizes: an instruction's size is taken as the distance to the
next address it saw. That is exact inside a run of executed instructions and too large where
a run ends (the gap then covers code that never ran), so the figure is a range: gaps over
15 bytes (the longest x86-64 instruction) counted as 1 byte, then as 15. Gaps of 15 bytes
or less can still hide code that never ran, so even the low end is an estimate, not a floor.

    footprint.py EXTRA clouds-N.out clouds-2N.out [raw-N.out raw-2N.out]

With a second pair (the same binary, `--profile raw`), it also prints the lines only the first
pair executes and only the second does, and where the first pair's own lines are (by
function). BENCHMARKS.md, "What the call path adds over raw, counted", shows how it is run.
"""

import collections
import re
import sys


def load(path):
    """Instruction address -> (cost, function) of one Callgrind output."""
    costs = collections.Counter()
    function_of = {}
    function = None
    last = 0
    skip_next = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            if line.startswith("calls="):
                # The line after `calls=` is the call's inclusive cost, not the caller's own.
                skip_next = True
                continue
            if line[0] in "0123456789*":
                parts = line.split()
                first = parts[0]
                if first == "*":
                    address = last
                elif first.startswith("0x"):
                    address = int(first, 16)
                else:
                    address = int(first)
                last = address
                if skip_next:
                    skip_next = False
                    continue
                # positions: instr line, then the cost (Ir)
                if len(parts) >= 3:
                    costs[address] += int(parts[2])
                    function_of[address] = function
            elif line.startswith("fn="):
                function = line[3:]
    return costs, function_of


def per_round_trip(extra, before_path, after_path):
    """(instructions per round trip, {64-byte line: function}, (low, high) bytes of the
    distinct instructions run) of one pair of runs."""
    before, _ = load(before_path)
    after, function_of = load(after_path)
    instructions = (sum(after.values()) - sum(before.values())) / extra
    # An instruction's size: the distance to the next address Callgrind saw (see the top).
    addresses = sorted(after)
    following = dict(zip(addresses, addresses[1:]))
    lines = {}
    low = high = 0
    for address, cost in after.items():
        if cost - before.get(address, 0) >= 0.75 * extra:
            lines.setdefault(address // 64, function_of[address])
            gap = following.get(address, address + 16) - address
            low += gap if gap <= 15 else 1
            high += min(gap, 15)
    return instructions, lines, (low, high)


def describe(name, pair):
    """One side's figures, as printed."""
    instructions, lines, (low, high) = pair
    return (f"{name}: {instructions:,.0f} instructions, {len(lines)} code lines "
            f"({len(lines) * 64 / 1024:.1f} KiB) per round trip; the distinct instructions "
            f"run, about {low / 1024:.1f}-{high / 1024:.1f} KiB, would fill "
            f"{-(-low // 64)}-{-(-high // 64)} lines packed")


def area(function):
    """A short name for where a function lives (crate and module)."""
    found = re.search(r"([a-z_][a-z0-9_]*::[a-z_][a-z0-9_]*)", function or "")
    return found.group(1) if found else (function or "?")[:40]


def main(args):
    if len(args) not in (3, 5):
        print(__doc__, file=sys.stderr)
        return 2
    extra = int(args[0])
    first = per_round_trip(extra, args[1], args[2])
    print(describe("first", first))
    if len(args) == 5:
        second = per_round_trip(extra, args[3], args[4])
        print(describe("second", second))
        only_first = {line: f for line, f in first[1].items() if line not in second[1]}
        only_second = [line for line in second[1] if line not in first[1]]
        print(f"lines only the first executes: {len(only_first)}, only the second: "
              f"{len(only_second)}, net: {len(only_first) - len(only_second):+d}")
        by_area = collections.Counter(area(f) for f in only_first.values())
        for name, count in by_area.most_common(25):
            print(f"{count:6d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
