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
    "bulk_insert_vs_no_trigger", "catchup_vs_native", "latency_p99_vs_native", "latency_p99_ms",
    "latency_p50_ms", "peak_rss_mb",
)


def test_bench_smoke():
    result = subprocess.run([sys.executable, "-m", "bench.run", "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for heading in ("## Master write cost", "## Catch-up", "## Latency", "## Memory",
                    "measurement", "system", "result"):
        assert heading in out, f"{heading!r} missing from:\n{out}"
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
