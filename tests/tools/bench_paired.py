#!/usr/bin/env python3
"""Paired per-run differences between two rows of one `xdplb-bench xdp` run, from the
JSON it writes (README, "The established-flow budget, session 23"): row A's sample minus
row B's sample of the same run (the runs are interleaved, so a run slowed as a whole
cancels), then their median. The main table's columns: `raw` (through the wrapper, the
default) or `direct`; rows of the other tables (per-feature, scale: their `ns (net)`
samples, each run's raw less its wrapper's XDP_PASS floor of the same run) are found
there, with `ns (net)` as the default column.

Usage: tests/tools/bench_paired.py JSON ROW_A ROW_B [COLUMN]
  e.g. tests/tools/bench_paired.py target/bench/xdp.json \\
         "xdp_lb [nv]: non-VIP packet" "xdp_lb [est]: non-VIP packet" direct
       tests/tools/bench_paired.py target/bench/xdp.json \\
         "feature: established, deny 1000 + allow 1000 prefixes" \\
         "feature [main]: established, deny 1000 + allow 1000 prefixes"
"""
import json, statistics, sys

if len(sys.argv) not in (4, 5):
    raise SystemExit(__doc__)
path, row_a, row_b = sys.argv[1:4]
with open(path) as f:
    report = json.load(f)
rows = {}
# The main table first; a row only in a later table (per-feature, scale) from the first
# of those that has it with samples, its default column `ns (net)`.
for i, table in enumerate(report["tables"]):
    for row in table["rows"]:
        cells = {cell["column"]: cell for cell in row[1:]}
        label = row[0]["shown"]
        if label not in rows and (i == 0 or any(c.get("samples") for c in cells.values())):
            rows[label] = cells | {"_table": i}
in_main = all(rows.get(r, {}).get("_table") == 0 for r in (row_a, row_b))
column = sys.argv[4] if len(sys.argv) == 5 else ("raw" if in_main else "ns (net)")
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
