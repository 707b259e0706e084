"""What the capture triggers log (docs/design.md §3), checked by replaying the log on a slave database with
the same schema and comparing the tables, and by reading the log itself."""
import contextlib
import select
import time

import psycopg2
import psycopg2.errors
import pytest

from pyreplica import apply
from pyreplica.batch import Event
from pyreplica.db import connect
from pyreplica.wakeup import LOCK_KEYS

pytestmark = pytest.mark.usefixtures("group_small_chunks")


def create_tg(db, name):
    return [r[0] for r in db.execute("SELECT py_log_create_tg(%s)", (name,))]


def log(db, after=0):
    return db.execute("SELECT op, relname, sql FROM replica_log WHERE id > %s ORDER BY id", (after,))


def replay(master, slave):
    """Run the master's log on the slave through the daemon's own apply path, in one transaction."""
    events = [Event(*row) for row in master.execute(
        "SELECT id, txid::text, relname, op::text, sql, username::text FROM replica_log ORDER BY id")]
    with contextlib.closing(connect(slave.dsn, "slave")) as conn:
        conn.autocommit = True
        apply.install(conn)
        conn.autocommit = False
        with conn.cursor() as cur:
            apply.start_session(cur)
            if events:
                apply.apply_chunk(cur, events)
        conn.commit()


def same_schema(master, slave, ddl):
    master.execute(ddl)
    slave.execute(ddl)


def assert_same(master, slave, *tables):
    for table in tables:
        assert slave.table_rows(table) == master.table_rows(table), table


# -- operations ------------------------------------------------------------------------------------
def test_insert_update_delete_statements(master):
    master.execute("CREATE TABLE tt (id1 int, id2 text, a text, b numeric, PRIMARY KEY (id1, id2))")
    create_tg(master, "tt")
    master.execute("""
        INSERT INTO tt VALUES (1, 'x', 'it''s', 1.0), (2, 'y', NULL, NULL);
        UPDATE tt SET b = 1.00 WHERE id1 = 1;        -- same number, other text: a change
        UPDATE tt SET a = a, b = b;                  -- no change at all: nothing logged
        UPDATE tt SET id2 = 'z', a = 'back\\slash' WHERE id1 = 2;
        DELETE FROM tt WHERE id1 = 1;
    """)
    assert log(master) == [
        ("I", "public.tt", "INSERT INTO public.tt (id1, id2, a, b) VALUES ('1', 'x', 'it''s', '1.0')"),
        ("I", "public.tt", "INSERT INTO public.tt (id1, id2, a, b) VALUES ('2', 'y', NULL, NULL)"),
        ("U", "public.tt", "UPDATE public.tt SET b = '1.00' WHERE id1 = '1' AND id2 = 'x'"),
        ("U", "public.tt", "UPDATE public.tt SET id2 = 'z', a = E'back\\\\slash' WHERE id1 = '2' AND id2 = 'y'"),
        ("D", "public.tt", "DELETE FROM public.tt WHERE id1 = '1' AND id2 = 'x'"),
    ]


def test_noop_update_logs_nothing_and_notifies_nobody(master):
    master.execute("CREATE TABLE s (id int PRIMARY KEY, v jsonb)")
    create_tg(master, "s")
    master.execute("""INSERT INTO s VALUES (1, '{"a": 1}')""")
    with contextlib.closing(master.connect()) as listener:
        listen_as_a_sleeping_daemon(listener)
        master.execute("""UPDATE s SET v = '{"a": 1}', id = 1""")
        assert len(log(master)) == 1
        assert notifications(listener, wait=0.5) == 0


def test_truncate_is_logged_and_replays_with_foreign_keys(master, slave):
    ddl = """
        CREATE TABLE parent (id int PRIMARY KEY);
        CREATE TABLE child (id int PRIMARY KEY, parent int REFERENCES parent);
    """
    same_schema(master, slave, ddl)
    create_tg(master, "parent")
    create_tg(master, "child")
    master.execute("INSERT INTO parent VALUES (1), (2); INSERT INTO child VALUES (10, 1)")
    master.execute("TRUNCATE parent CASCADE")
    master.execute("INSERT INTO parent VALUES (3)")
    ops = log(master)
    assert ("T", "public.parent", "TRUNCATE public.parent") in ops
    assert ("T", "public.child", "TRUNCATE public.child") in ops
    replay(master, slave)
    assert_same(master, slave, "parent", "child")


