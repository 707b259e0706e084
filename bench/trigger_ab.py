"""A/B of the capture trigger's writer CPU: master-install.sql variants side by side in one cluster.

    .venv/bin/python -m bench.trigger_ab ROUNDS NAME=master-install.sql [NAME=other.sql ...]

Each variant gets its own database (the write-cost bench's `wt` table, prefilled, captured); a
database without pyreplica is the baseline. Every round runs the single-row INSERT and UPDATE of
bench/write_cost.py on every database, in rotated order, and reads the CPU of pgbench's backends
from /proc (common.pgbench_cpu, pgbench -c2 for 3 s). Prints each variant's added µs/tx over the
baseline, the median over rounds, and the spread of its rounds: on a shared machine single rounds
move by tens of µs, so compare variants of one run only.
"""
import statistics
import sys

from .common import DB, pgbench_cpu, start_cluster
from .write_cost import INSERT_SCRIPT, PREFILL, SCHEMA, UPDATE_SCRIPT

PREFILL_ROWS = 20_000
SECONDS = 3.0
WORKLOADS = (("INSERT", INSERT_SCRIPT), ("UPDATE", UPDATE_SCRIPT))


def main(argv):
    rounds, variants = int(argv[0]), dict(arg.split("=", 1) for arg in argv[1:])
    cluster = start_cluster("trigger-ab", wal_level="replica")
    try:
        dbs = {}
        for number, name in enumerate(["none", *variants]):
            db = dbs[name] = DB(cluster, f"ab_{number}")
            db.execute(SCHEMA)
            db.execute(PREFILL, (PREFILL_ROWS,))
            if name != "none":
                cluster.psql(db.name, "-f", variants[name])
                db.capture("wt")
        cpu = {}
        order = list(dbs.items())
        for round_no in range(rounds):
            shift = round_no % len(order)
            for key, script in WORKLOADS:
                for name, db in order[shift:] + order[:shift]:
                    db.checkpoint()
                    cpu.setdefault((key, name), []).append(
                        pgbench_cpu(db, script, 2, SECONDS, define={"rows": PREFILL_ROWS})[0])
        for key, _ in WORKLOADS:
            none = statistics.median(cpu[key, "none"])
            added = [f"{name} +{statistics.median(cpu[key, name]) - none:.1f} "
                     f"(spread {max(cpu[key, name]) - min(cpu[key, name]):.1f})" for name in variants]
            print(f"{key}: no trigger {none:.1f} µs/tx; added: {', '.join(added)}")
    finally:
        cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
