"""`pyreplica add-table` / `remove-table` (docs/design.md §13): tables join and leave a running slave
while the daemon replays and writers write, against real master and slave servers."""
import concurrent.futures
import contextlib
import random
import threading
import uuid

from psycopg2 import sql

from replication import Daemon, contents, create_on_both, run_cli, wait_identical, wait_until

DDL = "CREATE TABLE t (id int PRIMARY KEY, v text);"
NEW = """
CREATE TABLE n (id serial PRIMARY KEY, v text, k numeric, twice int GENERATED ALWAYS AS (id * 2) STORED);
CREATE INDEX n_v ON n (v);
CREATE TABLE parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
CREATE TABLE parted_low PARTITION OF parted FOR VALUES FROM (MINVALUE) TO (100000);
CREATE TABLE parted_high PARTITION OF parted FOR VALUES FROM (100000) TO (MAXVALUE);
"""


class Writer:
    """Writes t (replicated all along) and the tables being added, until stopped."""

    def __init__(self, master, tables=("t", "n")):
        self.master, self.tables = master, tables
        self.stop_event = threading.Event()
        self.errors, self.commits = [], 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        rng = random.Random(7)
        try:
            with contextlib.closing(self.master.connect()) as conn, conn.cursor() as cur:
                i = 10000
                while not self.stop_event.is_set():
                    i += 1
                    cur.execute("INSERT INTO t VALUES (%s, 'w')", (i,))
                    if "n" in self.tables:
                        cur.execute("BEGIN; INSERT INTO n (v, k) VALUES ('w' || %s, %s); "
                                    "UPDATE n SET v = v || '+', k = k + 1 WHERE id = %s; "
                                    "DELETE FROM n WHERE id = %s; COMMIT",
                                    (i, i / 7, rng.randint(1, 3000), rng.randint(1, 3000)))
                    if "parted" in self.tables:
                        cur.execute("INSERT INTO parted VALUES (%s, 'p'), (%s, 'q') ON CONFLICT (id) DO UPDATE "
                                    "SET v = parted.v || '!'", (rng.randint(1, 200000), rng.randint(1, 200000)))
                    self.commits += 1
                    self.stop_event.wait(0.003)
        except Exception as e:      # shown by the test's assertion
            self.errors.append(repr(e))

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.commits > 20 or self.errors, message="the writer to write")
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join()


def start(master, slave, on_slave_too=True):
    """t replicated; n and parted filled on the master (and created, empty, on the slave if asked)."""
    create_on_both(master, slave, DDL, ["t"])
    master.execute(NEW)
    if on_slave_too:
        slave.execute(NEW)
    master.execute("INSERT INTO n (v, k) SELECT 'r' || g, g / 3.0 FROM generate_series(1, 3000) g")
    master.execute("INSERT INTO parted SELECT g * 97 % 200000, 'r' || g FROM generate_series(1, 2000) g")


def replicating(master, slave):
    master.execute("INSERT INTO t VALUES (0, 'first')")
    wait_identical(master, slave, ["t"])


def add_table(master, slave, *tables, expect=0):
    code, out, err = run_cli("add-table", master.dsn, slave.dsn, *tables, "--name", "s1", "--wait", "60",
                             timeout=120)
    assert "Traceback" not in err, err
    assert code == expect, (code, out, err)
    return out + err


def test_add_table_while_writers_write_and_the_daemon_runs(master, slave):
    start(master, slave, on_slave_too=False)        # n and parted are created on the slave by add-table
    # the join reads the position after its lock: READ COMMITTED whatever the slave's default
    slave.execute(f"ALTER DATABASE {slave.name} SET default_transaction_isolation = 'repeatable read'")
    with Daemon(master, slave, name="s1") as daemon, Writer(master, ("t", "n", "parted")) as writer:
        replicating(master, slave)
        output = add_table(master, slave, "n", "public.parted")
        assert "Added n, parted to slave s1" in output.replace("public.", ""), output
        assert master.scalar("SELECT count(*) FROM pyreplica.replica_slaves WHERE name LIKE '%+add-table'") == 0
        writes_after = writer.commits
        wait_until(lambda: writer.commits > writes_after + 50 or writer.errors, message="writes after the join")
    assert not writer.errors, writer.errors
    with Daemon(master, slave, name="s1") as daemon:
        wait_identical(master, slave, ["t", "n", "parted"])
    assert "error" not in daemon.output.lower(), daemon.output
    assert slave.scalar("SELECT count(*) FROM parted_high") == master.scalar("SELECT count(*) FROM parted_high") > 0
    assert slave.scalar("SELECT to_regclass('n_v') IS NOT NULL")            # the definition came with it
    code, out, err = run_cli("compare", master.dsn, slave.dsn, "--name", "s1")
    assert code == 0, out + err


