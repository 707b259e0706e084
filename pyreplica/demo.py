"""`pyreplica demo` (docs/design.md §8): the whole job on two throw-away local clusters, in well under a minute.

Starts a master and a slave cluster, installs pyreplica on the master, creates a small shop schema
on both, writes some rows, runs the replicator (in a thread of this process), writes a workload
while it runs, waits for the slave to catch up, shows `status` and `compare`, and removes
everything. Exit 0 only if compare finds the copies identical.
"""
import concurrent.futures
import contextlib
import signal
import sys
import threading
import time

from . import MASTER_INSTALL_SQL, compare, config as configuration, log, status
from .cluster import Cluster
from .db import connect
from .replicator import Replicator

SLAVE = "demo"
DBNAME = "shop"

SCHEMA = """
CREATE SCHEMA shop;
CREATE TYPE shop.order_status AS ENUM ('new', 'paid', 'shipped');
CREATE TABLE shop.customer (
    id     int PRIMARY KEY,
    name   text NOT NULL,
    joined timestamptz NOT NULL DEFAULT now(),
    tags   text[]
);
CREATE TABLE shop.orders (          -- a two-column primary key
    customer_id int REFERENCES shop.customer,
    order_no    int,
    placed      date NOT NULL DEFAULT current_date,
    total       numeric(12, 2),
    status      shop.order_status NOT NULL DEFAULT 'new',
    details     jsonb,
    PRIMARY KEY (customer_id, order_no)
);
CREATE TABLE shop.stock (
    sku      text PRIMARY KEY,
    quantity int NOT NULL,
    weight   float8,
    photo    bytea
);
"""
TABLES = ("shop.customer", "shop.orders", "shop.stock")

INITIAL_ROWS = """
INSERT INTO shop.customer (id, name, tags)
SELECT g, CASE g WHEN 1 THEN 'O''Brien' WHEN 2 THEN 'Zoë 😀' ELSE 'customer ' || g END, ARRAY['demo', 'c' || g]
  FROM generate_series(1, 50) g;
INSERT INTO shop.orders (customer_id, order_no, total, details)
SELECT c, o, round((c * 7 + o * 3.1)::numeric, 2), jsonb_build_object('items', o, 'gift', c % 5 = 0)
  FROM generate_series(1, 50) c, generate_series(1, 3) o;
INSERT INTO shop.stock SELECT 'sku-' || lpad(g::text, 2, '0'), g * 10, g / 3.0, decode(md5(g::text), 'hex')
  FROM generate_series(1, 20) g;
"""

# While the daemon runs: updates, deletes, a primary-key change, and a transaction that rolls back.
WORKLOAD = [
    ("paying and shipping orders", "UPDATE shop.orders SET status = 'paid' WHERE order_no = 1; "
                                   "UPDATE shop.orders SET status = 'shipped', placed = placed - 1 WHERE customer_id <= 10"),
    ("selling stock", "UPDATE shop.stock SET quantity = quantity - 1, weight = 'NaN' WHERE sku < 'sku-05'"),
    ("renaming a product (its primary key)", "UPDATE shop.stock SET sku = 'sku-01-v2' WHERE sku = 'sku-01'"),
    ("removing customers 46-50 and their orders", "DELETE FROM shop.orders WHERE customer_id > 45; "
                                                  "DELETE FROM shop.customer WHERE id > 45"),
    ("new customers with orders", "INSERT INTO shop.customer (id, name) VALUES (100, 'new \\ backslash'), (101, 'Ünïcode ✓'); "
                                  "INSERT INTO shop.orders (customer_id, order_no, total) VALUES (100, 1, 9.99), (101, 1, 1e-2)"),
]


def say(text):
    print(text, flush=True)


def start_clusters(clusters):
    """Both clusters at once (initdb is the slow part)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(cluster.start) for cluster in clusters]:
            future.result()


def prepare(master, slave):
    for cluster in (master, slave):
        cluster.createdb(DBNAME)
    master.psql(DBNAME, "-f", MASTER_INSTALL_SQL)
    for cluster in (master, slave):
        cluster.execute(SCHEMA, dbname=DBNAME)
    for table in TABLES:
        (line,), = master.execute("SELECT py_log_create_tg(%s)", (table,), dbname=DBNAME)
        say(f"  py_log_create_tg('{table}'): {line}")


def start_replicator(config):
    replicator = Replicator(config, SLAVE)
    thread = threading.Thread(target=replicator.run, name="pyreplica-demo", daemon=True)
    thread.start()
    return replicator, thread


def stop_replicator(master, replicator, thread):
    replicator.request_stop()
    master.execute("NOTIFY replicas", dbname=DBNAME)     # wake it from its wait at once
    thread.join(30)


def write_workload(master):
    for what, statements in WORKLOAD:
        say(f"  {what}")
        master.execute(statements, dbname=DBNAME)
    with contextlib.closing(master.connect(DBNAME, autocommit=False)) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO shop.customer (id, name) VALUES (999, 'never committed')")
        conn.rollback()
    say("  and a transaction that rolls back (never replicated)")


def wait_caught_up(config, timeout=30):
    started = time.monotonic()
    with contextlib.closing(connect(config.DSN0, "master")) as conn:
        conn.autocommit = True
        while time.monotonic() - started < timeout:
            mine = [s for s in status.slaves(conn) if s["name"] == SLAVE]
            if mine and mine[0]["events_behind"] == 0:
                return time.monotonic() - started
            time.sleep(0.1)
    raise TimeoutError(f"the slave did not catch up within {timeout} s")


def run(master, slave):
    config = configuration.from_args(master.dsn(DBNAME), slave.dsn(DBNAME), name=SLAVE, keepalive=5)
    say("Installing pyreplica on the master (master-install.sql) and creating a small shop schema on both:")
    prepare(master, slave)
    master.execute(INITIAL_ROWS, dbname=DBNAME)
    say("Wrote 50 customers, 150 orders and 20 products on the master before any daemon runs.")
    say("Starting the replicator (`pyreplica run`); its log lines look like this:")
    log.setup(SLAVE, 1, stream=sys.stdout)     # in order with what we print
    replicator, thread = start_replicator(config)
    try:
        say(f"It replayed that backlog in {wait_caught_up(config):.1f} s. Now writing on the master while it runs:")
        write_workload(master)
        say(f"The slave caught up in {wait_caught_up(config):.1f} s.\n")
        say("$ pyreplica status")
        status.status(config)
        say("\n$ pyreplica compare")
        code = compare.compare(config, SLAVE)
    finally:
        say("\nStopping the replicator and removing the clusters.")
        stop_replicator(master, replicator, thread)
    return code


def interrupt_on_sigterm():
    """SIGTERM, like Ctrl-C, still runs the clean-up below: no server is left running."""
    def interrupt(*_):
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def demo():
    started = time.monotonic()
    interrupt_on_sigterm()
    say("pyreplica demo: master -> slave replication between two throw-away PostgreSQL clusters.")
    master, slave = clusters = [Cluster("demo-master"), Cluster("demo-slave")]
    try:
        start_clusters(clusters)
        say(f"Started the master on port {master.port} and the slave on port {slave.port} "
            f"({time.monotonic() - started:.1f} s).")
        code = run(master, slave)
    finally:
        for cluster in clusters:
            cluster.destroy()
    if code == 0:
        say(f"Demo OK in {time.monotonic() - started:.0f} s: master and slave are identical.")
    else:
        print("Demo FAILED: master and slave differ (see compare above).", file=sys.stderr)
    return code