def test_py_log_sql_runs_the_ddl_and_logs_it(master, slave):
    same_schema(master, slave, "CREATE TABLE student (id int PRIMARY KEY, name text)")
    create_tg(master, "student")
    master.execute("INSERT INTO student VALUES (1, 'ann')")
    statement = "ALTER TABLE student ADD COLUMN grade int DEFAULT 7"
    logged = master.scalar("SELECT py_log_sql(%s)", (statement,))
    master.execute("INSERT INTO student VALUES (2, 'bob', 9)")
    assert master.execute("SELECT id, op, relname, sql FROM replica_log WHERE id = %s", (logged,)) == [
        (logged, "S", None, statement)]
    assert master.table_rows("student") == [("(1,ann,7)",), ("(2,bob,9)",)]
    assert log(master, logged) == [
        ("I", "public.student", "INSERT INTO public.student (id, name, grade) VALUES ('2', 'bob', '9')")]
    replay(master, slave)
    assert_same(master, slave, "student")


def test_alter_table_in_one_session_is_seen_by_another(master):
    master.execute("CREATE TABLE student (id int PRIMARY KEY, name text)")
    create_tg(master, "student")
    with contextlib.closing(master.connect()) as writer, writer.cursor() as cur:
        # The writer's backend prepares and caches the capture queries for the old columns...
        cur.execute("INSERT INTO student VALUES (1, 'ann')")
        cur.execute("UPDATE student SET name = 'Ann'")
        # ... another session changes the table ...
        master.execute("ALTER TABLE student ADD COLUMN email text DEFAULT 'none'")
        mark = master.scalar("SELECT max(id) FROM replica_log")
        # ... and the writer's next statements log the new column.
        cur.execute("INSERT INTO student VALUES (2, 'bob', 'bob@example.org')")
        cur.execute("UPDATE student SET email = 'ann@example.org' WHERE id = 1")
        master.execute("ALTER TABLE student DROP COLUMN name")
        cur.execute("INSERT INTO student VALUES (3, 'cy@example.org')")
        master.execute("ALTER TABLE student RENAME TO pupil")
        cur.execute("INSERT INTO pupil VALUES (4, 'dy@example.org')")
        master.execute("CREATE SCHEMA school; ALTER TABLE pupil SET SCHEMA school")
        cur.execute("INSERT INTO school.pupil VALUES (5, 'ed@example.org')")
    assert [r[2] for r in log(master, mark)] == [
        "INSERT INTO public.student (id, name, email) VALUES ('2', 'bob', 'bob@example.org')",
        "UPDATE public.student SET email = 'ann@example.org' WHERE id = '1'",
        "INSERT INTO public.student (id, email) VALUES ('3', 'cy@example.org')",
        "INSERT INTO public.pupil (id, email) VALUES ('4', 'dy@example.org')",
        "INSERT INTO school.pupil (id, email) VALUES ('5', 'ed@example.org')",
    ]


def test_dropping_the_primary_key_of_a_replicated_table_is_refused(master):
    master.execute("CREATE TABLE student (id int PRIMARY KEY, name text)")
    create_tg(master, "student")
    with pytest.raises(psycopg2.errors.RaiseException) as err:
        master.execute("ALTER TABLE student DROP CONSTRAINT student_pkey")
    assert str(err.value).startswith("pyreplica: table public.student is replicated and must keep a primary key")
    assert "HINT:  Stop replicating it first: SELECT py_log_drop_tg('public.student');" in str(err.value)
    # Another primary key in the same statement is fine, and is what the log keys on from then on.
    master.execute("ALTER TABLE student DROP CONSTRAINT student_pkey, ADD PRIMARY KEY (name)")
    master.execute("INSERT INTO student VALUES (1, 'ann'); DELETE FROM student")
    assert log(master)[-1][2] == "DELETE FROM public.student WHERE name = 'ann'"


# -- notifications and who wrote -------------------------------------------------------------------
def listen_as_a_sleeping_daemon(conn):
    """LISTEN and hold the wake-up lock, as a daemon does while it sleeps: only then do writers NOTIFY."""
    conn.cursor().execute("LISTEN replicas; SELECT pg_advisory_lock(%s, %s)", LOCK_KEYS)


def notifications(conn, wait):
    """How many notifications conn gets within `wait` seconds."""
    deadline, count = time.monotonic() + wait, 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return count
        if select.select([conn], [], [], left)[0]:
            conn.poll()
            count += len(conn.notifies)
            conn.notifies.clear()


