"""Replay on the slave (docs/design.md §6) against real servers: exact types in the UPDATE fast path,
failures returned as data and worded once, TRUNCATE of exactly the master's tables, connection
settings that no database default can change, and a slave schema a role without CREATE can use."""
import contextlib
import decimal

import psycopg2
import pytest

from pyreplica import apply
from pyreplica.batch import Event
from pyreplica.db import connect
from replication import Daemon, create_on_both, wait_identical

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
        assert failure.value.conflict and failure.value.code == "PR001" and not failure.value.merged
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
        # the first chunk stays applied, the failed ones are gone, the transaction goes on
        cur.execute("SELECT id FROM t ORDER BY id")
        assert cur.fetchall() == [(1,), (5,)]


def test_install_needs_no_create_once_the_schema_is_current(slave):
    slave.execute("CREATE ROLE pr_apply_owner LOGIN; CREATE ROLE pr_apply_user LOGIN")
    try:
        slave.execute(f"REVOKE CREATE ON DATABASE {slave.name} FROM PUBLIC; "
                      "CREATE SCHEMA pyreplica AUTHORIZATION pr_apply_owner")
        # the schema's owner, without CREATE on the database, installs into it
        with contextlib.closing(psycopg2.connect(slave.cluster.dsn(slave.name, user="pr_apply_owner"))) as conn:
            conn.autocommit = True
            apply.install(conn)
            assert apply.read_position(conn, "nobody") is None
        # a role that may create nothing works once it is current: install executes nothing
        slave.execute("GRANT USAGE ON SCHEMA pyreplica TO pr_apply_user")
        with contextlib.closing(psycopg2.connect(slave.cluster.dsn(slave.name, user="pr_apply_user"))) as conn:
            conn.autocommit = True
            apply.install(conn)
        # an outdated function (no version marker) is replaced by its owner
        slave.execute("COMMENT ON FUNCTION pyreplica.apply_events(bigint[], text[], text[], text[], int[]) IS NULL")
        with contextlib.closing(psycopg2.connect(slave.cluster.dsn(slave.name, user="pr_apply_user"))) as conn:
            conn.autocommit = True
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                apply.install(conn)
        with contextlib.closing(psycopg2.connect(slave.cluster.dsn(slave.name, user="pr_apply_owner"))) as conn:
            conn.autocommit = True
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


def test_connect_keeps_the_users_options_and_adds_settings(slave):
    for dsn in (slave.dsn + " options='-c work_mem=1234kB'",
                f"postgresql://postgres@127.0.0.1:{slave.cluster.port}/{slave.name}?options=-c%20work_mem%3D1234kB"):
        with contextlib.closing(connect(dsn, "slave", settings={"search_path": '"odd path", public'})) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT current_setting('work_mem'), current_setting('search_path'), "
                            "current_setting('standard_conforming_strings'), current_setting('client_encoding')")
                assert cur.fetchone() == ("1234kB", '"odd path", public', "on", "UTF8")
