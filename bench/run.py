"""pyreplica's benchmark (docs/design.md §10): `make bench` (python -m bench.run), `make bench-quick` (--quick).

Starts its own throw-away clusters with fsync, synchronous_commit and full_page_writes on:
  plain    wal_level = replica: master for the write-cost variants none / pyreplica / pgq
  logical  wal_level = logical: master for native replication's write cost, catch-up, latency, memory
  slave    the slaves: pyreplica's slave databases and the native subscribers
and measures, in one run, master write cost (wall clock, the writer backends' CPU per transaction,
tps at 1, 4, 8 and 16 clients), catch-up, latency, the daemon's memory and the log's size
under sustained writes (see each module's
docstring for the method). Each figure is the median of `rounds` runs. Prints a table,
then one line `ratios: key=value ...`.
"""
import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time

from . import bloat, catchup, latency, memory, write_cost
from pyreplica.cluster import bindir

from .common import start_cluster


@dataclasses.dataclass
class Scale:
    rounds: int = 3
    pgbench_seconds: float = 10           # per pgbench run (-T) ...
    pgbench_transactions: int = 0         # ... or transactions per client (-t) when seconds is 0
    update_rows: int = 100_000            # rows the single-row UPDATEs pick from
    bulk_rows: int = 200_000
    cpu_seconds: float = 5                # writer CPU: the measured window inside each pgbench run
    clients_seconds: float = 5            # tps at 1/4/8/16 clients: pgbench -T ...
    clients_transactions: int = 0         # ... or -t when seconds is 0
    catchup_prefill: int = 10_000
    catchup_single: int = 100_000
    catchup_big_rows: int = 10_000        # x 10 transactions
    latency_seconds: float = 20
    latency_rate: int = 200
    memory_rows: int = 1_000_000
    memory_rounds: int = 3
    bloat_seconds: float = 600            # sustained writes with the daemon keeping up ...
    bloat_stopped_seconds: float = 60     # ... then writes while it is stopped
    timeout: float = 600


SCALES = {
    "full": Scale(),
    "quick": Scale(pgbench_seconds=1, update_rows=20_000, bulk_rows=50_000, cpu_seconds=1.5, clients_seconds=1,
                   catchup_single=10_000,
                   catchup_big_rows=1_000, latency_seconds=3, memory_rows=100_000, bloat_seconds=45, bloat_stopped_seconds=15,
                   timeout=120),
    "smoke": Scale(rounds=1, pgbench_seconds=0, pgbench_transactions=20, update_rows=100, bulk_rows=1_000,
                   cpu_seconds=0.3, clients_seconds=0, clients_transactions=10,
                   catchup_prefill=100, catchup_single=200, catchup_big_rows=20, latency_seconds=0.5,
                   latency_rate=50, memory_rows=1_000, memory_rounds=1, bloat_seconds=2, bloat_stopped_seconds=1,
                   timeout=60),
}

HEADINGS = ("measurement", "system", "result")
SECTIONS = ("write", "catchup", "latency", "memory", "bloat")


def machine():
    version = subprocess.run([os.path.join(bindir(), "postgres"), "--version"], capture_output=True,
                             text=True).stdout.strip()
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return f"{os.cpu_count()} CPUs, {mem_kb / 1024 / 1024:.1f} GiB RAM, {version}, Python {platform.python_version()}"


def print_table(sections):
    rows = [row for _, section_rows in sections for row in section_rows]
    widths = [max(len(str(r[i])) for r in rows + [HEADINGS]) for i in range(2)]
    for title, section_rows in sections:
        print(f"\n## {title}")
        print(f"{HEADINGS[0]:<{widths[0]}} | {HEADINGS[1]:<{widths[1]}} | {HEADINGS[2]}")
        print(f"{'-' * widths[0]}-+-{'-' * widths[1]}-+-{'-' * 40}")
        for measurement, system, result in section_rows:
            print(f"{measurement:<{widths[0]}} | {system:<{widths[1]}} | {result}")


# the targets first, then the figures behind them
MAIN_RATIOS = ("tps_insert_8c_vs_no_trigger", "tps_insert_16c_vs_no_trigger", "tps_update_8c_vs_no_trigger",
               "tps_update_16c_vs_no_trigger", "write_cpu_insert_vs_pgq", "write_cpu_update_vs_pgq",
               "write_cpu_insert_added_us", "write_cpu_insert_pgq_added_us", "write_cpu_update_added_us",
               "write_cpu_update_pgq_added_us","write_single_insert_trigger_vs_pgq", "write_single_update_trigger_vs_pgq",
               "write_single_insert_async_trigger_vs_pgq", "write_single_update_async_trigger_vs_pgq",
               "bulk_insert_vs_no_trigger", "bulk_update_vs_no_trigger", "catchup_vs_native", "latency_p99_vs_native",
               "latency_p99_ms", "peak_rss_mb")


def format_ratios(ratios):
    keys = [k for k in MAIN_RATIOS if k in ratios] + [k for k in ratios if k not in MAIN_RATIOS]
    return "ratios: " + " ".join(f"{key}={ratios[key]:.0f}" if abs(ratios[key]) >= 100 else
                                 f"{key}={ratios[key]:.3g}" for key in keys)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="scale", const="quick",
                      help="scaled down, under 3 minutes")
    mode.add_argument("--smoke", action="store_const", dest="scale", const="smoke",
                      help="tiny, seconds: checks the benchmark runs (its figures mean nothing)")
    parser.add_argument("--only", metavar="SECTION[,SECTION]", type=lambda v: v.split(","),
                        help=f"measure only these sections ({', '.join(SECTIONS)}): for working on one figure")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale or "full"]
    unknown = set(args.only or ()) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: no section {', '.join(sorted(unknown))} (there are {', '.join(SECTIONS)})")

    def progress(text):
        print(f"[{time.perf_counter() - started:6.0f} s] {text}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    print(f"pyreplica benchmark ({args.scale or 'full'}): {machine()}")
    print("fsync=on synchronous_commit=on full_page_writes=on; each figure the median of "
          f"{scale.rounds} run(s)", flush=True)
    clusters = []
    try:
        plain = start_cluster("plain")
        clusters.append(plain)
        logical = start_cluster("logical", logical=True)
        clusters.append(logical)
        # The launcher starts an apply worker at most once per wal_retrieve_retry_interval (5 s by
        # default) after any other start: without this, enabling a subscription in the catch-up
        # rounds could wait up to 5 s for its worker, a launcher artefact and not apply speed.
        slave = start_cluster("slave", logical=True, wal_retrieve_retry_interval="'100ms'")
        clusters.append(slave)
        progress("clusters started")
        sections, ratios = [], {}
        measures = (  # (section title, measure) or (None, measure returning its own sections)
            ("write", None, lambda: write_cost.measure(plain, logical, slave, scale, progress)),
            ("catchup", "Catch-up", lambda: catchup.measure(logical, slave, scale, progress)),
            ("latency", "Latency", lambda: latency.measure(logical, slave, scale, progress)),
            ("memory", "Memory", lambda: memory.measure(logical, slave, scale, progress)),
            ("bloat", "Log size", lambda: bloat.measure(plain, slave, scale, progress)))
        assert tuple(m[0] for m in measures) == SECTIONS
        for name, title, measure in measures:
            if args.only and name not in args.only:
                continue
            found_sections, found = measure()
            sections += found_sections if title is None else [(title, found_sections)]
            ratios.update(found)
            progress(f"{(title or 'master write cost').lower()} measured")
    finally:
        for cluster in clusters:
            cluster.destroy()
    print_table(sections)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")
    print(format_ratios(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
