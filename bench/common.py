"""What every measurement shares: durable throw-away clusters, databases, pgbench, the daemon, medians."""
import contextlib
import glob
import itertools
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psycopg2
from psycopg2 import sql

import pyreplica
from pyreplica.cluster import Cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.replication import Daemon, wait_until  # noqa: E402  (the test suite's daemon runner, peak RSS)

# The test harness trades durability for speed; the issue measures "fsync on".
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
LOGICAL = {"wal_level": "logical", "max_wal_senders": "20", "max_replication_slots": "20",
           "max_logical_replication_workers": "10", "max_worker_processes": "16"}


def start_cluster(name, logical=False, **settings):
    """A throw-away cluster with fsync, synchronous_commit and full_page_writes on."""
    cluster = Cluster(f"bench-{name}", settings={**DURABLE, **(LOGICAL if logical else {}), **settings})
    cluster.start()
    return cluster


class DB:
    """One database of a cluster (the shape tests.replication.Daemon expects: .dsn)."""

    def __init__(self, cluster, name, create=True):
        self.cluster, self.name = cluster, name
        if create:
            cluster.createdb(name)

    @property
    def dsn(self):
        return self.cluster.dsn(self.name)

    def connect(self, autocommit=True):
        return self.cluster.connect(self.name, autocommit=autocommit)

    def execute(self, query, params=None):
        return self.cluster.execute(query, params, dbname=self.name)

    def scalar(self, query, params=None):
        return self.execute(query, params)[0][0]

    def install_master(self):
        self.cluster.psql(self.name, "-f", pyreplica.MASTER_INSTALL_SQL)

    def capture(self, table):
        line = self.scalar("SELECT pyreplica.py_log_create_tg(%s)", (table,))
        if not line.startswith("created trigger"):
            raise RuntimeError(f"py_log_create_tg({table}): {line}")

    def checkpoint(self):
        self.execute("CHECKPOINT")

    def content(self, table):
        """(row count, md5 of every row in key order): what "identical" means here."""
        return self.execute(sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t.id), '')) "
                                    "FROM {} t").format(sql.Identifier(table)))[0]


