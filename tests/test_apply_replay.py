"""Replay on the slave (docs/design.md §6) against real servers: exact types in the UPDATE fast path,
failures returned as data and worded once, TRUNCATE of exactly the master's tables, connection
settings that no database default can change, and a slave schema a role without CREATE can use."""
import contextlib
import decimal
import time

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pyreplica import apply, db
from pyreplica.batch import Event
from pyreplica.db import ReplicaError, connect
from replication import Daemon, conf_daemon, create_on_both, wait_identical, wait_until

pytestmark = pytest.mark.usefixtures("group_small_chunks")

TYPED_DDL = """
CREATE TABLE typed (k3 char(3), kn numeric(6,2), kv varchar(5), note text, PRIMARY KEY (k3, kn, kv));
CREATE TABLE plain (id int PRIMARY KEY, c char(5), ca char(3)[], v varchar(5), n numeric(8,3));
CREATE TABLE bits (k bit(4) PRIMARY KEY, b bit(3), v text);
"""
TYPED = ["typed", "plain", "bits"]


def test_consecutive_updates_keep_char_bit_varchar_and_numeric_exact(master, slave):
    """Merged into one UPDATE ... FROM (VALUES ...) on the slave: char(n) must not become char(1)
    ('hello' arriving as 'h', char(3) keys 'abc'/'xyz' matching rows 'a'/'x' with the row count
    still right), nor char(n)[] be cut, nor bit(n) fail."""
    create_on_both(master, slave, TYPED_DDL, TYPED)
    master.execute("""INSERT INTO typed SELECT k, 1.5, 'kv', '' FROM unnest(ARRAY['a', 'abc', 'x', 'xyz']) k""")
    master.execute("INSERT INTO plain SELECT g, 'c', '{x}', 'v', 0 FROM generate_series(1, 5) g")
    master.execute("INSERT INTO bits SELECT g::bit(4), B'000', '' FROM generate_series(0, 15) g")
    with Daemon(master, slave, name="typed") as daemon:
        wait_identical(master, slave, TYPED)
        # each statement: consecutive single-row UPDATEs setting the same columns on distinct keys
        master.execute("UPDATE typed SET note = k3 || '!' WHERE k3 IN ('abc', 'xyz')")
        master.execute("""UPDATE plain SET c = 'hello', ca = ARRAY['abc', 'de', NULL], v = 'hi''\\',
                                           n = 12345.678 / id""")
        master.execute("UPDATE bits SET b = B'101', v = k::text")
        wait_identical(master, slave, TYPED)
        for table in TYPED:
            assert slave.table_rows(table) == master.table_rows(table)
        assert dict(slave.execute("SELECT k3, note FROM typed")) == {"a  ": "", "abc": "abc!", "x  ": "", "xyz": "xyz!"}
        assert slave.execute("SELECT c, ca::text, v, n FROM plain WHERE id = 1") == [
            ("hello", '{abc,"de ",NULL}', "hi'\\", decimal.Decimal("12345.678"))]
        assert "conflict" not in daemon.output and "error at event" not in daemon.output, daemon.output


def in_session(db, settings, statement):
    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        cur.execute(settings)
        cur.execute(statement)


def test_one_key_written_by_sessions_of_other_time_zones_or_bytea_output_is_one_row(master, slave):
    """Grouping knows a row by its key's text: the capture must write one text per value, whatever
    the writer's TimeZone or bytea_output, or the same row's UPDATEs pass each other (silently)."""
    create_on_both(master, slave, "CREATE TABLE ev (k timestamptz PRIMARY KEY, v text, w text); "
                                  "CREATE TABLE bk (k bytea PRIMARY KEY, v text, w text)", ["ev", "bk"])
    master.execute("INSERT INTO ev SELECT '2024-01-01 00:00+00'::timestamptz + g * interval '1 hour', '0', '0' "
                   "FROM generate_series(0, 29) g; "
                   "INSERT INTO bk SELECT int4send(g), '0', '0' FROM generate_series(0, 29) g")
    with Daemon(master, slave, name="keys"):
        wait_identical(master, slave, ["ev", "bk"])
    for table, key, first, other in [("ev", "'2024-01-02 01:00+00'", "SET TimeZone = 'UTC'", "SET TimeZone = 'Asia/Kolkata'"),
                                     ("bk", "int4send(25)", "SET bytea_output = 'hex'", "SET bytea_output = 'escape'")]:
        in_session(master, first, f"UPDATE {table} SET v = 'a' WHERE k < {key}")    # 25 events: grouped
        in_session(master, other, f"UPDATE {table} SET v = 'b', w = 'b' WHERE k = {key}")
        in_session(master, first, f"UPDATE {table} SET v = 'c' WHERE k = {key}")
        assert master.scalar(f"SELECT v || w FROM {table} WHERE k = {key}") == "cb"
    with Daemon(master, slave, name="keys"):
        wait_identical(master, slave, ["ev", "bk"])