def test_one_notification_per_writing_transaction(master):
    master.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY, v text)")
    create_tg(master, "a")
    create_tg(master, "b")
    with contextlib.closing(master.connect()) as listener, \
            contextlib.closing(master.connect(autocommit=False)) as writer:
        listen_as_a_sleeping_daemon(listener)
        with writer.cursor() as cur:
            cur.execute("INSERT INTO a SELECT generate_series(1, 100)")
            cur.execute("INSERT INTO b VALUES (1, 'x'), (2, 'y')")
            cur.execute("UPDATE b SET v = 'z'")
            cur.execute("DELETE FROM a WHERE id > 50")
            cur.execute("TRUNCATE a")
        writer.commit()
        assert notifications(listener, wait=1.0) == 1
        with writer.cursor() as cur:
            cur.execute("INSERT INTO a VALUES (1)")
        writer.commit()
        with writer.cursor() as cur:
            cur.execute("INSERT INTO b VALUES (3, 'w')")
        writer.commit()
        assert notifications(listener, wait=1.0) == 2
        with writer.cursor() as cur:      # a rolled-back transaction: no notification, no log
            cur.execute("INSERT INTO a VALUES (2)")
        writer.rollback()
        assert notifications(listener, wait=0.5) == 0


def test_username_is_the_login_role(master):
    master.execute("CREATE TABLE student (id int PRIMARY KEY)")
    create_tg(master, "student")
    master.execute("CREATE ROLE clerk_cap LOGIN; GRANT INSERT ON student TO clerk_cap")
    try:
        with contextlib.closing(master.connect(user="clerk_cap")) as conn:
            conn.cursor().execute("INSERT INTO student VALUES (1)")
        master.execute("INSERT INTO student VALUES (2)")
        assert master.execute("SELECT username FROM replica_log ORDER BY id") == [("clerk_cap",), ("postgres",)]
    finally:
        master.execute("DROP OWNED BY clerk_cap; DROP ROLE clerk_cap")


# -- edge cases --------------------------------------------------------------------------------------
PARTITIONED = """
    CREATE TABLE parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
    CREATE TABLE p1 PARTITION OF parted FOR VALUES FROM (0) TO (100);
    CREATE TABLE p2 PARTITION OF parted FOR VALUES FROM (100) TO (200) PARTITION BY RANGE (id);
    CREATE TABLE p2a PARTITION OF p2 FOR VALUES FROM (100) TO (150);
    CREATE TABLE p2b PARTITION OF p2 FOR VALUES FROM (150) TO (200);
"""


def test_partitioned_table(master, slave):
    same_schema(master, slave, PARTITIONED)
    assert create_tg(master, "parted") == ["created trigger on parted (id)"]
    assert create_tg(master, "p1") == [
        "table p1 is a partition: replicate its partitioned table parted instead"]
    # The guide's query sees only the partitions (relkind 'r'), and says so for each.
    assert sorted(r[0] for r in master.execute(
        "SELECT py_log_create_tg(relname::text) FROM pg_class WHERE relname !~ '^(pg_|sql_)' "
        "AND relkind = 'r' AND relname != 'replica_log' ;")) == [
        f"table {p} is a partition: replicate its partitioned table parted instead"
        for p in ("p1", "p2a", "p2b")]
    master.execute("""
        INSERT INTO parted VALUES (1, 'root'), (120, 'root'), (170, 'root');
        INSERT INTO p1 VALUES (2, 'straight into a partition');
        INSERT INTO p2b VALUES (180, 'straight into a sub-partition');
        UPDATE parted SET id = id + 100 WHERE id IN (1, 2);   -- moves rows between partitions
        UPDATE p2 SET v = 'through p2' WHERE id = 120;
        DELETE FROM p2b WHERE id = 170;
    """)
    ops = log(master)
    assert ("I", "public.parted", "INSERT INTO public.parted (id, v) VALUES ('1', 'root')") in ops
    assert ("I", "public.p1", "INSERT INTO public.p1 (id, v) VALUES ('2', 'straight into a partition')") in ops
    assert ("I", "public.p2b", "INSERT INTO public.p2b (id, v) VALUES ('180', 'straight into a sub-partition')") in ops
    # A partition made or attached later is captured too.
    same_schema(master, slave, """
        CREATE TABLE p3 PARTITION OF parted FOR VALUES FROM (200) TO (300);
        CREATE TABLE p4 (id int PRIMARY KEY, v text);
        ALTER TABLE parted ATTACH PARTITION p4 FOR VALUES FROM (300) TO (400);
    """)
    master.execute("INSERT INTO p3 VALUES (201, 'p3'); INSERT INTO p4 VALUES (301, 'p4')")
    assert log(master)[-2:] == [("I", "public.p3", "INSERT INTO public.p3 (id, v) VALUES ('201', 'p3')"),
                                ("I", "public.p4", "INSERT INTO public.p4 (id, v) VALUES ('301', 'p4')")]
    master.execute("TRUNCATE p1")
    replay(master, slave)
    assert_same(master, slave, "parted")
    assert master.scalar("SELECT py_log_drop_tg('parted')") == "dropped trigger on parted"
    assert master.scalar("SELECT count(*) FROM pg_trigger WHERE tgname ~ '_replica_tg'") == 0


