#!/usr/bin/env python3
"""Paired per-run differences between two rows of one `xdplb-bench xdp` run, from the
JSON it writes (README, "The established-flow budget, session 23"): row A's sample minus
row B's sample of the same run (the runs are interleaved, so a run slowed as a whole
cancels), then their median. The main table's columns: `raw` (through the wrapper, the
default) or `direct`.

Usage: tests/tools/bench_paired.py JSON ROW_A ROW_B [COLUMN]
  e.g. tests/tools/bench_paired.py target/bench/xdp.json \\
         "xdp_lb [nv]: non-VIP packet" "xdp_lb [est]: non-VIP packet" direct"""
import json, statistics, sys

if len(sys.argv) not in (4, 5):
    raise SystemExit(__doc__)
path, row_a, row_b = sys.argv[1:4]
column = sys.argv[4] if len(sys.argv) == 5 else "raw"
with open(path) as f:
    report = json.load(f)
rows = {}
for row in report["tables"][0]["rows"]:
    rows[row[0]["shown"]] = {cell["column"]: cell for cell in row[1:]}
def samples(label):
    if label not in rows:
        raise SystemExit(f"no row {label!r} in {path}; rows: {', '.join(rows)}")
    cell = rows[label].get(column)
    if not cell or not cell.get("samples"):
        raise SystemExit(f"row {label!r} has no {column!r} samples")
    return cell["samples"]
a, b = samples(row_a), samples(row_b)
if len(a) != len(b):
    raise SystemExit(f"{len(a)} runs against {len(b)}: not one run's rows")
diffs = [x - y for x, y in zip(a, b)]
print(f"{column}: A median {statistics.median(a)}, B median {statistics.median(b)}; "
      f"A - B per run {diffs}, median {statistics.median(diffs)}")