def test_one_row_written_through_its_partition_and_through_the_parent_keeps_its_order(master, slave):
    """The log names the table written to: public.pp or public.pp_a for one row. Grouping must know
    them for one row, or that row's UPDATEs pass each other (silently)."""
    create_on_both(master, slave, """CREATE TABLE pp (id int, region text, v text, PRIMARY KEY (id, region))
                                          PARTITION BY LIST (region);
                                     CREATE TABLE pp_a PARTITION OF pp FOR VALUES IN ('a')""", ["pp"])
    master.execute("INSERT INTO pp SELECT g, 'a', '0' FROM generate_series(1, 30) g")
    with Daemon(master, slave, name="parts"):
        wait_identical(master, slave, ["pp"])
    master.execute("UPDATE pp SET v = 'app' WHERE id <= 20")        # 20 events: grouped
    master.execute("UPDATE pp_a SET v = 'batch' WHERE id = 25")
    master.execute("UPDATE pp SET v = 'app-last' WHERE id = 25")
    with Daemon(master, slave, name="parts"):
        wait_identical(master, slave, ["pp"])
    assert slave.scalar("SELECT v FROM pp WHERE id = 25") == "app-last"


# -- apply_chunk on a slave database, without a daemon ------------------------------------------

@contextlib.contextmanager
def slave_session(slave, ddl):
    slave.execute(ddl)
    conn = connect(slave.dsn, "slave")
    conn.autocommit = True
    apply.install(conn)
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            apply.start_session(cur)
            yield cur
    finally:
        conn.close()


def events(*items, txid="500"):
    return [Event(i, txid, "public.t", op, sql, "postgres") for i, (op, sql) in enumerate(items, 1)]


def test_a_key_matching_two_rows_is_a_conflict_even_in_the_update_fast_path(slave):
    """A slave without the primary key: the merged UPDATE's total row count (2) would hide that
    one UPDATE matched no row and the other two; each must match exactly one."""
    with slave_session(slave, "CREATE TABLE t (id int, v text)") as cur:
        cur.execute("INSERT INTO t VALUES (2, 'x'), (2, 'y')")
        chunk = events(("U", "UPDATE public.t SET v = 'a' WHERE id = '1'"),
                       ("U", "UPDATE public.t SET v = 'b' WHERE id = '2'"))
        with pytest.raises(apply.ApplyError) as failure:
            apply.apply_chunk(cur, chunk)
        assert str(failure.value).splitlines()[0] == (
            "conflict at event 1 (UPDATE on public.t): the UPDATE matched 0 rows on the slave, expected 1 "
            "(the slave's table has no primary key)")
        assert failure.value.conflict and failure.value.code == "PR001"
        assert failure.value.event == chunk[0]
        # the chunk is undone, the transaction still usable
        cur.execute("SELECT v FROM t ORDER BY v")
        assert cur.fetchall() == [("x",), ("y",)]


