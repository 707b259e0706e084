"""Clones under a prune loop (issue 11 item 9): a clone registers the slave before it exports the
snapshot it copies, so no prune can remove an event the copy lacks. Writers never stop."""
import threading
import time

from conftest import fresh_db
from replication import Daemon, run_cli, wait_identical

CLONES = 12


def writer(master, stop):
    conn = master.connect()
    i = 0
    try:
        while not stop.is_set():
            i += 1
            with conn.cursor() as cur:
                cur.execute("INSERT INTO t VALUES (%s, 'x')", (i,))
                if i % 3 == 0:
                    cur.execute("UPDATE t SET v = v || 'y' WHERE id = %s", (i - 1,))
    finally:
        conn.close()


def pruner(master, stop):
    """Another slave that is always up to date, so every prune really removes events; the log's
    sequence jumps a block (100,000 ids) each time, so that writes move on to the next partition
    and the previous one can go whole."""
    conn = master.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pyreplica.register_slave('always_current')")
            while not stop.is_set():
                cur.execute("SELECT setval('pyreplica.replica_log_id_seq', "
                            "(last_value / 100000 + 1) * 100000) FROM pyreplica.replica_log_id_seq")
                cur.execute("UPDATE pyreplica.replica_slaves SET confirmed = pg_current_snapshot() "
                            "WHERE name = 'always_current'")
                cur.execute("SELECT pyreplica.prune()")
                time.sleep(0.02)
    finally:
        conn.close()


def test_clones_under_a_prune_loop_miss_nothing(master, slave_cluster):
    master.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    assert master.scalar("SELECT py_log_create_tg('t')").startswith("created trigger")
    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(master, stop)), threading.Thread(target=pruner, args=(master, stop))]
    for t in threads:
        t.start()
    clones = []
    try:
        for n in range(CLONES):
            slave = fresh_db(slave_cluster, "clone")
            clones.append(slave)
            rc, out, err = run_cli("clone", master.dsn, slave.dsn, "--name", f"c{n}", timeout=120)
            assert rc == 0, err
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert master.scalar("SELECT count(*) FROM pyreplica.log_pruned") == 1, "the prune loop pruned"
    for n, slave in enumerate(clones):
        with Daemon(master, slave, name=f"c{n}", keepalive=1):
            wait_identical(master, slave, ["t"])
    for slave in clones:
        slave_cluster.dropdb(slave.name)
