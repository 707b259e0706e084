"""The log never bloats (docs/design.md §3): three partitions of 100,000 ids written in turn, emptied by
TRUNCATE once every slave has applied all of a partition, never by DELETE; nothing a slave still
needs ever goes, whatever races the prune."""
import os
import threading

import psycopg2

import pyreplica
from replication import Daemon, create_on_both, run_cli, wait_identical, wait_until

BLOCK = 100_000
PARTS = [f"pyreplica.replica_log_{p}" for p in range(3)]
OLD_INSTALL = os.path.join(os.path.dirname(__file__), "data", "master-install-3.sql")


def rows_per_part(master):
    return [master.scalar(f"SELECT count(*) FROM {p}") for p in PARTS]


def jump_to_block(master, block):
    """Let the next id be the first of `block` (what 100,000 events would do, in no time)."""
    master.execute("SELECT setval('pyreplica.replica_log_id_seq', %s, false)", (max(1, block * BLOCK),))


def write_in_blocks(master, blocks, per_block=20, start=0):
    for block in blocks:
        jump_to_block(master, block)
        master.execute("INSERT INTO t (v) SELECT 'b' || %s FROM generate_series(1, %s)", (block, per_block))


def test_consumed_partitions_are_truncated_never_deleted(master, slave):
    create_on_both(master, slave, "CREATE TABLE t (id serial PRIMARY KEY, v text)", ["t"])
    with Daemon(master, slave, name="r1", keepalive=1):
        write_in_blocks(master, range(0, 7))        # partitions 0, 1, 2, 0, 1, 2, 0
        wait_identical(master, slave, ["t"])
        master.execute("SELECT pyreplica.prune()")
        assert rows_per_part(master) == [0, 0, 0]
        assert all(master.scalar("SELECT pg_relation_size(%s::regclass)", (p,)) == 0 for p in PARTS)
    # nothing was ever deleted: no dead tuple to vacuum
    master.execute("SELECT pg_stat_force_next_flush()")
    dead = master.scalar("SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_all_tables "
                         "WHERE schemaname = 'pyreplica' AND relname LIKE 'replica_log_%%'")
    assert dead == 0
    assert master.scalar("SELECT count(*) FROM t") == slave.scalar("SELECT count(*) FROM t") == 140


def test_a_stopped_slave_keeps_what_it_needs_and_catches_up_exactly(master, slave, slave2):
    create_on_both(master, slave, "CREATE TABLE t (id serial PRIMARY KEY, v text)", ["t"])
    slave2.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")
    with Daemon(master, slave2, name="late", keepalive=1):
        wait_until(lambda: master.scalar("SELECT count(*) FROM pyreplica.replica_slaves") == 1, message="late")
    with Daemon(master, slave, name="live", keepalive=1):
        write_in_blocks(master, range(0, 5))
        wait_identical(master, slave, ["t"])
        master.execute("SELECT pyreplica.prune()")
        assert sum(rows_per_part(master)) == 100      # "late" has applied none of them
    with Daemon(master, slave2, name="late", keepalive=1):
        wait_identical(master, slave2, ["t"])
    master.execute("SELECT pyreplica.prune()")
    assert rows_per_part(master) == [0, 0, 0]


def test_a_prepared_writer_holds_its_partition_not_replication(master, slave):
    create_on_both(master, slave, "CREATE TABLE t (id serial PRIMARY KEY, v text)", ["t"])
    with Daemon(master, slave, name="p1", keepalive=1):
        with master.connect(autocommit=False) as conn, conn.cursor() as cur:
            cur.execute("SET LOCAL pyreplica.notify = off; INSERT INTO t (v) VALUES ('prepared')")
            cur.execute("PREPARE TRANSACTION 'app-rotation'")
        try:
            write_in_blocks(master, range(1, 4))       # partitions 1, 2, 0: the prepared row is in 0
            wait_until(lambda: slave.scalar("SELECT count(*) FROM t") == 60, message="the others replicated")
            # its transaction is older than every later one: no slave's position is past it, so
            # nothing after it goes either (and its own partition is locked)
            master.execute("SELECT pyreplica.prune()")
            assert rows_per_part(master) == [20, 20, 20]
        finally:
            master.execute("COMMIT PREPARED 'app-rotation'")
        wait_identical(master, slave, ["t"])
        assert slave.scalar("SELECT count(*) FROM t WHERE v = 'prepared'") == 1
        wait_until(lambda: master.scalar("SELECT pyreplica.prune()") >= 0 and rows_per_part(master) == [0, 0, 0],
                   message="every partition emptied once all is applied")