def test_failure_is_data_with_detail_and_hint_and_names_the_key_not_the_row(slave):
    ddl = "CREATE TABLE t (id int PRIMARY KEY, card text CHECK (card NOT LIKE '4111%'))"
    with slave_session(slave, ddl) as cur:
        cur.execute("INSERT INTO t VALUES (5, 'slave')")
        apply.apply_chunk(cur, events(("I", "INSERT INTO public.t (id, card) VALUES (1, 'ok')")))
        chunk = [Event(10, "501", "public.t", "I", "INSERT INTO public.t (id, card) VALUES (2, 'a')", "postgres"),
                 Event(11, "501", "public.t", "I", "INSERT INTO public.t (id, card) VALUES (5, 'b')", "postgres")]
        with pytest.raises(apply.ApplyError) as failure:
            apply.apply_chunk(cur, chunk)
        assert str(failure.value) == (
            'error at event 11 (INSERT on public.t): duplicate key value violates unique constraint "t_pkey" '
            "(primary key: id)\n  DETAIL: Key (id)=(5) already exists.")
        assert failure.value.code == "23505" and failure.value.conflict
        assert failure.value.detail == "Key (id)=(5) already exists."

        card = Event(12, "502", "public.t", "I", "INSERT INTO public.t (id, card) VALUES (3, '4111111111111111')",
                     "postgres")
        for level, shown in ((0, False), (1, False), (2, True)):
            with pytest.raises(apply.ApplyError) as failure:
                apply.apply_chunk(cur, [card], debug_level=level)
            assert str(failure.value).startswith(
                'error at event 12 (INSERT on public.t): new row for relation "t" violates check constraint '
                '"t_card_check" (primary key: id)')
            assert ("4111111111111111" in str(failure.value)) is shown, str(failure.value)
            assert "Failing row contains (3, 4111111111111111)." == failure.value.detail
        # a slave whose lc_messages is not English: the row is known by the SQLSTATE
        statement = apply.Statement(12, "I", "public.t", card.sql, 1)
        german = apply._apply_error(cur, statement, [card], "23514", "neue Zeile für Relation »t« verletzt "
                                    "Check-Constraint »t_card_check«", "Fehlgeschlagene Zeile enthält "
                                    "(3, 4111111111111111).", None, 1)
        assert "4111111111111111" not in str(german) and german.detail.endswith("(3, 4111111111111111).")
        # the first chunk stays applied, the failed ones are gone, the transaction goes on
        cur.execute("SELECT id FROM t ORDER BY id")
        assert cur.fetchall() == [(1,), (5,)]


def test_install_needs_no_create_once_the_schema_is_current_and_refuses_a_schema_another_role_owns(slave):
    slave.execute("CREATE ROLE pr_apply_owner LOGIN; CREATE ROLE pr_apply_user LOGIN")

    def connect_as(role):
        conn = psycopg2.connect(slave.cluster.dsn(slave.name, user=role))
        conn.autocommit = True
        return contextlib.closing(conn)
    try:
        slave.execute(f"REVOKE CREATE ON DATABASE {slave.name} FROM PUBLIC; "
                      "CREATE SCHEMA pyreplica AUTHORIZATION pr_apply_owner")
        # the schema's owner, without CREATE on the database, installs into it
        with connect_as("pr_apply_owner") as conn:
            apply.install(conn)
            assert apply.read_position(conn, "nobody") is None
        # another ordinary role's schema: its owner could run code as this role (a planted apply_events)
        slave.execute("GRANT USAGE ON SCHEMA pyreplica TO pr_apply_user")
        with connect_as("pr_apply_user") as conn, pytest.raises(ReplicaError) as refused:
            apply.install(conn)
        assert str(refused.value).startswith("the slave's schema pyreplica holds schema pyreplica owned by "
                                             "pr_apply_owner; ")
        assert ("function pyreplica.apply_events(bigint[],text[],text[],text[],integer[]) owned by pr_apply_owner"
                in str(refused.value))
        # a role that may create nothing works once it is current: install executes nothing
        slave.execute("REASSIGN OWNED BY pr_apply_owner TO CURRENT_USER")
        with connect_as("pr_apply_user") as conn:
            apply.install(conn)
        # an outdated function (no version marker) is replaced by its owner
        slave.execute("COMMENT ON FUNCTION pyreplica.apply_events(bigint[], text[], text[], text[], int[]) IS NULL")
        with connect_as("pr_apply_user") as conn, pytest.raises(psycopg2.errors.InsufficientPrivilege):
            apply.install(conn)
        with contextlib.closing(slave.connect()) as conn:
            apply.install(conn)
        assert slave.scalar("SELECT obj_description('pyreplica.apply_events(bigint[], text[], text[], text[], "
                            "int[])'::regprocedure, 'pg_proc')") == apply.SLAVE_SCHEMA_VERSION
    finally:
        slave.execute("DROP SCHEMA IF EXISTS pyreplica CASCADE; DROP ROLE pr_apply_owner; DROP ROLE pr_apply_user")