def test_add_table_interrupted_after_the_copy_runs_again(master, slave):
    start(master, slave)
    with Daemon(master, slave, name="s1") as daemon, Writer(master) as writer:
        replicating(master, slave)
        code, out, err = run_cli("add-table", master.dsn, slave.dsn, "n", "--name", "s1",
                                 env={"PYREPLICA_TEST_FAULT": "add_table_copied"}, timeout=120)
        assert code == -9, (code, out, err)
        assert slave.scalar("SELECT state FROM pyreplica.table_states WHERE relname = 'public.n'") == "catching_up"
        assert master.scalar("SELECT count(*) FROM pyreplica.replica_slaves WHERE name = 's1+add-table'") == 1
        add_table(master, slave, "n")
    assert not writer.errors, writer.errors
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, ["t", "n"])
    assert slave.scalar("SELECT count(*) FROM pyreplica.table_states") == 0


def test_remove_table_then_add_it_again(master, slave):
    start(master, slave)
    with Daemon(master, slave, name="s1") as daemon:
        replicating(master, slave)
        add_table(master, slave, "n")
        wait_identical(master, slave, ["t", "n"])
        code, out, err = run_cli("remove-table", master.dsn, slave.dsn, "n", "--name", "s1")
        assert code == 0, (out, err)
        assert "Removed n from slave s1" in out.replace("public.", ""), out
        kept = contents(slave, "n")
        master.execute("UPDATE n SET v = 'changed' WHERE id < 100; INSERT INTO t VALUES (1, 'after')")
        wait_until(lambda: slave.execute("SELECT v FROM t WHERE id = 1") == [("after",)], message="t to replicate")
        assert contents(slave, "n") == kept          # n no longer follows the master
        code, out, err = run_cli("compare", master.dsn, slave.dsn, "--name", "s1")
        assert code == 0, out + err
        assert "not compared" in out and "removed" in out, out
        add_table(master, slave, "n")
        wait_identical(master, slave, ["t", "n"])
    assert "error" not in daemon.output.lower(), daemon.output


def test_add_table_refusals_change_nothing(master, slave):
    start(master, slave)
    master.execute("CREATE TABLE nopk (v text)")
    with Daemon(master, slave, name="s1") as daemon:
        replicating(master, slave)
        out = add_table(master, slave, "nopk", expect=1)
        assert "table public.nopk has no primary key" in out, out
        out = add_table(master, slave, "t", expect=1)
        assert "table public.t is already replicated to slave s1" in out and "pyreplica repair" in out, out
        out = add_table(master, slave, "parted_low", expect=1)
        assert "is a partition: name the partitioned table it belongs to" in out, out
        out = add_table(master, slave, "no_such_table", expect=1)
        assert "no_such_table" in out, out
    assert slave.scalar("SELECT count(*) FROM pyreplica.table_states") == 0
    assert not master.scalar("SELECT pyreplica.py_log_is_captured('nopk')")
    code, out, err = run_cli("add-table", master.dsn, "n", "--name", "s1")
    assert code == 2 and "give both connection strings" in err, (code, out, err)


def test_add_table_behind_an_open_transaction_gives_up_and_lets_writers_on(master, slave):
    """Capturing takes a lock on the table: behind an open transaction that wrote to it, add-table
    waited for ever, past --wait, and every application write to the table queued behind it."""
    start(master, slave)
    with Daemon(master, slave, name="s1"):
        replicating(master, slave)
        with contextlib.closing(master.connect(autocommit=False)) as long:
            long.cursor().execute("UPDATE n SET v = 'long' WHERE id = 5")
            out = add_table(master, slave, "n", expect=1)
            assert ("cannot capture public.n on the master: a transaction has held a lock on it for 5s (an open "
                    "one that wrote to it?), and writers would queue behind add-table") in out, out
            master.execute("SET statement_timeout = '3s'; INSERT INTO n (v) VALUES ('app')")
            long.rollback()
        assert slave.scalar("SELECT count(*) FROM pyreplica.table_states") == 0
        add_table(master, slave, "n")
        wait_identical(master, slave, ["t", "n"])


def test_a_least_privilege_daemon_keeps_replicating_after_an_administrator_added_a_table(master, slave):
    """add-table runs as an administrator; it may be the first to install the slave's new table_states,
    which the daemon's role must still be able to lock (it owns the slave's schema)."""
    role = f"repl_{uuid.uuid4().hex[:8]}"
    start(master, slave)
    for db in (master, slave):
        db.execute(sql.SQL("CREATE ROLE {0} LOGIN").format(sql.Identifier(role)))
    master.execute(sql.SQL("GRANT pyreplica_daemon TO {0}").format(sql.Identifier(role)))
    slave.execute(sql.SQL("CREATE SCHEMA pyreplica AUTHORIZATION {0}; "
                          "GRANT SET ON PARAMETER session_replication_role TO {0}; "
                          "GRANT USAGE ON SCHEMA public TO {0}; "
                          "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON t, n TO {0}; "
                          "GRANT SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {0}").format(sql.Identifier(role)))

    class As:
        def __init__(self, db):
            self.dsn = db.cluster.dsn(db.name, user=role)
    try:
        with Daemon(As(master), As(slave), name="s1") as daemon:
            replicating(master, slave)
        # as after an upgrade the daemon has not run yet: the administrator's add-table installs it
        slave.execute("DROP TABLE pyreplica.table_states; COMMENT ON FUNCTION "
                      "pyreplica.apply_events(bigint[], text[], text[], text[], int[]) IS 'pyreplica slave schema 3'")
        with Writer(master) as writer, concurrent.futures.ThreadPoolExecutor(1) as pool:
            adding = pool.submit(add_table, master, slave, "n")
            wait_until(lambda: slave.scalar("SELECT to_regclass('pyreplica.table_states') IS NOT NULL"),
                       message="add-table to install the slave's table_states")
            with Daemon(As(master), As(slave), name="s1") as daemon:
                try:
                    adding.result()
                except AssertionError as e:
                    raise AssertionError(f"{e}\n{daemon.output}") from None
                wait_identical(master, slave, ["n"])
        assert not writer.errors, writer.errors
        assert "permission denied" not in daemon.output, daemon.output
        with Daemon(As(master), As(slave), name="s1"):
            wait_identical(master, slave, ["t", "n"])
    finally:
        slave.execute("DROP SCHEMA IF EXISTS pyreplica CASCADE")
        for db in (master, slave):
            db.execute(sql.SQL("DROP OWNED BY {0}").format(sql.Identifier(role)))
        for db in (master, slave):
            db.execute(sql.SQL("DROP ROLE IF EXISTS {0}").format(sql.Identifier(role)))