def pgq_available(cluster):
    return bool(cluster.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pgq'"))


def pgbench_command(db, script, clients, seconds=None, transactions=None, define=None, jobs=None, extra=()):
    """The pgbench command line for a custom script (written next to the cluster's data)."""
    path = os.path.join(db.cluster.dir, f"bench-{abs(hash(script))}.sql")
    with open(path, "w") as f:
        f.write(script)
    jobs = jobs or clients
    cmd = [os.path.join(db.cluster.bin, "pgbench"), "-n", "-c", str(clients), "-j", str(jobs),
           "-h", "127.0.0.1", "-p", str(db.cluster.port), "-U", "postgres", "-f", path, *extra]
    cmd += ["-T", str(seconds)] if seconds else ["-t", str(transactions)]
    for key, value in (define or {}).items():
        cmd += ["-D", f"{key}={value}"]
    return cmd + [db.name]


def pgbench_env(options=None, appname=None):
    env = dict(os.environ)
    if options:
        env["PGOPTIONS"] = options
    if appname:
        env["PGAPPNAME"] = appname      # how pgbench's backends are found in pg_stat_activity
    return env


def pgbench(db, script, clients=2, seconds=None, transactions=None, options=None, define=None, jobs=None):
    """Run pgbench with a custom script; returns (tps, latency average in µs)."""
    cmd = pgbench_command(db, script, clients, seconds, transactions, define, jobs)
    out = subprocess.run(cmd, capture_output=True, text=True, env=pgbench_env(options))
    if out.returncode != 0 or "tps =" not in out.stdout:
        raise RuntimeError(f"pgbench failed: {out.stderr}\n{out.stdout}")
    tps = float(re.search(r"tps = ([\d.]+)", out.stdout).group(1))
    return tps, clients / tps * 1e6


def _schedstat_works():
    try:
        with open("/proc/self/schedstat") as f:
            return int(f.read().split()[0]) > 0
    except (OSError, ValueError, IndexError):
        return False


# /proc/PID/schedstat's first field is the kernel's exact on-CPU time in ns; /proc/PID/stat's
# utime + stime (clock ticks) is the fallback when the kernel does not keep schedstat.
SCHEDSTAT = _schedstat_works()


def process_cpu_ns(pid):
    """On-CPU time (user + system) a process has used so far, from the kernel's accounting."""
    try:
        if SCHEDSTAT:
            with open(f"/proc/{pid}/schedstat") as f:
                return int(f.read().split()[0])
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1e9 / os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        raise RuntimeError(f"process {pid} ended before its CPU time was read: the pgbench run ended "
                           "early (raise the pgbench duration)") from None


def cpu_snapshot(pids):
    """(wall time, total CPU ns of pids), the wall time taken in the middle of the reads."""
    before = time.time()
    total = sum(process_cpu_ns(pid) for pid in pids)
    return (before + time.time()) / 2, total


_runs = itertools.count()


def pgbench_cpu(db, script, clients, window, define=None, others_sql=None):
    """Server CPU per transaction of pgbench's backends, in µs: (backends, others or None).

    pgbench runs with its own application_name and a per-transaction log (-l); once its backends
    show in pg_stat_activity and have run a warm-up (connection start-up and first-call costs such
    as loading PL/Python stay out), their CPU is read, again `window` seconds later while pgbench is
    still running, and the difference divided by the transactions the log shows completed between
    the two reads. `others_sql` returns further pids (e.g. a walsender) whose CPU over the same
    window is reported per transaction as well.
    """
    tag = f"pyreplica-bench-{os.getpid()}-{next(_runs)}"
    warmup = max(0.1, window / 4)
    logdir = tempfile.mkdtemp(prefix="bench-pgbench-log-")
    cmd = pgbench_command(db, script, clients, seconds=math.ceil(warmup + window + 0.5), define=define,
                          extra=("-l", "--log-prefix", os.path.join(logdir, "tx")))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=pgbench_env(appname=tag))
    try:
        with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
            pids = backends(cur, tag, clients, proc)
            cur.execute(others_sql or "SELECT NULL WHERE false")
            others = [row[0] for row in cur.fetchall()]
            time.sleep(warmup)
            t1, cpu1 = cpu_snapshot(pids)
            o1 = cpu_snapshot(others)[1]
            time.sleep(window)
            t2, cpu2 = cpu_snapshot(pids)
            o2 = cpu_snapshot(others)[1]
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench failed: {err}\n{out}")
        transactions = completed_between(logdir, t1, t2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(logdir, ignore_errors=True)
    if not transactions:
        raise RuntimeError(f"pgbench completed no transaction in a {window} s window")
    return (cpu2 - cpu1) / transactions / 1e3, ((o2 - o1) / transactions / 1e3 if others else None)


def backends(cur, tag, clients, proc, timeout=30):
    """The pids of pgbench's `clients` backends, once all are connected."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline and proc.poll() is None:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (tag,))
        pids = [row[0] for row in cur.fetchall()]
        if len(pids) == clients:
            return pids
        time.sleep(0.01)
    raise RuntimeError(f"pgbench's {clients} connections did not show in pg_stat_activity: "
                       f"{proc.communicate()[1] if proc.poll() is not None else 'timed out'}")


def log_times(logdir):
    """Completion times (epoch seconds) of every transaction in pgbench's -l logs."""
    times = []
    for path in glob.glob(os.path.join(logdir, "tx.*")):
        with open(path) as f:
            for line in f:
                # client_id transaction_no time script_no time_epoch time_us
                fields = line.split()
                times.append(int(fields[4]) + int(fields[5]) / 1e6)
    return times


def completed_between(logdir, t1, t2):
    """Transactions pgbench's -l logs show completed in (t1, t2] (epoch seconds)."""
    return sum(1 for t in log_times(logdir) if t1 < t <= t2)


def pgbench_tps(db, script, clients, seconds=None, transactions=None, warmup=0.5, define=None, jobs=None):
    """tps of a pgbench run, counted from its per-transaction log after a warm-up.

    Transactions completed in the first `warmup` seconds (after the first one) are left out, so the
    backends' start-up (connection, catalog caches, a PL/Python interpreter per backend: one-off
    costs a pooled connection pays once) does not weigh on a short run; pgbench runs -T
    ceil(warmup + seconds). With `transactions` (-t, tiny runs) nothing is left out."""
    logdir = tempfile.mkdtemp(prefix="bench-pgbench-log-")
    try:
        cmd = pgbench_command(db, script, clients, math.ceil(warmup + seconds) if seconds else None,
                              transactions, define, jobs, extra=("-l", "--log-prefix", os.path.join(logdir, "tx")))
        out = subprocess.run(cmd, capture_output=True, text=True, env=pgbench_env())
        if out.returncode != 0:
            raise RuntimeError(f"pgbench failed: {out.stderr}\n{out.stdout}")
        times = sorted(log_times(logdir))
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    start = times[0] + (warmup if seconds else 0)
    counted = [t for t in times if t > start]
    if len(counted) < 2:
        raise RuntimeError(f"pgbench completed {len(times)} transaction(s): too few to measure a rate")
    return len(counted) / (counted[-1] - start)


def timed(db, statement, params=None, options=None, before=None):
    """Wall seconds of one statement, commit included, on a fresh connection (where `before`, when
    given, runs first, untimed)."""
    extra = {"options": options} if options else {}
    with contextlib.closing(psycopg2.connect(db.cluster.dsn(db.name, **extra))) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            if before:
                cur.execute(before)
            start = time.perf_counter()
            cur.execute(statement, params)
            return time.perf_counter() - start


def median(values):
    return statistics.median(values) if values else float("nan")


def percentile(values, p):
    """The p-th percentile (nearest rank) of a list."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def start_daemon(master, slave, name):
    """`pyreplica run MASTER SLAVE --name NAME` (tests.replication.Daemon): started by `with`."""
    return Daemon(master, slave, name=name, keepalive=5)


def applied(slave, name):
    """Events the slave has committed (its pyreplica.position), 0 before the first batch."""
    if not slave.execute("SELECT to_regclass('pyreplica.position') IS NOT NULL")[0][0]:
        return 0
    rows = slave.execute("SELECT applied FROM pyreplica.position WHERE slave = %s", (name,))
    return rows[0][0] if rows else 0


def wait_subscription_ready(sub_db, subname, timeout=120):
    """Every table of a subscription synchronised (initial copy done, state 'r')."""
    wait_until(lambda: sub_db.scalar(
        "SELECT count(*) = 0 FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid "
        "WHERE s.subname = %s AND r.srsubstate <> 'r'", (subname,)), timeout, 0.1,
        f"subscription {subname} to be ready")


def create_subscription(sub_db, pub_db, subname, publication, **options):
    """CREATE SUBSCRIPTION subname CONNECTION <pub_db> PUBLICATION publication WITH (options)."""
    with_list = sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.SQL(key), sql.Literal(value))
                                   for key, value in options.items())
    query = sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {}").format(
        sql.Identifier(subname), sql.Literal(pub_db.dsn), sql.Identifier(publication))
    if options:
        query += sql.SQL(" WITH ({})").format(with_list)
    sub_db.execute(query)