# -- TRUNCATE -------------------------------------------------------------------------------------

FK_DDL = """
CREATE TABLE a (id int PRIMARY KEY);
CREATE TABLE b (id int PRIMARY KEY, a_id int REFERENCES a);
"""


def test_truncate_replays_linked_tables_together_and_never_empties_a_slave_only_table(master, slave):
    create_on_both(master, slave, FK_DDL, ["a", "b"])
    master.execute("INSERT INTO a VALUES (1), (2); INSERT INTO b VALUES (1, 1)")
    with Daemon(master, slave, name="tr") as daemon:
        wait_identical(master, slave, ["a", "b"])
        master.execute("TRUNCATE a, b")
        master.execute("INSERT INTO a VALUES (3)")
        wait_identical(master, slave, ["a", "b"])
        # a table only the slave has, referencing a replicated one
        slave.execute("CREATE TABLE mine (id int PRIMARY KEY, a_id int REFERENCES a); INSERT INTO mine VALUES (7, 3)")
        master.execute("TRUNCATE a CASCADE")
        event = master.scalar("SELECT max(id) FROM replica_log WHERE op = 'T' AND relname = 'public.a'")
        daemon.wait_for_output(f"error at event {event} (TRUNCATE on public.a, public.b): cannot truncate a table "
                               f"referenced in a foreign key constraint")
        daemon.wait_for_output('DETAIL: Table "mine" references "a".')
        assert slave.execute("SELECT * FROM mine") == [(7, 3)]
        assert slave.execute("SELECT id FROM a") == [(3,)]
        slave.execute("ALTER TABLE mine DROP CONSTRAINT mine_a_id_fkey")
        wait_identical(master, slave, ["a", "b"], timeout=90)
        assert slave.execute("SELECT * FROM mine") == [(7, 3)]


# -- connection settings no database default can change ----------------------------------------

TEXT_DDL = "CREATE TABLE t (id int PRIMARY KEY, v text, b bytea)"


def write_awkward_values(master, start):
    with contextlib.closing(master.connect(client_encoding="UTF8")) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (%s, %s, %s), (%s, %s, %s)",
                    (start, "C:\\new\\table", psycopg2.Binary(b"\\x00\x00\xff'\\"),
                     start + 1, "é ß 漢 😀 ' \\\\", psycopg2.Binary(b"")))
        cur.execute("UPDATE t SET v = v || %s WHERE id = %s", ("\\t", start))


def test_slave_with_standard_conforming_strings_off_gets_backslashes_and_bytea_exactly(master, slave):
    create_on_both(master, slave, TEXT_DDL, ["t"])
    slave.execute(f"ALTER DATABASE {slave.name} SET standard_conforming_strings = off")
    master.execute(f"ALTER DATABASE {master.name} SET standard_conforming_strings = off")
    write_awkward_values(master, 1)
    with Daemon(master, slave, name="scs") as daemon:
        wait_identical(master, slave, ["t"])
        write_awkward_values(master, 10)
        wait_identical(master, slave, ["t"])
        assert slave.scalar("SELECT v FROM t WHERE id = 1") == "C:\\new\\table\\t"
        assert "error" not in daemon.output.lower(), daemon.output


@pytest.mark.parametrize("side", ["master", "slave"])
def test_a_latin1_client_encoding_default_on_either_side_replicates(master, slave, side):
    create_on_both(master, slave, TEXT_DDL, ["t"])
    db = master if side == "master" else slave
    db.execute(f"ALTER DATABASE {db.name} SET client_encoding = 'LATIN1'")
    write_awkward_values(master, 1)
    with Daemon(master, slave, name="enc") as daemon:
        wait_identical(master, slave, ["t"])
        write_awkward_values(master, 10)
        wait_identical(master, slave, ["t"])
        assert "Traceback" not in daemon.output and "error" not in daemon.output.lower(), daemon.output


