"""What every measurement shares: durable throw-away clusters, databases, pgbench, the daemon, medians."""
import contextlib
import os
import re
import statistics
import subprocess
import sys
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
        line = self.scalar("SELECT py_log_create_tg(%s)", (table,))
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


def pgbench(db, script, clients=2, seconds=None, transactions=None, options=None, define=None):
    """Run pgbench with a custom script; returns (tps, latency average in µs)."""
    path = os.path.join(db.cluster.dir, f"bench-{abs(hash(script))}.sql")
    with open(path, "w") as f:
        f.write(script)
    cmd = [os.path.join(db.cluster.bin, "pgbench"), "-n", "-c", str(clients), "-j", str(clients),
           "-h", "127.0.0.1", "-p", str(db.cluster.port), "-U", "postgres", "-f", path]
    cmd += ["-T", str(seconds)] if seconds else ["-t", str(transactions)]
    for key, value in (define or {}).items():
        cmd += ["-D", f"{key}={value}"]
    env = dict(os.environ)
    if options:
        env["PGOPTIONS"] = options
    out = subprocess.run(cmd + [db.name], capture_output=True, text=True, env=env)
    if out.returncode != 0 or "tps =" not in out.stdout:
        raise RuntimeError(f"pgbench failed: {out.stderr}\n{out.stdout}")
    tps = float(re.search(r"tps = ([\d.]+)", out.stdout).group(1))
    return tps, clients / tps * 1e6


def timed(db, statement, params=None, options=None):
    """Wall seconds of one statement, commit included, on a fresh connection."""
    extra = {"options": options} if options else {}
    with contextlib.closing(psycopg2.connect(db.cluster.dsn(db.name, **extra))) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
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
