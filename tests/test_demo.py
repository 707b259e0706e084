"""`pyreplica demo` (docs/design.md §8): two throw-away clusters, a workload, status and compare, all cleaned up."""
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from replication import ROOT, run_cli


def ports(output):
    match = re.search(r"master on port (\d+) and the slave on port (\d+)", output)
    assert match, output
    return int(match[1]), int(match[2])


def listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_replicates_shows_status_and_compare_and_cleans_up():
    started = time.monotonic()
    code, out, err = run_cli("demo", timeout=120)
    assert code == 0, out + err
    assert time.monotonic() - started < 60
    assert "created trigger on shop.orders (customer_id,order_no)" in out
    assert "Opening origin (master) connection" in out          # the daemon's log, the guide's format
    assert re.search(r"^demo\s+\d+\s+\d+\s+0\s+0\.0\s", out, re.M), out   # status: nothing behind
    assert "In-doubt prepared transactions: none" in out
    assert re.search(r"^shop\.orders\s+137\s+137\s", out, re.M), out       # compare: rows on both sides
    assert "All 3 table(s) identical" in out and "Demo OK" in out
    assert not any(listening(port) for port in ports(out)), "a demo server is still running"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_leaves_no_server_behind(sig):
    # as from a terminal: a job started in the background by a shell without job control ignores
    # SIGINT, and so would the demo it runs
    proc = subprocess.Popen([sys.executable, "-m", "pyreplica.cli", "demo"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    output = ""
    for line in proc.stdout:
        output += line
        if line.startswith("Starting the replicator"):
            break
    proc.send_signal(sig)
    output += proc.communicate(timeout=60)[0]
    assert proc.returncode != 0, output
    assert "Demo OK" not in output
    assert not any(listening(port) for port in ports(output)), "a demo server is still running"