def test_null_array_elements_stay_null_on_a_slave_with_array_nulls_off(master, slave):
    # array_nulls = off reads an unquoted NULL in an array literal as the string 'NULL'
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, tags text[], ns int[])", ["t"])
    slave.execute(f"ALTER DATABASE {slave.name} SET array_nulls = off")
    master.execute("INSERT INTO t VALUES (1, ARRAY[NULL, 'NULL', 'x'], ARRAY[1, NULL]), (2, '{}', NULL)")
    with Daemon(master, slave, name="arraynulls") as daemon:
        wait_until(lambda: slave.scalar("SELECT count(*) FROM t") == 2, timeout=20, message="rows on the slave")
        master.execute("UPDATE t SET tags = ARRAY['NULL', NULL] WHERE id = 2")
        wait_identical(master, slave, ["t"], timeout=20)
        assert slave.scalar("SELECT tags[1] IS NULL AND tags[2] = 'NULL' AND ns[2] IS NULL FROM t WHERE id = 1")
        assert "error" not in daemon.output.lower(), daemon.output


def test_quote_all_identifiers_on_the_master_changes_no_table_name_in_the_log(master, slave, tmp_path):
    # an application session that quotes every identifier it prints: the log must still name its
    # tables as the daemon's TABLES patterns and the slave's table states do
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE u (id int PRIMARY KEY)",
                   ["t", "u"])
    master.execute(f"ALTER DATABASE {master.name} SET quote_all_identifiers = on")
    master.execute("INSERT INTO t VALUES (1, 'a'); INSERT INTO u VALUES (1)")
    master.execute("UPDATE t SET v = 'b'; DELETE FROM u; TRUNCATE u")
    assert master.scalar("SELECT array_agg(DISTINCT relname ORDER BY relname) FROM pyreplica.replica_log") == \
        ["public.t", "public.u"]
    # nor does it make the DDL trigger take a captured table's signature for changed: an index
    # created in such a session leaves the capture triggers alone (re-creating them locks the table)
    triggers = "SELECT array_agg(oid ORDER BY tgname) FROM pg_trigger WHERE tgrelid = 't'::regclass"
    before = master.scalar(triggers)
    master.execute("CREATE INDEX t_v ON t (v)")
    assert master.scalar(triggers) == before
    with conf_daemon(master, slave, tmp_path, TABLES="public.t") as daemon:
        wait_identical(master, slave, ["t"], timeout=20)
        assert daemon.stop() == 0


def test_guards_newer_servers_know_are_set_once_connected_and_only_there(master, monkeypatch):
    # transaction_timeout (PostgreSQL 17) cannot be a startup option: PostgreSQL 14-16 would refuse
    # the connection. The same mechanism, shown with parameters this server has, set from a version on:
    monkeypatch.setattr(db, "NEWER_SESSION_DEFAULTS", {"work_mem": (master_version(master), "4242kB"),
                                                       "maintenance_work_mem": (990000, "7777kB")})
    master.execute(f"ALTER DATABASE {master.name} SET work_mem = '1MB'")
    with contextlib.closing(connect(master.dsn, "master")) as conn:
        assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('work_mem'), current_setting('maintenance_work_mem') <> '7777kB'")
            assert cur.fetchone() == ("4242kB", True)
    # a command's own setting still wins
    with contextlib.closing(connect(master.dsn, "master", settings={"work_mem": "2MB"})) as conn:
        with conn.cursor() as cur:
            cur.execute("SHOW work_mem")
            assert cur.fetchone() == ("2MB",)


def master_version(master):
    return int(master.scalar("SHOW server_version_num"))


# A replica trigger that makes applying one statement on the slave take half a second.
SLOW_APPLY = """
CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END$$;
CREATE TRIGGER slow AFTER INSERT OR UPDATE ON t FOR EACH STATEMENT EXECUTE FUNCTION slow();
ALTER TABLE t ENABLE REPLICA TRIGGER slow;
"""


def test_timeouts_and_read_only_set_as_database_defaults_stop_no_batch(master, slave):
    # a DBA's guards against runaway application sessions, set on both databases: a batch that takes
    # longer would be cancelled on the slave, or lose its master session idle in transaction while
    # the slave applies, at every retry (stuck for good); the sleeping listener would be cut off
    create_on_both(master, slave, TEXT_DDL, ["t"])
    slave.execute(SLOW_APPLY)
    for setting in ("statement_timeout = '200ms'", "lock_timeout = '100ms'",
                    "idle_in_transaction_session_timeout = '200ms'", "idle_session_timeout = '300ms'"):
        for db in (master, slave):
            db.execute(f"ALTER DATABASE {db.name} SET {setting}")
    # a slave kept read-only for its applications: the replicator still writes it
    slave.execute(f"ALTER DATABASE {slave.name} SET default_transaction_read_only = on")
    write_awkward_values(master, 1)
    with Daemon(master, slave, name="timeouts") as daemon:
        wait_identical(master, slave, ["t"], timeout=20)
        time.sleep(1.5)         # asleep, waiting for NOTIFY, longer than idle_session_timeout
        write_awkward_values(master, 10)
        wait_identical(master, slave, ["t"], timeout=20)
        assert "error" not in daemon.output.lower() and "lost" not in daemon.output.lower(), daemon.output


