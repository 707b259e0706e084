"""`pyreplica switchover` (docs/design.md §8): fence the master, let the slave's daemon apply the tail,
reverse the direction; nothing a writer committed is lost, the old master refuses its own writes."""
import threading
import time

import psycopg2
import pytest

import pyreplica

from replication import Daemon, create_on_both, run_cli, wait_identical, wait_until
from test_security import LEAST_PRIVILEGE_SLAVE

SCHEMA = """
CREATE TABLE acc (id serial PRIMARY KEY, v text);
CREATE TABLE ev (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
CREATE TABLE ev_low PARTITION OF ev FOR VALUES FROM (0) TO (1000000);
CREATE TABLE ev_high PARTITION OF ev FOR VALUES FROM (1000000) TO (2000000);
"""
TABLES = ["acc", "ev"]
FENCED = "is read-only: this database was switched over and is a slave now"


def fence_message(table):
    return f"pyreplica: {table} {FENCED}"


def error_of(db, statement):
    """The error (message line, hint) a statement gets on db."""
    with pytest.raises(psycopg2.Error) as failed:
        db.execute(statement)
    return failed.value.diag.message_primary, failed.value.diag.message_hint


class Writer(threading.Thread):
    """Inserts on one database, each row its own transaction, until stopped; counts what committed
    and how many writes the fence refused."""

    def __init__(self, db, direct_partition=False):
        super().__init__()
        self.db, self.direct_partition = db, direct_partition
        self.stop_event = threading.Event()
        self.committed, self.fenced, self.errors = 0, 0, []

    def run(self):
        conn = self.db.connect(autocommit=False)
        table = "ev_low" if self.direct_partition else "ev"
        n = 0
        try:
            with conn.cursor() as cur:
                while not self.stop_event.is_set():
                    n += 1
                    try:        # one transaction: both rows or neither
                        cur.execute("INSERT INTO acc (v) VALUES (%s) RETURNING id", (f"w{n}",))
                        cur.execute(f"INSERT INTO {table} VALUES (%s, 'x')", (cur.fetchone()[0],))
                        conn.commit()
                        self.committed += 1
                    except psycopg2.Error as e:
                        conn.rollback()
                        if FENCED in str(e):
                            self.fenced += 1
                        else:
                            self.errors.append(str(e))
        finally:
            conn.close()

    def stop(self):
        self.stop_event.set()
        self.join()


def switchover(old, new, name, new_name, *more, env=None):
    return run_cli("switchover", old.dsn, new.dsn, "--name", name, "--new-name", new_name, *more, env=env,
                   timeout=120)


def assert_compare_equal(master, slave, name):
    code, out, err = run_cli("compare", master.dsn, slave.dsn, "--name", name)
    assert code == 0, out + err


@pytest.fixture
def replicated(master, slave):
    """master -> slave replicated as s1, with rows on both."""
    create_on_both(master, slave, SCHEMA, TABLES)
    master.execute("INSERT INTO acc (v) SELECT 'r' || g FROM generate_series(1, 100) g;"
                   "INSERT INTO ev SELECT g, 'e' FROM generate_series(1, 50) g")
    return master, slave


