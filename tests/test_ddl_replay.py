"""Administrator's statements and capture boundaries (issue 11 items 4, 5, 6; docs/design.md §3, §6):
a new enum value used in the batch that adds it; applications preparing their own transactions;
inheritance children refused, partitions captured."""
import contextlib
import signal

import psycopg2
import pytest
from psycopg2 import sql

from pyreplica import apply
from pyreplica.batch import Event
from replication import Daemon, create_on_both, wait_identical, wait_until
from test_capture import create_tg, listen_as_a_sleeping_daemon, log, notifications

MOODS = "CREATE TYPE mood AS ENUM ('sad', 'ok'); CREATE TABLE t (id int PRIMARY KEY, m mood)"


def enum_values(db, typname="mood"):
    return [v for (v,) in db.execute("SELECT enumlabel::text FROM pg_enum WHERE enumtypid = to_regtype(%s) "
                                     "ORDER BY enumsortorder", (typname,))]


def add_value_then_use_it(master):
    """Both in one batch: logged while no daemon runs."""
    master.execute("SELECT py_log_sql('ALTER TYPE public.mood ADD VALUE ''happy'' AFTER ''ok''')")
    master.execute("INSERT INTO t VALUES (1, 'happy'), (2, 'sad')")


# -- ALTER TYPE ... ADD VALUE ------------------------------------------------------------------------
def test_new_enum_value_used_in_the_same_batch_replays(master, slave):
    create_on_both(master, slave, MOODS, ["t"])
    add_value_then_use_it(master)
    with Daemon(master, slave, name="s1") as daemon:
        wait_identical(master, slave, ["t"])
        assert "ALTER TYPE public.mood ADD VALUE IF NOT EXISTS 'happy' AFTER 'ok') committed in its own " \
               "transaction, before its batch" in daemon.output
        assert "unsafe use of new value" not in daemon.output
    assert enum_values(slave) == ["sad", "ok", "happy"]


def test_value_added_by_hand_on_the_slave_first_does_not_stop_replay(master, slave):
    create_on_both(master, slave, MOODS, ["t"])
    slave.execute("ALTER TYPE mood ADD VALUE 'happy'")
    add_value_then_use_it(master)
    master.execute("SELECT py_log_sql('ALTER TYPE public.mood ADD VALUE ''calm''')")   # a batch of its own
    with Daemon(master, slave, name="s1") as daemon:
        wait_identical(master, slave, ["t"])
        master.execute("INSERT INTO t VALUES (3, 'calm')")
        wait_identical(master, slave, ["t"])
        assert "already exists" not in daemon.output.replace("IF NOT EXISTS", ""), daemon.output
    assert enum_values(slave) == ["sad", "ok", "happy", "calm"]


def test_batch_rolled_back_after_the_value_committed_replays_again(master, slave):
    create_on_both(master, slave, MOODS, ["t"])
    add_value_then_use_it(master)
    crashing = Daemon(master, slave, name="s1", fault="before_slave_prepare").start()
    try:
        assert crashing.proc.wait(30) == -signal.SIGKILL, crashing.output
    finally:
        crashing.stop()
    # the value is committed on the slave, the batch that uses it is not
    assert enum_values(slave) == ["sad", "ok", "happy"]
    assert slave.scalar("SELECT count(*) FROM t") == 0
    with Daemon(master, slave, name="s1") as daemon:
        wait_identical(master, slave, ["t"])
        assert "error at event" not in daemon.output, daemon.output


def test_value_of_a_type_created_in_the_same_batch_runs_in_its_place(master, slave):
    create_on_both(master, slave, MOODS, ["t"])
    with Daemon(master, slave, name="s1") as daemon:
        daemon.wait_for_output("Waiting for 'NOTIFY'")
        # one master transaction, so one batch: the type does not exist on the slave before it
        with contextlib.closing(master.connect(autocommit=False)) as conn, conn.cursor() as cur:
            for statement in ("CREATE TYPE public.size AS ENUM ('s')", "ALTER TYPE public.size ADD VALUE 'xl'",
                              "ALTER TABLE public.t ADD COLUMN sz public.size"):
                cur.execute("SELECT py_log_sql(%s)", (statement,))
            conn.commit()
        wait_until(lambda: enum_values(slave, "size") == ["s", "xl"], message="the new type on the slave")
        master.execute("INSERT INTO t VALUES (1, 'ok', 'xl')")
        wait_identical(master, slave, ["t"])
        assert "could not run before its batch (type \"public.size\" does not exist): it runs in its place" \
               in daemon.output, daemon.output


@pytest.mark.parametrize("statement", [
    "ALTER TYPE mood ADD VALUE 'x'; INSERT INTO t VALUES (1, 'x')",     # more than the one statement
    "ALTER TYPE mood RENAME VALUE 'sad' TO 'blue'",
    "ALTER TABLE t ADD COLUMN \"ALTER TYPE m ADD VALUE 'x'\" text",
])
def test_only_a_lone_add_value_runs_outside_its_batch(statement):
    assert apply.alone_sql(Event(1, "1", None, "S", statement, "u")) is None