def test_connect_keeps_the_users_options_and_adds_settings(slave):
    for dsn in (slave.dsn + " options='-c work_mem=1234kB'",
                f"postgresql://postgres@127.0.0.1:{slave.cluster.port}/{slave.name}?options=-c%20work_mem%3D1234kB"):
        with contextlib.closing(connect(dsn, "slave", settings={"search_path": '"odd path", public'})) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT current_setting('work_mem'), current_setting('search_path'), "
                            "current_setting('standard_conforming_strings'), current_setting('client_encoding')")
                assert cur.fetchone() == ("1234kB", '"odd path", public', "on", "UTF8")


# -- grouped replay (apply.group) ----------------------------------------------------------------

GROUPED_DDL = """
CREATE TABLE t (id int PRIMARY KEY, v text, c char(4));
CREATE TABLE u (a text, b int, v text, PRIMARY KEY (a, b));
"""


def capture(relname, op, key, values=None):
    """A statement as the capture writes it: every literal quoted (quote_literal)."""
    lit = lambda value: "NULL" if value is None else "'" + str(value).replace("'", "''") + "'"
    where = " AND ".join(f"{column} = {lit(value)}" for column, value in key.items())
    if op == "I":
        row = {**key, **values}
        return f"INSERT INTO {relname} ({', '.join(row)}) VALUES ({', '.join(map(lit, row.values()))})"
    if op == "U":
        return f"UPDATE {relname} SET {', '.join(f'{c} = {lit(v)}' for c, v in values.items())} WHERE {where}"
    return f"DELETE FROM {relname} WHERE {where}"


def capture_events(*items, first=1, txid="500"):
    """items: (relname, op, key dict, values dict) or (relname, 'T') for a TRUNCATE."""
    out = []
    for i, item in enumerate(items, first):
        sql = f"TRUNCATE {item[0]}" if item[1] == "T" else capture(*item)
        out.append(Event(i, txid, item[0], item[1], sql, "postgres"))
    return out


def rows(cur, table):
    cur.execute(f"SELECT t::text FROM {table} t ORDER BY 1")
    return [r[0] for r in cur.fetchall()]


def test_grouped_replay_of_mixed_tables_repeated_keys_a_key_change_and_a_truncate(slave):
    """Interleaved events of two tables in one chunk: a key updated twice, inserted and deleted again,
    a primary-key change, a TRUNCATE between groups; the slave ends exactly as the master did."""
    chunk = capture_events(
        ("public.t", "I", {"id": 1}, {"v": "a", "c": "x"}), ("public.u", "I", {"a": "k", "b": 1}, {"v": "u1"}),
        ("public.t", "I", {"id": 2}, {"v": "b", "c": None}), ("public.t", "U", {"id": 1}, {"v": "a2"}),
        ("public.u", "I", {"a": "it's", "b": 2}, {"v": "u2"}), ("public.t", "U", {"id": 2}, {"v": "b2"}),
        ("public.t", "U", {"id": 1}, {"v": "a3", "c": "yy"}), ("public.t", "D", {"id": 2}),
        ("public.t", "I", {"id": 2}, {"v": "b again", "c": "z"}), ("public.u", "T"),
        ("public.u", "I", {"a": "k", "b": 1}, {"v": "after truncate"}),
        ("public.t", "U", {"id": 2}, {"id": 20}), ("public.t", "U", {"id": 20}, {"v": "b moved"}),
        ("public.t", "I", {"id": 3}, {"v": "c", "c": "w"}), ("public.t", "D", {"id": 1}))
    with slave_session(slave, GROUPED_DDL) as cur:
        statements = apply.plan(chunk, apply.slave_tables(cur))
        assert len(statements) < len(chunk) and any(s.merged for s in statements)
        apply.apply_chunk(cur, chunk)
        assert rows(cur, "t") == ['(20,"b moved","z   ")', '(3,c,"w   ")']     # char(4) padded
        assert rows(cur, "u") == ['(k,1,"after truncate")']