def test_writers_racing_the_prune_lose_nothing(master, slave):
    create_on_both(master, slave, "CREATE TABLE t (id serial PRIMARY KEY, v text)", ["t"])
    stop, committed, errors = threading.Event(), [0, 0, 0], []

    def writer(i):
        conn = master.connect()
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    cur.execute("INSERT INTO t (v) VALUES ('w')")
                    committed[i] += 1
        finally:
            conn.close()

    def pruner():
        conn = master.connect()
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    try:
                        cur.execute("SELECT pyreplica.prune()")
                    except psycopg2.Error as e:
                        errors.append(str(e))
        finally:
            conn.close()

    with Daemon(master, slave, name="w1", keepalive=1):
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)] + [threading.Thread(target=pruner)]
        for t in threads:
            t.start()
        for block in range(1, 8):                        # the writers cross partitions while pruned
            stop.wait(0.7)
            jump_to_block(master, block)
        stop.set()
        for t in threads:
            t.join()
        wait_identical(master, slave, ["t"])
    assert errors == []
    assert slave.scalar("SELECT count(*) FROM t") == sum(committed) > 100


def test_prune_under_a_repeatable_read_default(master, slave):
    """Prune reads again after its lock: a database whose transactions default to one snapshot must
    not make it miss rows committed in between."""
    master.execute(f"ALTER DATABASE {master.name} SET default_transaction_isolation = 'repeatable read'")
    create_on_both(master, slave, "CREATE TABLE t (id serial PRIMARY KEY, v text)", ["t"])
    with Daemon(master, slave, name="rr", keepalive=1):
        write_in_blocks(master, range(0, 4))
        wait_identical(master, slave, ["t"])
        wait_until(lambda: sum(rows_per_part(master)) == 0, 30, message="the daemon's prune")
    try:
        master.execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT pyreplica.prune()")
        raise AssertionError("prune ran in a REPEATABLE READ transaction")
    except psycopg2.Error as e:
        assert "pyreplica: prune() must run in a READ COMMITTED transaction (this one is repeatable read)" in str(e)


def test_upgrade_from_the_unpartitioned_log_keeps_every_event(master_cluster, slave):
    from conftest import fresh_db
    master = fresh_db(master_cluster, "upg")
    try:
        master.psql("-f", OLD_INSTALL)
        create_on_both(master, slave, "CREATE TABLE t (id serial PRIMARY KEY, v text)", ["t"])
        master.execute("SELECT pyreplica.register_slave('up')")
        master.execute("INSERT INTO t (v) SELECT 'before' FROM generate_series(1, 250)")
        master.execute("UPDATE t SET v = 'updated before' WHERE id % 5 = 0")
        logged = master.execute("SELECT id, sql FROM pyreplica.replica_log ORDER BY id")
        code, _, err = run_cli("status", master.dsn)
        assert code == 1 and (f"the master database {master.name} has an older pyreplica install: run "
                              f"`psql {master.name} -f master-install.sql` on it as a superuser to upgrade it") in err
        master.install_master()
        assert master.scalar("SELECT relkind FROM pg_class WHERE oid = 'pyreplica.replica_log'::regclass") == "p"
        assert master.execute("SELECT id, sql FROM pyreplica.replica_log ORDER BY id") == logged
        assert master.execute("SELECT id, sql FROM public.replica_log ORDER BY id") == logged
        assert master.scalar("SELECT to_regclass('pyreplica.replica_log_unpartitioned')") is None
        master.execute("INSERT INTO t (v) VALUES ('after')")
        assert master.scalar("SELECT max(id) FROM pyreplica.replica_log") == len(logged) + 1
        master.install_master()                           # and again: changes nothing
        # an install from before the log's index of administrators' statements gains it on a re-run
        admin_index = "SELECT pg_get_indexdef(to_regclass('pyreplica.replica_log_admin_idx'))"
        assert "WHERE (op = 'S'::\"char\")" in master.scalar(admin_index)
        master.execute("DROP INDEX pyreplica.replica_log_admin_idx")
        master.install_master()
        assert "WHERE (op = 'S'::\"char\")" in master.scalar(admin_index)
        with Daemon(master, slave, name="up", keepalive=1):
            wait_identical(master, slave, ["t"])
        master.psql("-f", pyreplica.MASTER_UNINSTALL_SQL)
        assert master.scalar("SELECT to_regnamespace('pyreplica')") is None
    finally:
        master_cluster.dropdb(master.name)
