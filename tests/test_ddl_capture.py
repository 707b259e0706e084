"""Opt-in DDL capture (issue 13 item 2; docs/design.md §12, README "Schema changes"): with ddl = on the
event triggers log a superuser's DDL of a captured table as an administrator's statement in its place
in the stream; capture_new_tables = on captures a new table with a primary key."""
import contextlib
import threading

import psycopg2
import pytest

from replication import Daemon, create_on_both, wait_identical, wait_until

DDL = "CREATE TABLE t (id int PRIMARY KEY, v text)"
HINT = ("Run the statement alone (one statement per query string), or log it yourself with "
        "SELECT py_log_sql('...'), or turn the DDL capture off: SELECT pyreplica.set_option('ddl', 'off');")


def logged_statements(master):
    return [sql for (sql,) in master.execute("SELECT sql FROM pyreplica.replica_log WHERE op = 'S' ORDER BY id")]


def columns(db, table="t"):
    return [c for (c,) in db.execute("SELECT attname::text FROM pg_attribute WHERE attrelid = %s::regclass "
                                     "AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (table,))]


def indexes(db, table="t"):
    return sorted(i for (i,) in db.execute("SELECT indexrelid::regclass::text FROM pg_index "
                                           "WHERE indrelid = %s::regclass", (table,)))


@pytest.fixture
def captured(master, slave):
    create_on_both(master, slave, DDL, ["t"])
    assert master.scalar("SELECT pyreplica.set_option('ddl', 'on')") == (
        "ddl = on (a superuser's ALTER TABLE, CREATE/ALTER/DROP INDEX and CREATE/DROP TABLE of a captured table "
        "are logged for every slave)")
    return master, slave


@contextlib.contextmanager
def writer_on_t(master):
    """Writes to t all the time; once `state["note"]` is set, into the new column too."""
    stop, state = threading.Event(), {"n": 0, "note": False, "error": None}

    def write():
        conn = master.connect()
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    state["n"] += 1
                    if state["note"]:
                        cur.execute("INSERT INTO t (id, v, note) VALUES (%s, 'w', 'noted')", (state["n"],))
                    else:
                        cur.execute("INSERT INTO t VALUES (%s, 'w')", (state["n"],))
                    if state["n"] % 3 == 0:
                        cur.execute("UPDATE t SET v = 'u' WHERE id = %s", (state["n"] - 1,))
        except Exception as e:          # reported by the test, not lost in the thread
            state["error"] = e
        finally:
            conn.close()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join()
    assert state["error"] is None, state["error"]


def test_alter_table_and_indexes_replicate_with_a_running_daemon_and_a_writer(captured):
    master, slave = captured
    with Daemon(master, slave, name="s1", keepalive=1) as daemon, writer_on_t(master) as state:
        wait_until(lambda: slave.scalar("SELECT count(*) FROM t") > 20, message="first rows on the slave")
        master.execute("ALTER TABLE t ADD COLUMN note text")
        state["note"] = True
        master.execute("CREATE UNIQUE INDEX t_v_id ON t (v, id)")
        master.execute("ALTER INDEX t_v_id RENAME TO t_v_id2")
        master.execute("CREATE INDEX t_note ON t (note)")
        wait_until(lambda: "note" in columns(slave), message="the new column on the slave")
        wait_until(lambda: slave.scalar("SELECT count(*) FROM t WHERE note = 'noted'") > 20,
                   message="rows using the new column on the slave")
        master.execute("DROP INDEX t_note")
        wait_until(lambda: indexes(slave) == ["t_pkey", "t_v_id2"], message="DROP INDEX on the slave")
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, ["t"])
    assert "error at event" not in daemon.final_output, daemon.final_output
    assert columns(slave) == ["id", "v", "note"]
    assert indexes(slave) == indexes(master) == ["t_pkey", "t_v_id2"]


def test_several_statements_in_one_string_are_refused_and_nothing_changes(captured):
    master, slave = captured
    with pytest.raises(psycopg2.Error) as caught:
        master.execute("INSERT INTO t VALUES (1, 'a'); ALTER TABLE t ADD COLUMN a int; -- two\n"
                       "ALTER TABLE t ADD COLUMN \"b;c\" text DEFAULT $$;$$")
    assert caught.value.diag.message_primary == (
        "pyreplica: ddl = on logs the text of ALTER TABLE for the slaves, but this query string holds 3 statements, "
        "which would all run there")
    assert caught.value.diag.message_hint == HINT
    assert columns(master) == ["id", "v"] and master.scalar("SELECT count(*) FROM t") == 0
    assert logged_statements(master) == []
    with Daemon(master, slave, name="s1") as daemon:
        daemon.wait_for_output("Waiting for 'NOTIFY'")
    assert columns(slave) == ["id", "v"] and slave.scalar("SELECT count(*) FROM t") == 0
    # one statement with semicolons, comments and quotes inside it is one statement
    master.execute("/* a /* nested */ comment; */ ALTER TABLE t ADD COLUMN \"b;c\" text DEFAULT E'\\';' -- ;\n;")
    assert columns(master) == ["id", "v", "b;c"] and len(logged_statements(master)) == 1


def test_ddl_in_a_do_block_or_a_function_is_refused(captured):
    master, _ = captured
    with pytest.raises(psycopg2.Error) as caught:
        master.execute("DO $$ BEGIN ALTER TABLE t ADD COLUMN a int; END $$")
    assert caught.value.diag.message_primary == (
        "pyreplica: ddl = on cannot log this ALTER TABLE: it ran inside another statement (a DO block or a "
        "function), whose text is not the ALTER TABLE itself")
    assert caught.value.diag.message_hint == HINT
    master.execute("CREATE FUNCTION add_index() RETURNS void LANGUAGE sql AS 'CREATE INDEX t_v ON t (v)'")
    with pytest.raises(psycopg2.Error, match="cannot log this CREATE INDEX: it ran inside another statement"):
        master.execute("SELECT add_index()")
    assert columns(master) == ["id", "v"] and indexes(master) == ["t_pkey"] and logged_statements(master) == []


def test_py_log_sql_logs_once_ddl_off_logs_nothing_and_replay_fires_nothing(captured):
    master, slave = captured
    master.execute("SELECT py_log_sql('ALTER TABLE public.t ADD COLUMN a int')")
    master.execute("SELECT py_log_sql_only('CREATE INDEX t_v ON public.t (v)')")
    assert logged_statements(master) == ["ALTER TABLE public.t ADD COLUMN a int", "CREATE INDEX t_v ON public.t (v)"]
    # what a daemon's replay looks like: the event triggers (ENABLE ORIGIN) do not fire
    with contextlib.closing(master.connect()) as conn, conn.cursor() as cur:
        cur.execute("SET session_replication_role = replica")
        cur.execute("ALTER TABLE t ADD COLUMN b int")
    assert master.scalar("SELECT pyreplica.set_option('ddl', 'off')") == (
        "ddl = off (DDL is not logged: run it on every slave, or through py_log_sql)")
    master.execute("ALTER TABLE t ADD COLUMN c int")
    master.execute("CREATE INDEX t_c ON t (c)")
    master.execute("DROP TABLE t")
    assert len(logged_statements(master)) == 2
    # ... and the slave's own replay of a statement with ddl = on there logs nothing either
    slave.install_master()
    slave.execute("SELECT py_log_create_tg('t')")
    slave.execute("SELECT pyreplica.set_option('ddl', 'on')")
    with Daemon(master, slave, name="s1") as daemon:
        wait_until(lambda: "a" in columns(slave), message="the ALTER TABLE on the slave")
    assert "error at event" not in daemon.final_output, daemon.final_output
    assert logged_statements(slave) == []


def test_drop_table_of_a_captured_table_is_logged(captured):
    master, slave = captured
    master.execute("CREATE TABLE other (id int PRIMARY KEY); CREATE INDEX other_id ON other (id)")
    master.execute("DROP INDEX other_id")
    master.execute("DROP TABLE other")
    master.execute("DROP TABLE t")
    assert logged_statements(master) == ["DROP TABLE t"]
    with Daemon(master, slave, name="s1"):
        wait_until(lambda: slave.scalar("SELECT to_regclass('t') IS NULL"), message="DROP TABLE on the slave")


def test_concurrently_is_not_logged_and_says_what_to_do(captured):
    master, _ = captured
    with contextlib.closing(master.connect()) as conn, conn.cursor() as cur:
        cur.execute("CREATE INDEX CONCURRENTLY t_v ON t (v)")
        assert [n.splitlines()[0] for n in conn.notices] == [
            "WARNING:  pyreplica: CREATE INDEX CONCURRENTLY is not logged for the slaves (they replay inside a "
            "transaction, where it cannot run)"]
    assert indexes(master) == ["t_pkey", "t_v"] and logged_statements(master) == []


def test_enabling_or_disabling_triggers_is_not_logged_and_replay_goes_on(captured):
    # a DBA disables the capture triggers for a bulk load: the slaves have no such triggers, so
    # replaying the statement there would stop replication; a trigger's state is each node's own
    master, slave = captured
    with Daemon(master, slave, name="trg") as daemon:
        with contextlib.closing(master.connect()) as conn, conn.cursor() as cur:
            cur.execute("ALTER TABLE t DISABLE TRIGGER t_replica_tg_u")
            cur.execute("ALTER TABLE t ENABLE ALWAYS TRIGGER t_replica_tg_u")
            cur.execute("alter table t enable trigger all")
            assert [n.splitlines()[0] for n in conn.notices] == [
                "WARNING:  pyreplica: ALTER TABLE ... ENABLE/DISABLE TRIGGER is not logged for the slaves (a "
                "trigger's state is each node's own, and pyreplica's capture triggers are only on the master)"] * 3
            with pytest.raises(psycopg2.errors.RaiseException, match="in an ALTER TABLE of its own"):
                cur.execute("ALTER TABLE t ADD COLUMN w numeric(10, 2), DISABLE TRIGGER t_replica_tg_u")
        assert logged_statements(master) == []
        # read as the words say: a column renamed to "trigger" is no trigger's state
        readings = [master.scalar("SELECT pyreplica.py_log_ddl_reading(%s, 'ALTER TABLE')", (text,)) for text in (
            "ALTER TABLE t RENAME COLUMN enable TO trigger", "ALTER TABLE t DISABLE REPLICA TRIGGER x",
            "ALTER TABLE t ENABLE ALWAYS TRIGGER x, ADD COLUMN c numeric(10, 2)")]
        assert readings == ["ok", "triggers", "triggers and more"]
        master.execute("INSERT INTO t VALUES (1, 'a')")
        wait_identical(master, slave, ["t"])
        assert "error" not in daemon.output.lower(), daemon.output


def test_a_role_that_is_not_a_superuser_is_refused(captured):
    master, _ = captured
    master.execute("CREATE ROLE ddl_owner_%s LOGIN" % master.name)
    role = "ddl_owner_%s" % master.name
    master.execute(f"ALTER TABLE t OWNER TO {role}")
    master.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
    assert logged_statements(master) == ["ALTER TABLE t OWNER TO " + role]
    try:
        with contextlib.closing(master.cluster.connect(master.name, user=role)) as conn, conn.cursor() as cur:
            with pytest.raises(psycopg2.Error) as caught:
                cur.execute("ALTER TABLE t ADD COLUMN a int")
            cur.execute("CREATE TABLE mine (id int PRIMARY KEY)")       # not captured: none of our business
        assert caught.value.diag.message_primary == (
            "pyreplica: ddl = on logs only a superuser's DDL of a captured table (the slaves run it as the daemon's "
            f"role); role {role} is not a superuser")
        assert columns(master) == ["id", "v"] and len(logged_statements(master)) == 1
    finally:
        master.execute("ALTER TABLE t OWNER TO postgres")
        master.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_capture_new_tables_creates_and_fills_them_on_the_slave(captured):
    master, slave = captured
    assert master.scalar("SELECT pyreplica.set_option('capture_new_tables', 'ON')") == (
        "capture_new_tables = on (a table created with a primary key is captured at once)")
    with Daemon(master, slave, name="s1", keepalive=1) as daemon:
        with writer_on_t(master):
            wait_until(lambda: slave.scalar("SELECT count(*) FROM t") > 20, message="first rows on the slave")
            with pytest.raises(psycopg2.Error, match="pyreplica: ddl = on needs the schema of a new table in CREATE TABLE"):
                master.execute("CREATE TABLE n (id serial PRIMARY KEY, v text)")
            master.execute("CREATE TABLE public.n (id serial PRIMARY KEY, v text)")
            master.execute("INSERT INTO n (v) SELECT 'row ' || i FROM generate_series(1, 50) i")
            with contextlib.closing(master.connect()) as conn, conn.cursor() as cur:
                cur.execute("CREATE TABLE IF NOT EXISTS public.no_pk (v text)")
                assert [n.splitlines()[0] for n in conn.notices] == [
                    "WARNING:  pyreplica: new table public.no_pk is not captured (capture_new_tables = on): table no_pk "
                    "has no pk constraint (couldn't be replicated)!"]
            wait_until(lambda: slave.scalar("SELECT to_regclass('n') IS NOT NULL"), message="table n on the slave")
            wait_identical(master, slave, ["n"])
        wait_identical(master, slave, ["n", "t"])
    assert slave.scalar("SELECT count(*) FROM n") == 50
    assert slave.scalar("SELECT to_regclass('no_pk') IS NULL")
    assert master.scalar("SELECT pyreplica.py_log_is_captured('n')")
    assert "error at event" not in daemon.final_output, daemon.final_output


def test_settings_validation_and_an_older_install_upgrades(master):
    with pytest.raises(psycopg2.Error) as caught:
        master.execute("SELECT pyreplica.set_option('dll', 'on')")
    assert caught.value.diag.message_primary == 'pyreplica: unknown setting "dll"'
    assert caught.value.diag.message_hint == "Settings: cascade, ddl, capture_new_tables (each on or off)."
    with pytest.raises(psycopg2.Error) as caught:
        master.execute("SELECT pyreplica.set_option('ddl', 'yes')")
    assert caught.value.diag.message_primary == 'pyreplica: setting ddl must be on or off, not "yes"'
    assert [master.scalar("SELECT pyreplica.option(%s)", (s,)) for s in ("cascade", "ddl", "capture_new_tables")] \
        == ["off", "off", "off"]
    # an install of the previous release: its CHECK knows cascade only
    master.execute("ALTER TABLE pyreplica.settings DROP CONSTRAINT settings_name_check;"
                   "ALTER TABLE pyreplica.settings ADD CONSTRAINT settings_name_check CHECK (name IN ('cascade'))")
    master.execute("INSERT INTO pyreplica.settings (name, value) VALUES ('cascade', 'off')")
    master.install_master()
    master.execute("SELECT pyreplica.set_option('ddl', 'on')")
    master.execute("SELECT pyreplica.set_option('capture_new_tables', 'on')")
    assert master.execute("SELECT name, value FROM pyreplica.settings ORDER BY name") == [
        ("capture_new_tables", "on"), ("cascade", "off"), ("ddl", "on")]
    # a re-run changes nothing (the constraint is not made again)
    before = master.scalar("SELECT xmin::text FROM pg_constraint WHERE conname = 'settings_name_check'")
    master.install_master()
    assert master.scalar("SELECT xmin::text FROM pg_constraint WHERE conname = 'settings_name_check'") == before
    assert master.scalar("SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'py_log_replica_ddl%'") == 3