def test_switchover_under_writes_then_reverse_then_back(replicated):
    master, slave = replicated
    with Daemon(master, slave, name="s1") as old_daemon:
        wait_identical(master, slave, TABLES)
        writers = [Writer(master), Writer(master, direct_partition=True)]
        for w in writers:
            w.start()
        wait_until(lambda: all(w.committed > 20 for w in writers), message="writers under way")
        code, out, err = switchover(master, slave, "s1", "m1")
        for w in writers:
            w.stop()
        assert code == 0, out + err
        assert "switchover done" in out
        assert "pyreplica run" in out and "--name m1" in out
        assert all(w.fenced > 0 for w in writers), [(w.committed, w.fenced) for w in writers]
        assert [e for w in writers for e in w.errors] == []
        # every committed row is on the new master, nothing else
        assert slave.table_rows("acc") == master.table_rows("acc")
        assert slave.table_rows("ev") == master.table_rows("ev")
        assert slave.scalar("SELECT count(*) FROM acc") == 100 + sum(w.committed for w in writers)
        assert slave.scalar("SELECT count(*) FROM ev") == 50 + sum(w.committed for w in writers)
        # the old daemon stops by itself: its registration is gone
        old_daemon.wait_for_output('slave "s1" is not registered on this master')
        assert old_daemon.proc.wait(30) == 1

    # the old master refuses its own writes, with the message and what to do
    message, hint = error_of(master, "INSERT INTO acc (v) VALUES ('late')")
    assert message == fence_message("acc")
    assert hint == ("Write on the new master. To make this database writable again (only once no daemon "
                    "replicates into it): SELECT pyreplica.fence(false);")
    assert error_of(master, "INSERT INTO ev_high VALUES (2000000, 'late')")[0] == fence_message("ev_high")
    assert error_of(master, "TRUNCATE ev")[0] == fence_message("ev")

    # the new master takes writes with its serial keys (sequences were moved up) and replicates back
    with Daemon(slave, master, name="m1"):
        new_writer = Writer(slave)
        new_writer.start()
        wait_until(lambda: new_writer.committed > 50, message="writes on the new master")
        new_writer.stop()
        assert new_writer.errors == [] and new_writer.fenced == 0
        wait_identical(slave, master, TABLES)
        assert_compare_equal(slave, master, "m1")

        # and back again: the original master is the master once more
        code, out, err = switchover(slave, master, "m1", "s1")
        assert code == 0, out + err
    assert error_of(slave, "INSERT INTO acc (v) VALUES ('late')")[0] == fence_message("acc")
    with Daemon(master, slave, name="s1"):
        master.execute("INSERT INTO acc (v) SELECT 'back' FROM generate_series(1, 20);"
                       "UPDATE ev SET v = 'back' WHERE id < 10")
        wait_identical(master, slave, TABLES)
        assert_compare_equal(master, slave, "s1")
    assert master.scalar("SELECT count(*) FROM pyreplica.fenced") == 0


def test_switchover_without_daemon_times_out_fenced_then_completes(replicated):
    master, slave = replicated
    for db in (master, slave):
        db.execute("CREATE SEQUENCE tickets")
    assert master.scalar("SELECT py_log_create_seq('tickets')") == "following sequence public.tickets"
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, TABLES)
    master.execute("INSERT INTO acc (v) VALUES ('tail'); SELECT setval('tickets', 77)")   # no daemon: not applied
    code, out, err = switchover(master, slave, "s1", "m1", "--wait", "3")
    assert code == 1, out + err
    assert ("slave s1 has not applied the master's last transactions within 3 s (is its daemon running? "
            "pyreplica status MASTER): the master stays fenced") in err
    assert "SELECT pyreplica.fence(false)" in err
    assert error_of(master, "INSERT INTO acc (v) VALUES ('x')")[0] == fence_message("acc")
    assert slave.scalar("SELECT count(*) FROM acc WHERE v = 'tail'") == 0

    with Daemon(master, slave, name="s1"):
        code, out, err = switchover(master, slave, "s1", "m1")
        assert code == 0, out + err
    assert slave.scalar("SELECT count(*) FROM acc WHERE v = 'tail'") == 1
    assert slave.scalar("SELECT last_value FROM tickets") == 77
    assert slave.scalar("SELECT count(*) FROM pyreplica.replica_sequences WHERE rel = 0") == 1   # still followed
    with Daemon(slave, master, name="m1"):
        slave.execute("INSERT INTO acc (v) VALUES ('new master')")
        wait_identical(slave, master, TABLES)
        assert_compare_equal(slave, master, "m1")


@pytest.mark.parametrize("fault", ["switchover_after_fence", "switchover_after_register",
                                   "switchover_after_position"])
def test_switchover_killed_midway_finishes_when_run_again(replicated, fault):
    master, slave = replicated
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, TABLES)
        master.execute("INSERT INTO acc (v) VALUES ('before')")
        code, out, err = switchover(master, slave, "s1", "m1", env={"PYREPLICA_TEST_FAULT": fault})
        assert code == -9, out + err
        code, out, err = switchover(master, slave, "s1", "m1")
        assert code == 0, out + err
    code, out, err = switchover(master, slave, "s1", "m1")
    assert code == 0, out + err
    assert "switchover already done" in out
    with Daemon(slave, master, name="m1"):
        slave.execute("INSERT INTO acc (v) VALUES ('after')")
        wait_identical(slave, master, TABLES)
        assert_compare_equal(slave, master, "m1")


