"""Latency: commit on the master to visible on the slave, at a steady rate of single-row INSERTs.

The master database has two identical tables: `lat_py`, captured by pyreplica's trigger and applied
by a running `pyreplica run`, and `lat_native`, published and applied by a running subscription
(both replicators stay up through all rounds; each round measures one, then the other).

Method. A writer thread inserts row i (autocommit, so the INSERT returns after the commit) at
t0 + i / rate and notes the time the commit returned. A poller thread in the same process asks the
slave `SELECT max(id)` about once a millisecond and takes as the moment a query's snapshot was
taken the middle of its round trip. A row first seen by poll k became visible between the
snapshots of polls k-1 and k: its visible time is estimated as their middle, so the error is at
most half the poll period (about 0.6 ms) and averages out to zero. Both times come from the same
monotonic clock (time.perf_counter). Latency of row i = visible time - commit time; p50 and p99 per
round, the median of the rounds reported.
"""
import contextlib
import sys
import threading
import time

from psycopg2 import sql

from .common import DB, create_subscription, median, percentile, start_daemon, wait_subscription_ready, wait_until

SCHEMA = "CREATE TABLE {} (id bigint PRIMARY KEY, payload text NOT NULL)"
POLL_SLEEP = 0.001


def setup(master_cluster, slave_cluster):
    master = DB(master_cluster, "latency")
    for table in ("lat_py", "lat_native"):
        master.execute(sql.SQL(SCHEMA).format(sql.Identifier(table)))
    master.install_master()
    master.capture("lat_py")
    master.execute("CREATE PUBLICATION latency_pub FOR TABLE lat_native")
    py_slave = DB(slave_cluster, "latency_py")
    py_slave.execute(sql.SQL(SCHEMA).format(sql.Identifier("lat_py")))
    native_slave = DB(slave_cluster, "latency_native")
    native_slave.execute(sql.SQL(SCHEMA).format(sql.Identifier("lat_native")))
    create_subscription(native_slave, master, "latency_sub", "latency_pub", copy_data=False)
    wait_subscription_ready(native_slave, "latency_sub")
    return master, py_slave, native_slave


def writer(master, table, first_id, count, rate, commits, failures):
    insert = sql.SQL("INSERT INTO {} (id, payload) VALUES (%s, %s)").format(sql.Identifier(table))
    try:
        with contextlib.closing(master.connect()) as conn, conn.cursor() as cur:
            t0 = time.perf_counter() + 0.05
            for i in range(count):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                cur.execute(insert, (first_id + i, "latency probe"))
                commits[first_id + i] = time.perf_counter()
    except BaseException as e:     # reported by the poller's thread
        failures.append(e)


def one_run(master, slave, table, first_id, seconds, rate, timeout):
    """Latencies (seconds) of `seconds * rate` rows written at `rate` per second."""
    count = max(1, int(seconds * rate))
    last_id = first_id + count - 1
    commits, visible, failures = {}, {}, []
    query = sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(sql.Identifier(table))
    with contextlib.closing(slave.connect()) as conn, conn.cursor() as cur:
        cur.execute(query)
        seen = cur.fetchone()[0]
        previous_snapshot = time.perf_counter()
        thread = threading.Thread(target=writer, args=(master, table, first_id, count, rate, commits, failures))
        thread.start()
        deadline = time.perf_counter() + seconds + timeout
        while seen < last_id and not failures and time.perf_counter() < deadline:
            before = time.perf_counter()
            cur.execute(query)
            newest = cur.fetchone()[0]
            after = time.perf_counter()
            snapshot = (before + after) / 2
            if newest > seen:
                arrival = (previous_snapshot + snapshot) / 2
                for row_id in range(max(seen + 1, first_id), newest + 1):
                    visible[row_id] = arrival
                seen = newest
            previous_snapshot = snapshot
            time.sleep(POLL_SLEEP)
        thread.join()
    if failures:
        raise failures[0]
    if seen < last_id:
        raise RuntimeError(f"{table}: row {last_id} did not reach the slave within {timeout} s of the last write")
    return [visible[i] - commits[i] for i in range(first_id, last_id + 1)]


def measure(master_cluster, slave_cluster, scale, progress=print):
    master, py_slave, native_slave = setup(master_cluster, slave_cluster)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)     # the writer and the poller never wait long for the GIL
    p50s = {"pyreplica": [], "native": []}
    p99s = {"pyreplica": [], "native": []}
    next_id = 1
    with start_daemon(master, py_slave, "latency") as daemon:
        wait_until(lambda: "Waiting for 'NOTIFY'" in daemon.output, 30, 0.05, "the daemon to be idle")
        try:
            # warm-up, not recorded: the subscription's apply worker and the daemon are running
            for table, slave in (("lat_py", py_slave), ("lat_native", native_slave)):
                next_id += len(one_run(master, slave, table, next_id, 0.2, scale.latency_rate, scale.timeout))
            for r in range(scale.rounds):
                for system, table, slave in (("pyreplica", "lat_py", py_slave), ("native", "lat_native", native_slave)):
                    latencies = one_run(master, slave, table, next_id, scale.latency_seconds, scale.latency_rate,
                                        scale.timeout)
                    next_id += len(latencies)
                    p50s[system].append(percentile(latencies, 50) * 1000)
                    p99s[system].append(percentile(latencies, 99) * 1000)
                    progress(f"latency: {system} p50 {p50s[system][-1]:.1f} ms, p99 {p99s[system][-1]:.1f} ms")
        finally:
            sys.setswitchinterval(old_interval)
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"the daemon died:\n{daemon.output[-2000:]}")
    label = f"latency at {scale.latency_rate} tx/s for {scale.latency_seconds:g} s, commit to visible"
    rows, result = [], {}
    for system in ("pyreplica", "native"):
        p50, p99 = median(p50s[system]), median(p99s[system])
        rows.append((label, system, f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"))
        result[system] = (p50, p99)
    (py50, py99), (nat50, nat99) = result["pyreplica"], result["native"]
    return rows, {"latency_p99_vs_native": py99 / nat99, "latency_p99_ms": py99, "latency_p50_ms": py50,
                  "latency_native_p99_ms": nat99, "latency_native_p50_ms": nat50}