def test_identity_always_column_replays(master, slave):
    same_schema(master, slave, """
        CREATE TABLE ident (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text,
                            twice bigint GENERATED ALWAYS AS (id * 2) STORED)""")
    create_tg(master, "ident")
    master.execute("SELECT setval(pg_get_serial_sequence('ident', 'id'), 41)")
    master.execute("INSERT INTO ident (v) VALUES ('a'), ('b'); UPDATE ident SET v = 'c' WHERE id = 43")
    assert log(master)[0][2] == "INSERT INTO public.ident (id, v) OVERRIDING SYSTEM VALUE VALUES ('42', 'a')"
    replay(master, slave)
    assert_same(master, slave, "ident")
    assert slave.table_rows("ident") == [("(42,a,84)",), ("(43,c,86)",)]


@pytest.mark.parametrize("ids, shift, moved", [([1, 2, 3, 4], -1, 2), ([4, 3, 2, 1], +1, 4)])
def test_primary_key_update_of_many_rows_in_one_statement(master, slave, ids, shift, moved):
    # The key is checked row by row, so id = id + shift succeeds on the master only because it
    # visits the rows in an order where no new key meets an old one (the order they were written
    # in); the log must list the row changes in the master's order for the slave to manage too.
    same_schema(master, slave, "CREATE TABLE k (id int PRIMARY KEY, v text)")
    create_tg(master, "k")
    for i in ids:
        master.execute("INSERT INTO k VALUES (%s, %s)", (i, f"row {i}"))
    master.execute("UPDATE k SET id = id + %s", (shift,))
    master.execute("UPDATE k SET id = id + 100, v = v || '!' WHERE id > 1")
    assert [op for op, _, _ in log(master)] == ["I"] * 4 + ["U"] * 4 + ["U"] * moved
    replay(master, slave)
    assert_same(master, slave, "k")


def test_big_update_after_a_one_row_update_in_the_same_session(master, slave):
    # The trigger prepares its query once per backend, planned for the first statement's row
    # count. Pairing old and new rows with a join made that a nested loop after a one-row UPDATE,
    # and the 30,000-row UPDATE that followed in the same session quadratic (with the old query this
    # test hit its 60 s limit; 20,000 rows took 82 s on a scratch cluster). It takes about a second
    # now: the limit detects a hang, it asserts no speed.
    same_schema(master, slave, "CREATE TABLE big (id int PRIMARY KEY, v text)")
    create_tg(master, "big")
    master.execute("INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 30000) g")
    with contextlib.closing(master.connect()) as conn, conn.cursor() as cur:
        cur.execute("SET statement_timeout = '60s'")
        cur.execute("UPDATE big SET v = v || '.' WHERE id = 1")
        cur.execute("UPDATE big SET v = v || '!', id = id + 30000")
    assert master.scalar("SELECT count(*) FROM replica_log WHERE op = 'U'") == 30001
    replay(master, slave)
    assert_same(master, slave, "big")


def test_deferrable_primary_key_is_refused(master):
    # Such a key may hold duplicates until the statement or transaction ends (UPDATE d SET id = 3 - id
    # swaps two keys), so "WHERE id = ..." replayed row by row would match two rows on a slave.
    master.execute("""
        CREATE TABLE d (id int, v text, CONSTRAINT d_pkey PRIMARY KEY (id) DEFERRABLE INITIALLY DEFERRED);
        CREATE TABLE e (id int PRIMARY KEY, v text);
    """)
    assert create_tg(master, "d") == ["table d has a deferrable pk constraint (couldn't be replicated)!"]
    create_tg(master, "e")
    with pytest.raises(psycopg2.errors.RaiseException) as err:
        master.execute("ALTER TABLE e DROP CONSTRAINT e_pkey, ADD PRIMARY KEY (id) DEFERRABLE")
    assert str(err.value).startswith("pyreplica: table public.e is replicated and its primary key cannot be deferrable")