@pytest.mark.parametrize("op", ["U", "D", "I"])
def test_a_conflict_in_the_middle_of_a_group_names_the_exact_event_and_undoes_the_chunk(slave, op):
    failing = {"U": ("public.t", "U", {"id": 99}, {"v": "nobody"}),     # matches no row
               "D": ("public.t", "D", {"id": 99}),
               "I": ("public.t", "I", {"id": 7}, {"v": "taken"})}[op]   # the slave has row 7 already
    words = {"U": "the UPDATE matched 0 rows on the slave, expected 1",
             "D": "the DELETE matched 0 rows on the slave, expected 1",
             "I": 'duplicate key value violates unique constraint "t_pkey"'}[op]
    with slave_session(slave, GROUPED_DDL) as cur:
        cur.execute("INSERT INTO t SELECT g, 'slave', NULL FROM generate_series(1, 7) g")
        before = rows(cur, "t")
        chunk = capture_events(("public.t", "U", {"id": 1}, {"v": "x"}), ("public.t", "D", {"id": 2}),
                               ("public.t", "I", {"id": 10}, {"v": "new"}), ("public.t", "U", {"id": 3}, {"v": "y"}),
                               ("public.t", "D", {"id": 4}), ("public.t", "I", {"id": 11}, {"v": "new"}),
                               failing,
                               ("public.t", "U", {"id": 5}, {"v": "z"}), ("public.t", "D", {"id": 6}),
                               ("public.t", "I", {"id": 12}, {"v": "new"}), first=41)
        grouped = {"U": [4, 3, 3], "D": [3, 4, 3], "I": [3, 3, 4]}[op]    # U, D, I: one statement each
        assert [s.rows for s in apply.plan(chunk, apply.slave_tables(cur))] == grouped
        with pytest.raises(apply.ApplyError) as failure:
            apply.apply_chunk(cur, chunk)
        verb = apply.VERBS[op]
        assert str(failure.value).splitlines()[0] == f"{'error' if op == 'I' else 'conflict'} at event 47 ({verb} on public.t): {words} (primary key: id)"
        assert failure.value.event == chunk[6] and failure.value.conflict
        assert rows(cur, "t") == before     # nothing of the chunk stays


def test_two_events_on_one_key_spelled_differently_are_caught_by_the_row_counts(slave):
    """numeric keys 1.0 and 1.00 are one row: the grouped UPDATE touches it once, so one event counts
    no row and the chunk is replayed in order, where each UPDATE matches it: no conflict, master's result."""
    with slave_session(slave, "CREATE TABLE t (id numeric PRIMARY KEY, v text)") as cur:
        cur.execute("INSERT INTO t VALUES (1.0, 'slave')")
        chunk = capture_events(("public.t", "U", {"id": "1.0"}, {"v": "first"}),
                               ("public.t", "U", {"id": "1.00"}, {"v": "second"}))
        assert [s.rows for s in apply.plan(chunk, apply.slave_tables(cur))] == [2]
        apply.apply_chunk(cur, chunk)
        assert rows(cur, "t") == ["(1.0,second)"]


# -- property: grouped replay equals the master ----------------------------------------------------

@st.composite
def histories(draw):
    """Random I/U/D (and key changes, TRUNCATEs) on a few keys of two tables, as a master could log
    them: each event valid on the master's table at its point. Returns (events, final tables)."""
    tables = {"public.t": {}, "public.u": {}}
    items = []
    for _ in range(draw(st.integers(1, 60))):
        relname = draw(st.sampled_from(sorted(tables)))
        table = tables[relname]
        key = draw(st.integers(1, 5))
        choice = draw(st.sampled_from(["write", "write", "write", "key change", "truncate"]))
        value = draw(st.sampled_from(["a", "b", "it's", "c\\d", None]))
        if choice == "truncate":
            items.append((relname, "T"))
            table.clear()
        elif key not in table:
            items.append((relname, "I", {"id": key}, {"v": value}))
            table[key] = value
        elif choice == "key change" and (key + 5) not in table:
            items.append((relname, "U", {"id": key}, {"id": key + 5}))
            table[key + 5] = table.pop(key)
        elif draw(st.booleans()):
            items.append((relname, "U", {"id": key}, {"v": value}))
            table[key] = value
        else:
            items.append((relname, "D", {"id": key}))
            del table[key]
    # one transaction per event (consecutive TRUNCATEs of one transaction would be one statement)
    events = [e._replace(txid=str(1000 + e.id)) for e in capture_events(*items)]
    return events, tables