def test_add_value_is_made_idempotent_whatever_its_spelling():
    spelled = 'alter type "My Schema"."Mood" add value if not exists E\'it\'\'s\\\\\' before \'a\';'
    assert apply.alone_sql(Event(1, "1", None, "S", spelled, "u")) == \
        'alter type "My Schema"."Mood" add value IF NOT EXISTS E\'it\'\'s\\\\\' before \'a\';'
    # the capture's own events never run alone, whatever their text
    assert apply.alone_sql(Event(1, "1", "public.t", "I", "ALTER TYPE mood ADD VALUE 'x'", "u")) is None


# -- applications that prepare their own transactions ------------------------------------------------
def app_role(master, name, *settings):
    role = sql.Identifier(name)
    master.execute(sql.SQL("DROP ROLE IF EXISTS {r}; CREATE ROLE {r} LOGIN; GRANT INSERT, SELECT ON t TO {r}")
                   .format(r=role))
    for setting in settings:
        master.execute(sql.SQL(setting).format(r=role))


def prepare_insert(master, role, row, set_local=False):
    with contextlib.closing(master.connect(autocommit=False, user=role)) as conn, conn.cursor() as cur:
        if set_local:
            cur.execute("SET LOCAL pyreplica.notify = off")
        cur.execute("INSERT INTO t VALUES (%s, 'sad')", (row,))
        cur.execute("PREPARE TRANSACTION %s", (f"app-{role}-{row}",))
    master.execute("COMMIT PREPARED %s", (f"app-{role}-{row}",))


def test_application_that_prepares_its_transactions_replicates_at_the_next_wakeup(master, slave):
    create_on_both(master, slave, MOODS, ["t"])
    plain, quiet = f"plain_{master.name}", f"quiet_{master.name}"
    app_role(master, plain)
    app_role(master, quiet, "ALTER ROLE {r} SET pyreplica.notify = off")
    with contextlib.closing(master.connect()) as sleeper:
        listen_as_a_sleeping_daemon(sleeper)        # the trigger NOTIFYs only while a daemon sleeps
        with pytest.raises(psycopg2.Error, match="cannot PREPARE a transaction that has executed LISTEN, UNLISTEN, "
                                                 "or NOTIFY"):
            prepare_insert(master, plain, 1)
    with Daemon(master, slave, name="s1", keepalive=2) as daemon, \
            contextlib.closing(master.connect()) as listener:
        listener.cursor().execute("LISTEN replicas")
        daemon.wait_for_output("Waiting for 'NOTIFY'")
        prepare_insert(master, quiet, 2)                         # ALTER ROLE ... SET
        prepare_insert(master, plain, 3, set_local=True)         # SET LOCAL, not a superuser
        assert notifications(listener, wait=0.5) == 0
        wait_identical(master, slave, ["t"], timeout=20)         # at the keepalive, 2 s
        assert "Timeout('keepalive')!" in daemon.output
    assert slave.execute("SELECT id FROM t ORDER BY id") == [(2,), (3,)]


# -- inheritance and partitions ----------------------------------------------------------------------
def test_parent_with_inheritance_children_or_a_child_is_a_problem_line(master):
    master.execute("CREATE TABLE p (id int PRIMARY KEY, v text); CREATE TABLE c (w int) INHERITS (p)")
    assert create_tg(master, "p") == ["table p has inheritance children (c) (couldn't be replicated)!"]
    assert create_tg(master, "c") == ["table c inherits from another table (couldn't be replicated)!"]
    assert master.scalar("SELECT count(*) FROM pg_trigger WHERE tgrelid IN ('p'::regclass, 'c'::regclass)") == 0


@pytest.mark.parametrize("ddl", [
    "CREATE TABLE c () INHERITS (p)",
    "CREATE TABLE c (id int PRIMARY KEY, v text); ALTER TABLE c INHERIT p",
    "CREATE TABLE other (id int, v text); CREATE TABLE c () INHERITS (other, p)",
])
def test_a_captured_parent_gets_no_inheritance_child(master, ddl):
    master.execute("CREATE TABLE p (id int PRIMARY KEY, v text)")
    create_tg(master, "p")
    with pytest.raises(psycopg2.Error) as raised:
        master.execute(ddl)
    assert raised.value.diag.message_primary == ("pyreplica: table public.p is replicated and cannot get inheritance "
                                                 "children (their rows would not be replicated)")
    assert master.scalar("SELECT to_regclass('c')") is None
    master.execute("INSERT INTO p VALUES (1, 'a')")
    assert log(master) == [("I", "public.p", "INSERT INTO public.p (id, v) VALUES ('1', 'a')")]