def test_quoted_schema_and_names_replay(master, slave):
    ddl = """
        CREATE SCHEMA "We""ird Schema";
        CREATE TABLE "We""ird Schema"."Tab le" ("Key" text, "k.2" timestamptz, "Ünï" int[],
                                               PRIMARY KEY ("Key", "k.2"));
    """
    same_schema(master, slave, ddl)
    assert create_tg(master, '"We""ird Schema"."Tab le"') == ['created trigger on "We""ird Schema"."Tab le" (Key,k.2)']
    master.execute("""
        SET TimeZone = 'Asia/Kolkata';
        INSERT INTO "We""ird Schema"."Tab le" VALUES ('a''b', '2024-03-01 10:00', '[0:1]={1,NULL}'),
                                                    ('c', 'infinity', NULL);
        UPDATE "We""ird Schema"."Tab le" SET "k.2" = "k.2" + interval '1 day' WHERE "Key" = 'a''b';
    """)
    assert log(master)[0][1] == '"We""ird Schema"."Tab le"'
    replay(master, slave)
    assert_same(master, slave, '"We""ird Schema"."Tab le"')


def test_wide_table_and_column_named_like_the_internals(master, slave):
    # More than 100 columns (a function call takes at most 100 arguments) and columns named like
    # the capture query's own: the UPDATE pairing's aliases (is_new, n, v, o, p, s) and the
    # row-number column of earlier versions.
    cols = ", ".join(f"c{i} int" for i in range(150))
    same_schema(master, slave, "CREATE TABLE wide (id int PRIMARY KEY, pyreplica_rn int, is_new bool, n int, "
                               f"v int, o int, p int, s int, {cols})")
    create_tg(master, "wide")
    master.execute("""
        INSERT INTO wide (id, pyreplica_rn, is_new, n, v, o, p, s, c0, c149)
             VALUES (1, 10, true, 5, 6, 7, 8, 9, 0, 149), (2, 20, false, 5, 6, 7, 8, 9, 0, 149);
        UPDATE wide SET pyreplica_rn = pyreplica_rn + 1, is_new = NOT is_new, n = n + 1, o = v, p = NULL,
                        c149 = NULL, id = id + 10;
    """)
    replay(master, slave)
    assert_same(master, slave, "wide")
    assert master.table_rows("wide")[0][0].startswith("(11,11,f,6,6,6,,9,0,")


def capture_functions(db, table):
    return {r[0] for r in db.execute("SELECT tgfoid::regproc::text FROM pg_trigger WHERE tgrelid = %s::regclass "
                                     "AND pyreplica.py_log_is_capture_fn(tgfoid)", (table,))}


def test_the_trigger_pins_the_formats_only_for_columns_that_need_them(master, slave):
    """A table of format-neutral columns gets the trigger without the DateStyle/float/... pins (cheaper);
    one that gains a float or a timestamp gets the pinned one at once, and a session with odd settings
    still logs exact values."""
    same_schema(master, slave, "CREATE TYPE mood AS ENUM ('ok', 'sad'); "
                               "CREATE TABLE t (id int PRIMARY KEY, v text, n numeric, m mood, a int[], j jsonb)")
    assert create_tg(master, "t") == ["created trigger on t (id)"]
    assert capture_functions(master, "t") == {"pyreplica.py_log_replica_unpinned"}
    same_schema(master, slave, "ALTER TABLE t ADD COLUMN f float8, ADD COLUMN ts timestamp")
    assert capture_functions(master, "t") == {"pyreplica.py_log_replica"}
    with contextlib.closing(master.connect()) as conn, conn.cursor() as cur:
        cur.execute("SET extra_float_digits = 0; SET DateStyle = 'SQL, DMY'")
        cur.execute("INSERT INTO t VALUES (1, 'a', 1.50, 'sad', '{1,2}', '{\"k\": 1}', 0.1::float8 + 0.2, "
                    "'2026-03-04 05:06:07.891234')")
        cur.execute("UPDATE t SET f = f * 3, ts = ts + interval '1 day' WHERE id = 1")
    replay(master, slave)
    assert_same(master, slave, "t")
    assert slave.scalar("SELECT f = (0.1::float8 + 0.2) * 3 FROM t")
    master.execute("ALTER TABLE t DROP COLUMN f, DROP COLUMN ts")
    assert capture_functions(master, "t") == {"pyreplica.py_log_replica_unpinned"}