PROPERTY_DDL = "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE u (id int PRIMARY KEY, v text);"


@pytest.fixture(scope="module")
def property_slave(slave_cluster):
    from conftest import fresh_db
    db = fresh_db(slave_cluster, "grouped")
    with slave_session(db, PROPERTY_DDL) as cur:
        cur.connection.commit()
    yield db
    slave_cluster.dropdb(db.name)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories(), conflict=st.booleans())
def test_grouped_replay_of_random_histories_equals_the_master(property_slave, history, conflict):
    """Slave == master after the grouped replay; with an event on a row the slave lacks planted at
    a random place, the replay stops at exactly that event and the chunk leaves nothing."""
    events, tables = history
    conn = connect(property_slave.dsn, "slave")
    try:
        with conn.cursor() as cur:
            apply.start_session(cur)
            if conflict:
                place = len(events) // 2
                planted = Event(events[place].id, "1", "public.t", "D", "DELETE FROM public.t WHERE id = '99'",
                                "postgres")
                events = events[:place] + [planted] + [e._replace(id=e.id + 1) for e in events[place:]]
                with pytest.raises(apply.ApplyError) as failure:
                    apply.apply_chunk(cur, events)
                assert failure.value.event == planted and failure.value.conflict
                assert rows(cur, "t") == [] and rows(cur, "u") == []
                return
            apply.apply_chunk(cur, events)
            for relname, table in tables.items():
                cur.execute(f"SELECT id, v FROM {relname} ORDER BY id")
                assert cur.fetchall() == sorted(table.items())
    finally:
        conn.rollback()
        conn.close()


def test_a_table_whose_triggers_or_rules_see_replayed_rows_never_has_its_events_reordered(slave):
    ddl = """
    CREATE TABLE t (id int PRIMARY KEY, v text);
    CREATE TABLE audited (b text, a int, v text, PRIMARY KEY (a, b));
    CREATE TABLE logged (id int PRIMARY KEY, v text);
    CREATE TABLE ruled (id int PRIMARY KEY, v text);
    CREATE TABLE keyless (id int, v text);
    CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
    CREATE TRIGGER audit AFTER UPDATE ON audited FOR EACH ROW EXECUTE FUNCTION note();
    ALTER TABLE audited ENABLE ALWAYS TRIGGER audit;
    CREATE TRIGGER log AFTER UPDATE ON logged FOR EACH ROW EXECUTE FUNCTION note();
    CREATE RULE keep AS ON DELETE TO ruled DO INSTEAD NOTHING;
    CREATE TABLE parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
    CREATE TABLE parted1 PARTITION OF parted FOR VALUES FROM (0) TO (100);
    CREATE TRIGGER audit AFTER UPDATE ON parted1 FOR EACH ROW EXECUTE FUNCTION note();
    ALTER TABLE parted1 ENABLE REPLICA TRIGGER audit;
    """
    with slave_session(slave, ddl) as cur:
        tables = apply.slave_tables(cur)
        assert tables("public.t")[:3] == ({"id": "integer", "v": "text"}, ("id",), True)
        assert tables("public.audited")[:3] == ({"b": "text", "a": "integer", "v": "text"}, ("a", "b"), False)
        assert tables("public.logged").reorder      # an ordinary trigger does not fire in replica mode
        assert not tables("public.ruled").reorder
        assert not tables("public.parted").reorder      # a partition's trigger counts
        assert tables("public.keyless")[:3] == ({"id": "integer", "v": "text"}, (), False)
        # a row is known by its partition tree: a partition and its parent log other names for it
        cur.execute("SELECT 'public.parted'::regclass::oid, 'public.t'::regclass::oid")
        parted, t = cur.fetchone()
        assert tables("public.parted1").root == tables("public.parted").root == parted
        assert tables("public.t").root == t
        assert tables("public.gone") is None