def write_conf(path, master, slave, tables):
    path.write_text(f"[MAIN]\nDSN0 = {master.dsn}\nDSN1 = {slave.dsn}\nSLAVE_FIELD = s1\nKEEPALIVE = 2\n"
                    f"TABLES = {tables}\n")
    return str(path)


def test_a_table_the_running_daemon_filters_out_is_refused(master, slave, tmp_path):
    """TABLES changed in the config but the daemon not restarted: its filter would drop the table's
    changes after the join, so add-table refuses, changing nothing; once restarted, it works."""
    start(master, slave)
    old = write_conf(tmp_path / "old.conf", master, slave, "public.t")
    new = write_conf(tmp_path / "new.conf", master, slave, "public.t, public.n")
    daemon = Daemon(master, slave)
    daemon.args = ["-c", old]
    with daemon:
        replicating(master, slave)
        code, out, err = run_cli("add-table", "-c", new, "n", "--wait", "60", timeout=120)
        assert code == 1 and "table public.n is not in the TABLES of the daemon replicating into this slave " \
                             "(public.t): add it to the config and restart the daemon first" in err, (code, out, err)
    assert slave.scalar("SELECT count(*) FROM pyreplica.table_states") == 0
    assert not master.scalar("SELECT pyreplica.py_log_is_captured('n')")
    daemon = Daemon(master, slave)
    daemon.args = ["-c", new]
    with daemon:
        wait_until(lambda: slave.scalar("SELECT tables FROM pyreplica.position") == ["public.t", "public.n"],
                   message="the restarted daemon to record its TABLES")
        code, out, err = run_cli("add-table", "-c", new, "n", "--wait", "60", timeout=120)
        assert code == 0, out + err
        master.execute("UPDATE n SET v = 'after the join' WHERE id = 1")
        wait_identical(master, slave, ["t", "n"])


def test_names_with_quotes_and_one_command_at_a_time(master, slave):
    start(master, slave)
    master.execute('CREATE TABLE "ab" (id int PRIMARY KEY); CREATE TABLE "a.b""" (id int PRIMARY KEY, x text); '
                   'INSERT INTO "a.b""" VALUES (1, \'one\')')
    with Daemon(master, slave, name="s1"):
        replicating(master, slave)
        with contextlib.closing(slave.connect()) as other:     # as a second add-table run would
            with other.cursor() as cur:
                cur.execute("SELECT pg_advisory_lock(1887007334, hashtext('s1'))")
            out = add_table(master, slave, "n", expect=1)
            assert "another add-table or remove-table is running for slave s1: wait for it to end" in out, out
        add_table(master, slave, 'public."a.b"""')
        master.execute('INSERT INTO "a.b""" VALUES (2, \'two\')')
        wait_identical(master, slave, ['"a.b"""'])
    assert not slave.scalar("SELECT to_regclass('public.ab') IS NOT NULL")
    assert slave.scalar("SELECT count(*) FROM pyreplica.table_states") == 0


def test_a_run_that_times_out_leaves_the_tables_held_and_no_pin(master, slave):
    start(master, slave)
    with Daemon(master, slave, name="s1"):
        replicating(master, slave)
    master.execute("INSERT INTO t VALUES (5, 'pending')")       # the stopped daemon never gets there
    code, out, err = run_cli("add-table", master.dsn, slave.dsn, "n", "--name", "s1", "--wait", "2", timeout=120)
    assert code == 1 and "has not reached the copy's point within 2 s" in err, (code, out, err)
    assert slave.scalar("SELECT state FROM pyreplica.table_states WHERE relname = 'public.n'") == "catching_up"
    assert master.scalar("SELECT count(*) FROM pyreplica.replica_slaves WHERE name = 's1+add-table'") == 0
    with Daemon(master, slave, name="s1"), Writer(master):
        add_table(master, slave, "n")
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, ["t", "n"])
