"""Catch-up: seconds from start to an identical slave, for a backlog written while nobody applied.

One master database (wal_level = logical) holds the table `cu`, captured by pyreplica's trigger and
published for native logical replication. Before the backlog is written, every round gets
  - a pyreplica slave name registered on the master (so no daemon's pruning removes events another
    round still needs), and an empty slave database;
  - a logical replication slot and a disabled subscription (create_slot = false, copy_data = false)
    in its own slave database, so the slot holds the whole backlog.
The backlog: N single-row transactions (pgbench -c2, half INSERTs of new rows, half UPDATEs of
prefilled rows; synchronous_commit = off only to write it faster) then 10 transactions of M rows
each (INSERT ... SELECT), then one row in the table `marker`, replicated by both.

Each round then times, on the same data: `pyreplica run` started as a new process until the
slave's marker row is there, and ALTER SUBSCRIPTION ... ENABLE until its marker row is there.
Both apply in master commit order and commit atomically, so the marker's arrival means everything
before it has arrived; the slaves are then compared with the master (count + md5 of every row).
The slave is polled every 20 ms (the resolution of the figures) over one connection opened before the
clock starts: a new connection per poll would fork a backend 50 times a second, CPU both systems
then compete for on a small machine.
"""
import contextlib
import time

from psycopg2 import sql

from .common import DB, applied, create_subscription, median, pgbench, start_daemon, wait_until

SCHEMA = """
CREATE TABLE cu (id bigserial PRIMARY KEY, k int NOT NULL, v text NOT NULL);
CREATE TABLE marker (id int PRIMARY KEY);
"""
PREFILL = "INSERT INTO cu (k, v) SELECT g, 'prefilled row ' || g FROM generate_series(1, %s) g"
MIXED_SCRIPT = """\\set r random(1, 2)
\\set id random(1, :rows)
\\if :r = 1
INSERT INTO cu (k, v) VALUES (:id, 'backlog single-row insert');
\\else
UPDATE cu SET k = k + 1, v = 'backlog single-row update' WHERE id = :id;
\\endif
"""
BIG = ("INSERT INTO cu (k, v) SELECT g, 'backlog big transaction row ' || g || ' of ' || %s "
       "FROM generate_series(1, %s) g")
POLL = 0.02


def has_marker(conn):
    """The marker row is on this slave (conn: autocommit, so every look is a fresh snapshot)."""
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM marker WHERE id = 1")
        return cur.fetchone() is not None


def measure(master_cluster, slave_cluster, scale, progress=print):
    master = DB(master_cluster, "catchup")
    master.execute(SCHEMA)
    master.execute(PREFILL, (scale.catchup_prefill,))
    master.install_master()
    master.capture("cu")
    master.capture("marker")
    master.execute("CREATE PUBLICATION catchup_pub FOR TABLE cu, marker")

    rounds = []
    for r in range(scale.rounds):
        name = f"catchup{r}"
        py_slave = DB(slave_cluster, f"catchup_py{r}")
        native_slave = DB(slave_cluster, f"catchup_native{r}")
        for slave in (py_slave, native_slave):
            slave.execute(SCHEMA)
            slave.execute(PREFILL, (scale.catchup_prefill,))
        master.execute("SELECT pyreplica.register_slave(%s)", (name,))
        master.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"catchup_slot{r}",))
        create_subscription(native_slave, master, f"catchup_sub{r}", "catchup_pub", enabled=False,
                            create_slot=False, slot_name=f"catchup_slot{r}", copy_data=False)
        rounds.append((name, py_slave, native_slave, f"catchup_sub{r}"))

    # the backlog
    started = time.perf_counter()
    pgbench(master, MIXED_SCRIPT, transactions=scale.catchup_single // 2, options="-c synchronous_commit=off",
            define={"rows": scale.catchup_prefill})
    for i in range(10):
        master.execute(BIG, (i, scale.catchup_big_rows))
    master.execute("INSERT INTO marker VALUES (1)")
    events = master.scalar("SELECT count(*) FROM pyreplica.replica_log")
    progress(f"catch-up: backlog of {events:,} events written in {time.perf_counter() - started:.0f} s")
    expected = master.content("cu")
    master.checkpoint()

    py_times, native_times = [], []
    for name, py_slave, native_slave, subname in rounds:
        py_slave.checkpoint()
        with contextlib.closing(py_slave.connect()) as poll:
            daemon_start = time.perf_counter()
            with start_daemon(master, py_slave, name) as daemon:
                wait_until(lambda: has_marker(poll), scale.timeout, POLL, "pyreplica to catch up")
                py_times.append(time.perf_counter() - daemon_start)
                if daemon.proc.poll() is not None:
                    raise RuntimeError(f"the daemon died:\n{daemon.output[-2000:]}")
        if py_slave.content("cu") != expected or applied(py_slave, name) != events:
            raise RuntimeError(f"pyreplica's slave differs from the master after catch-up: "
                               f"{py_slave.content('cu')} vs {expected}")

        native_slave.checkpoint()
        with contextlib.closing(native_slave.connect()) as poll:
            enable_start = time.perf_counter()
            with poll.cursor() as cur:
                cur.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(subname)))
            wait_until(lambda: has_marker(poll), scale.timeout, POLL, "native subscription to catch up")
            native_times.append(time.perf_counter() - enable_start)
        native_slave.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sql.Identifier(subname)))
        if native_slave.content("cu") != expected:
            raise RuntimeError(f"native subscriber differs from the master: {native_slave.content('cu')} vs {expected}")
        progress(f"catch-up: pyreplica {py_times[-1]:.2f} s, native {native_times[-1]:.2f} s")

    py, native = median(py_times), median(native_times)
    label = (f"catch-up of {scale.catchup_single:,} single-row tx + 10 x {scale.catchup_big_rows:,}-row tx "
             f"({events:,} events)")
    rows = [(label, "pyreplica", f"{py:.2f} s to identical ({events / py:,.0f} changes/s)"),
            (label, "native", f"{native:.2f} s to identical ({events / native:,.0f} changes/s)")]
    return rows, {"catchup_vs_native": native / py, "catchup_s": py, "catchup_native_s": native}