def test_a_captured_table_gets_no_inheritance_parent(master):
    """Rows changed through the parent (UPDATE parent ...) fire the parent's statement triggers only."""
    master.execute("CREATE TABLE other (id int, v text); CREATE TABLE c (id int PRIMARY KEY, v text)")
    create_tg(master, "c")
    with pytest.raises(psycopg2.Error) as raised:
        master.execute("ALTER TABLE c INHERIT other")
    assert raised.value.diag.message_primary == ("pyreplica: table public.c is replicated and cannot inherit from another "
                                                 "table (rows changed through the parent would not be replicated)")
    assert master.scalar("SELECT count(*) FROM pg_inherits WHERE inhrelid = 'c'::regclass") == 0


def test_partitions_created_or_attached_later_are_captured(master):
    master.execute("CREATE TABLE p (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);"
                   "CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10)")
    assert create_tg(master, "p") == ["created trigger on p (id)"]
    master.execute("CREATE TABLE p2 PARTITION OF p FOR VALUES FROM (10) TO (20);"
                   "CREATE TABLE p3 (id int PRIMARY KEY, v text);"
                   "ALTER TABLE p ATTACH PARTITION p3 FOR VALUES FROM (20) TO (30)")
    master.execute("INSERT INTO p VALUES (1, 'a'); INSERT INTO p2 VALUES (11, 'b'); INSERT INTO p3 VALUES (21, 'c')")
    assert [row[1] for row in log(master)] == ["public.p", "public.p2", "public.p3"]


def test_a_column_added_through_py_log_sql_while_the_daemon_was_down_does_not_stop_its_start(master, slave):
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY)", ["t"])
    with Daemon(master, slave, name="dd"):
        master.execute("INSERT INTO t VALUES (1)")
        wait_identical(master, slave, ["t"])
    master.execute("SELECT py_log_sql('ALTER TABLE public.t ADD COLUMN note text')")
    master.execute("INSERT INTO t VALUES (2, 'added while the daemon was down')")
    with Daemon(master, slave, name="dd") as daemon:
        wait_identical(master, slave, ["t"])
        assert "lacks column(s) note" in daemon.output      # said, and replay went on


# -- py_log_sql_only: logged for the slaves, not run on the master --------------------------------------
def test_py_log_sql_only_runs_on_the_slave_only_in_its_place(master, slave):
    create_on_both(master, slave, "CREATE TABLE s (id int PRIMARY KEY, v text)", ["s"])
    master.execute("INSERT INTO s VALUES (1, 'before')")
    master.execute("SELECT py_log_sql_only('CREATE INDEX s_v_idx ON public.s (v)')")
    master.execute("SELECT py_log_sql_only('UPDATE public.s SET v = ''slave only'' WHERE id = 1')")
    master.execute("INSERT INTO s VALUES (2, 'after')")
    assert master.scalar("SELECT to_regclass('public.s_v_idx')") is None     # not run here
    with Daemon(master, slave, name="o1"):
        wait_until(lambda: slave.scalar("SELECT count(*) FROM s") == 2, message="replay")
    assert slave.scalar("SELECT to_regclass('public.s_v_idx')::text") == "s_v_idx"
    assert slave.execute("SELECT id, v FROM s ORDER BY id") == [(1, "slave only"), (2, "after")]
    master.execute("CREATE ROLE sql_only_app")
    try:
        with pytest.raises(psycopg2.Error, match="permission denied for function py_log_sql_only"):
            master.execute("SET ROLE sql_only_app; SELECT py_log_sql_only('SELECT 1')")
    finally:
        master.execute("DROP ROLE sql_only_app")


def test_a_schema_renamed_while_a_writer_session_stays_connected_replays(master, slave):
    """ALTER SCHEMA ... RENAME renames every captured table in it. A pooled writer session kept its
    cached logging query and went on logging INSERT INTO app.t ..., which no slave could replay."""
    create_on_both(master, slave, "CREATE SCHEMA app; CREATE TABLE app.t (id int PRIMARY KEY, v text)", ["app.t"])
    with contextlib.closing(master.connect()) as writer, writer.cursor() as cur:
        cur.execute("INSERT INTO app.t VALUES (1, 'before')")
        master.execute("SELECT py_log_sql('ALTER SCHEMA app RENAME TO app2')")
        cur.execute("INSERT INTO app2.t VALUES (2, 'after')")
        cur.execute("UPDATE app2.t SET v = 'after too' WHERE id = 1")
    assert [r for (r,) in master.execute("SELECT relname FROM pyreplica.replica_log WHERE op <> 'S' ORDER BY id")] \
        == ["app.t", "app2.t", "app2.t"]
    with Daemon(master, slave, name="renamed"):
        wait_until(lambda: slave.scalar("SELECT to_regclass('app2.t') IS NOT NULL"), message="the rename replayed")
        wait_identical(master, slave, ["app2.t"])
