"""Waking the daemon (docs/design.md §3 "Wake-up"): writers NOTIFY only while a daemon sleeps (it
holds the wake-up lock), and no commit is ever left waiting for the keepalive.

Every daemon here runs with a keepalive of 300 s, so an event that arrives within seconds was
woken for, not picked up by the keepalive's look."""
import random
import threading
import time

from pyreplica.wakeup import LOCK_KEYS
from replication import Daemon, contents, create_on_both, run_cli, wait_identical, wait_until

KEEPALIVE = 300
BOUND = 10.0            # seconds an event may take to reach the slave: far below KEEPALIVE
DDL = "CREATE TABLE t (id int PRIMARY KEY, v text)"
LOCK_HELD = """
SELECT count(*) FROM pg_locks
 WHERE locktype = 'advisory' AND classid = %s AND objid = %s AND objsubid = 2 AND mode = %s AND granted
   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def asleep(master):
    """Does a daemon sleep on this master (hold the wake-up lock)?"""
    return master.scalar(LOCK_HELD, (*LOCK_KEYS, "ExclusiveLock")) == 1


def count(db):
    return db.scalar("SELECT count(*) FROM t")


def wait_rows(slave, rows, what, daemon=None):
    try:
        wait_until(lambda: count(slave) == rows, BOUND, interval=0.005, message=f"{rows} rows on the slave ({what})")
    except AssertionError as e:
        raise AssertionError(f"{e}; the daemon's output ends:\n{daemon.output[-1500:] if daemon else ''}") from None


def write_soon(conn, ids):
    time.sleep(random.uniform(0, 0.004))
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t SELECT i, 'round' FROM unnest(%s::int[]) i", (ids,))


def test_commits_racing_the_daemon_going_to_sleep_are_never_lost(master, slave):
    """200 rounds: right after the daemon's batch commits (it is going to sleep), 3 writers commit
    after random small delays; every row must reach the slave without the keepalive."""
    create_on_both(master, slave, DDL, ["t"])
    conns = [master.connect() for _ in range(3)]
    next_id = [0]
    with Daemon(master, slave, name="s1", keepalive=KEEPALIVE) as daemon:
        for round_no in range(200):
            writers = []
            for conn in conns:
                ids = list(range(next_id[0] + 1, next_id[0] + 1 + random.randint(1, 3)))
                next_id[0] = ids[-1]
                writers.append(threading.Thread(target=write_soon, args=(conn, ids)))
            for w in writers:
                w.start()
            for w in writers:
                w.join()
            wait_rows(slave, next_id[0], f"round {round_no}", daemon)
        assert daemon.stop() == 0
    for conn in conns:
        conn.close()
    assert contents(master, "t") == contents(slave, "t")
    assert "Timeout('keepalive')" not in daemon.output


def listen(master):
    conn = master.connect()
    conn.cursor().execute("LISTEN replicas")
    return conn


def received(conn):
    conn.poll()
    n = len(conn.notifies)
    conn.notifies.clear()
    return n


def test_writers_notify_only_while_the_daemon_sleeps(master, slave):
    create_on_both(master, slave, DDL, ["t"])
    observer = listen(master)
    with Daemon(master, slave, name="s1", keepalive=KEEPALIVE) as daemon:
        # asleep: each writing transaction wakes it, with exactly one NOTIFY
        for i in range(1, 6):
            wait_until(lambda: asleep(master), BOUND, interval=0.005, message="the daemon asleep")
            received(observer)
            master.execute("INSERT INTO t VALUES (%s, 'x'); INSERT INTO t VALUES (%s, 'y')", (i, 1000 + i))
            wait_until(lambda: received(observer) == 1, BOUND, message="one NOTIFY")
        wait_rows(slave, 10, "the writes while it slept")

        # busy with a backlog of 300,000 events (one transaction on the slave): 50 writing
        # transactions committed meanwhile send no NOTIFY
        master.execute("INSERT INTO t SELECT g, 'backlog' FROM generate_series(10001, 310000) g")
        wait_until(lambda: not asleep(master), BOUND, interval=0.005, message="the daemon awake")
        received(observer)
        writer = master.connect()
        for i in range(400001, 400051):
            writer.cursor().execute("INSERT INTO t VALUES (%s, 'while busy')", (i,))
        writer.close()
        time.sleep(0.2)             # a NOTIFY sent at commit has arrived by now
        assert count(slave) == 10, "the backlog was applied before the writes ended: the test proves nothing"
        assert received(observer) == 0
        wait_identical(master, slave, ["t"])
        assert daemon.stop() == 0
    observer.close()


def test_two_daemons_on_one_master_both_stay_live(master, slave, slave2):
    create_on_both(master, slave, DDL, ["t"])
    slave2.execute(DDL)
    for name in ("s1", "s2"):       # both from the start: the first one's prunes must not race the second
        assert run_cli("register", name, master.dsn)[0] == 0
    with Daemon(master, slave, name="s1", keepalive=KEEPALIVE) as one, \
            Daemon(master, slave2, name="s2", keepalive=KEEPALIVE) as two:
        for i in range(1, 31):
            time.sleep(random.uniform(0, 0.3))      # sometimes both asleep (one queued), sometimes not
            master.execute("INSERT INTO t VALUES (%s, 'both')", (i,))
            wait_rows(slave, i, "first slave", one)
            wait_rows(slave2, i, "second slave", two)
        assert one.stop() == 0 and two.stop() == 0
    assert contents(slave, "t") == contents(slave2, "t") == contents(master, "t")


def test_a_prepared_transaction_holding_the_lock_does_not_hang_the_daemon(master, slave):
    create_on_both(master, slave, DDL, ["t"])
    with Daemon(master, slave, name="s1", keepalive=KEEPALIVE) as daemon:
        # the trigger under pyreplica.notify = off takes no lock: its PREPARE leaves none behind
        app = master.connect(autocommit=False)
        with app.cursor() as cur:
            cur.execute("SET LOCAL pyreplica.notify = off; INSERT INTO t VALUES (1, 'prepared, notify off')")
            cur.execute("PREPARE TRANSACTION 'app-no-lock'")
        assert master.scalar(LOCK_HELD, (*LOCK_KEYS, "ShareLock")) == 0
        master.execute("COMMIT PREPARED 'app-no-lock'")

        # one that took it shared (as a writer does while the daemon works) and then PREPAREd: it
        # waits for the sleeping daemon's lock, and another writer's NOTIFY wakes the daemon
        waker = threading.Timer(0.3, master.execute, ("INSERT INTO t VALUES (100, 'wakes the daemon')",))
        waker.start()
        app.close()                 # psycopg2 does not know PREPARE ended the transaction
        app = master.connect(autocommit=False)
        with app.cursor() as cur:
            cur.execute("SET LOCAL pyreplica.notify = off; SELECT pg_advisory_xact_lock_shared(%s, %s)", LOCK_KEYS)
            cur.execute("INSERT INTO t VALUES (2, 'prepared, holding the lock')")
            cur.execute("PREPARE TRANSACTION 'app-lock'")
        waker.join()
        assert master.scalar(LOCK_HELD, (*LOCK_KEYS, "ShareLock")) == 1
        for i in range(3, 13):
            master.execute("INSERT INTO t VALUES (%s, 'meanwhile')", (i,))
            wait_until(lambda: slave.scalar("SELECT count(*) FROM t WHERE id = %s", (i,)) == 1, BOUND,
                       message=f"row {i} while a prepared transaction holds the lock")
        master.execute("COMMIT PREPARED 'app-lock'")
        wait_identical(master, slave, ["t"], timeout=BOUND)
        assert daemon.stop() == 0
    app.close()
    assert count(slave) == 13