def test_switchover_refuses_before_changing_anything(replicated):
    master, slave = replicated
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, TABLES)
    code, out, err = switchover(master, slave, "nobody", "m1")
    assert code == 1
    assert "no slave named nobody is registered on the master" in err
    slave.cluster.execute("DROP ROLE IF EXISTS sw_plain; CREATE ROLE sw_plain LOGIN")
    try:
        plain = slave.cluster.dsn(slave.name, user="sw_plain")
        code, out, err = run_cli("switchover", master.dsn, plain, "--name", "s1")
        assert code == 1
        assert "switchover needs a superuser on both servers" in err and "role sw_plain on the slave" in err
        slave.execute("ALTER SCHEMA pyreplica OWNER TO sw_plain")
        code, out, err = switchover(master, slave, "s1", "m1")
        assert code == 1
        assert "master-install.sql would refuse the slave: schema pyreplica (owner sw_plain)" in err
        slave.execute("ALTER SCHEMA pyreplica OWNER TO postgres")
    finally:
        slave.cluster.execute("DROP ROLE sw_plain")
    gid = "pyreplica:s1:999:slave:tok:abc"
    with slave.connect(autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        cur.execute(f"PREPARE TRANSACTION '{gid}'")
    try:
        time.sleep(5.5)         # a batch prepared for longer than a moment is in doubt
        code, out, err = switchover(master, slave, "s1", "m1")
        assert code == 1
        assert (f"pyreplica transaction {gid} is prepared (in doubt) on the slave: settle it first (pyreplica "
                f"recover MASTER SLAVE --name s1), then run switchover again") in err
    finally:
        slave.execute(f"ROLLBACK PREPARED '{gid}'")
    slave.execute("DROP TABLE ev")
    code, out, err = switchover(master, slave, "s1", "m1")
    assert code == 1
    assert "the slave lacks public.ev, which the master captures" in err
    assert master.scalar("SELECT count(*) FROM pyreplica.fenced") == 0
    master.execute("INSERT INTO acc (v) VALUES ('still writable')")


def test_fence_sql(master):
    master.execute(SCHEMA)
    for table in TABLES:
        assert master.scalar("SELECT py_log_create_tg(%s)", (table,)).startswith("created trigger")
    assert master.scalar("SELECT pyreplica.fence(true)") == "fenced: 4 more table(s) read-only, 4 in all"
    assert master.scalar("SELECT pyreplica.fence(true)") == "fenced: 0 more table(s) read-only, 4 in all"
    for statement, table in (("INSERT INTO acc (v) VALUES ('x')", "acc"), ("UPDATE acc SET v = 'y'", "acc"),
                             ("DELETE FROM ev", "ev"), ("TRUNCATE acc", "acc"),
                             ("INSERT INTO ev_low VALUES (1, 'x')", "ev_low")):
        assert error_of(master, statement)[0] == fence_message(table), statement
    # an application's role, with no right on pyreplica's objects, gets the same message
    master.execute("DROP ROLE IF EXISTS sw_app; CREATE ROLE sw_app; GRANT INSERT ON acc TO sw_app;"
                   "GRANT USAGE ON SEQUENCE acc_id_seq TO sw_app")
    try:
        assert error_of(master, "SET ROLE sw_app; INSERT INTO acc (v) VALUES ('x')")[0] == fence_message("acc")
    finally:
        master.execute("REVOKE ALL ON acc FROM sw_app; REVOKE ALL ON SEQUENCE acc_id_seq FROM sw_app; DROP ROLE sw_app")
    # a daemon replaying into this node is not fenced
    master.execute("SET session_replication_role = replica; INSERT INTO acc (v) VALUES ('replayed')")
    # a table captured, or a partition created, on a fenced node is fenced too
    master.execute("CREATE TABLE later (id int PRIMARY KEY);"
                   "CREATE TABLE ev_top PARTITION OF ev FOR VALUES FROM (2000000) TO (MAXVALUE)")
    master.scalar("SELECT py_log_create_tg('later')")
    assert error_of(master, "INSERT INTO later VALUES (1)")[0] == fence_message("later")
    assert error_of(master, "INSERT INTO ev_top VALUES (3000000, 'x')")[0] == fence_message("ev_top")
    assert master.scalar("SELECT pyreplica.fence(false)") == "unfenced: 6 table(s) writable again"
    master.execute("INSERT INTO acc (v) VALUES ('x'); INSERT INTO later VALUES (1); TRUNCATE ev")
    assert master.scalar("SELECT pyreplica.fence(false)") == "unfenced: 0 table(s) writable again"
    # master-uninstall.sql takes a fence with it
    assert master.scalar("SELECT pyreplica.fence(true)").startswith("fenced: 6 more")
    master.psql("-f", pyreplica.MASTER_UNINSTALL_SQL)
    assert master.scalar("SELECT count(*) FROM pg_trigger WHERE tgname = 'py_log_fence'") == 0
    master.execute("INSERT INTO acc (v) VALUES ('uninstalled')")


# README "Switchover": a least-privilege slave's schema handed to a superuser, its daemon keeps its rights
HAND_OVER = """
ALTER SCHEMA pyreplica OWNER TO postgres;
ALTER TABLE pyreplica.position OWNER TO postgres;
ALTER TABLE pyreplica.skip_requests OWNER TO postgres;
ALTER TABLE pyreplica.table_states OWNER TO postgres;
ALTER FUNCTION pyreplica.apply_events(bigint[], text[], text[], text[], int[]) OWNER TO postgres;
GRANT USAGE ON SCHEMA pyreplica TO {role};
GRANT SELECT, INSERT, UPDATE ON pyreplica.position, pyreplica.skip_requests, pyreplica.table_states TO {role};
"""
# README "Switchover": after it, the daemon's role on the new master and on the new slave
NEW_MASTER_GRANTS = "GRANT pyreplica_daemon TO {role}"
NEW_SLAVE_GRANTS = """
GRANT SELECT, INSERT, UPDATE ON pyreplica.position, pyreplica.skip_requests, pyreplica.table_states TO {role};
GRANT SET ON PARAMETER session_replication_role TO {role};
GRANT USAGE ON SCHEMA public TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON public.t TO {role};
"""


def test_least_privilege_daemons_as_the_readme_says(master, slave):
    from psycopg2 import sql
    role = "sw_repl"

    def run(db, text):
        db.execute(sql.SQL(text).format(role=sql.Identifier(role)))

    class As:
        def __init__(self, db):
            self.dsn = db.cluster.dsn(db.name, user=role)

    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, v text)", ["t"])
    for db in (master, slave):
        db.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    try:
        run(master, "CREATE ROLE {role} LOGIN; GRANT pyreplica_daemon TO {role}")
        run(slave, LEAST_PRIVILEGE_SLAVE)
        master.execute("INSERT INTO t VALUES (1, 'a')")
        with Daemon(As(master), As(slave), name="s1"):
            wait_identical(master, slave, ["t"])
            code, out, err = switchover(master, slave, "s1", "m1")
            assert code == 1 and "schema pyreplica (owner sw_repl)" in err, out + err
            run(slave, HAND_OVER)
            master.execute("INSERT INTO t VALUES (2, 'b')")
            code, out, err = switchover(master, slave, "s1", "m1")
            assert code == 0, out + err
        run(slave, NEW_MASTER_GRANTS)
        run(master, NEW_SLAVE_GRANTS)
        with Daemon(As(slave), As(master), name="m1") as daemon:
            slave.execute("INSERT INTO t VALUES (3, 'c'); UPDATE t SET v = 'A' WHERE id = 1")
            try:
                wait_identical(slave, master, ["t"])
            except AssertionError as e:
                raise AssertionError(f"{e}\n{daemon.output}") from None
        assert master.table_rows("t") == [("(1,A)",), ("(2,b)",), ("(3,c)",)]
    finally:
        for db in (master, slave):
            db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            db.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
