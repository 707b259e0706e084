"""The benchmark runs end to end (`python -m bench.run --smoke`: real clusters, tiny sizes).

Only the shape of its output is checked: speed is never asserted (docs/design.md §10).
"""
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RATIO_KEYS = (
    "write_single_insert_trigger_vs_pgq", "write_single_update_trigger_vs_pgq",
    "write_single_insert_async_trigger_vs_pgq", "write_single_update_async_trigger_vs_pgq",
    "bulk_insert_vs_no_trigger", "bulk_update_vs_no_trigger", "catchup_vs_native", "latency_p99_vs_native",
    "latency_p99_ms", "latency_p50_ms", "peak_rss_mb",
    # the writer backends' CPU per transaction (server-side accounting) and tps by clients
    "write_cpu_insert_us", "write_cpu_insert_no_trigger_us", "write_cpu_insert_added_us",
    "write_cpu_insert_pgq_added_us", "write_cpu_insert_native_added_us", "write_cpu_insert_vs_pgq",
    "write_cpu_insert_native_walsender_us",
    "write_cpu_update_us", "write_cpu_update_no_trigger_us", "write_cpu_update_added_us",
    "write_cpu_update_pgq_added_us", "write_cpu_update_native_added_us", "write_cpu_update_vs_pgq",
    "write_cpu_update_native_walsender_us",
) + tuple(f"tps_{workload}_{clients}c_{who}vs_no_trigger" for workload in ("insert", "update")
          for clients in (1, 4, 8, 16) for who in ("", "pgq_", "native_"))

SECTIONS = ("## Master write cost", "## Writer CPU per transaction", "## Throughput by clients", "## Catch-up",
            "## Latency", "## Memory")


def test_bench_smoke():
    result = subprocess.run([sys.executable, "-m", "bench.run", "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for heading in SECTIONS + ("measurement", "system", "result"):
        assert heading in out, f"{heading!r} missing from:\n{out}"
    # the sections come in this order, each a table of rows of every system
    assert [out.index(heading) for heading in SECTIONS] == sorted(out.index(heading) for heading in SECTIONS)
    words = " ".join(out.split())   # the table's columns are padded
    for workload in ("INSERT", "UPDATE"):
        for system in ("none", "pyreplica", "pgq", "native"):
            assert f"single-row {workload}, writer backend CPU | {system} |" in words, (workload, system)
            for clients in ("1 client", "4 clients", "8 clients", "16 clients"):
                assert f"single-row {workload}, {clients} | {system} |" in words, (workload, clients, system)
    for system in ("none", "pyreplica", "pgq", "native"):
        assert f"| {system} " in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("ratios: "), last
    ratios = dict(item.split("=", 1) for item in last[len("ratios: "):].split())
    for key in RATIO_KEYS:
        assert key in ratios, f"{key} missing from {last}"
    for key, value in ratios.items():
        number = float(value)       # numeric; nan only for a PgQ comparison when PgQ is not installed
        if "pgq" not in key:
            assert not math.isnan(number), f"{key}={value}"
    for key in ("write_cpu_insert_us", "write_cpu_insert_no_trigger_us", "write_cpu_update_us",
                "write_cpu_update_no_trigger_us"):
        assert float(ratios[key]) > 0, f"{key}={ratios[key]}: no CPU time read from the backends"
