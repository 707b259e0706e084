"""`pyreplica add-table` and `remove-table` (docs/design.md §13): a table joins or leaves one running
slave's stream while every other table keeps replicating.

add-table, for the tables named (Londiste's copy, in steps; a re-run starts again at the copy):
1. hold    the slave's table_states rows say `copying`: from its next batch the daemon leaves the
           tables' events out (it reads those rows FOR SHARE in every batch);
2. capture the master captures the tables (py_log_create_tg) unless it does already;
3. create  the slave's tables are created from the master's definition when missing (pg_dump -s);
4. copy    a pin (a registration named SLAVE+add-table) keeps the master's log from being pruned
           past what the next steps read; one REPEATABLE READ master transaction at snapshot S
           streams the rows (COPY) into one slave transaction, which also writes `catching_up`,
           S: the copy and its point commit together;
5. catch up the tables' events the daemon left out since S (visible at its position P, not at S)
           are replayed by add-table itself, in rounds, each committed with its new point;
6. join    once few are left: the rows are taken FOR UPDATE (no batch can be leaving events out
           any more), P read again, the last events replayed and the rows deleted in one
           transaction: the daemon's next batch, which starts at P, applies every later event.
The pin goes when add-table ends, whatever happened: an interrupted run leaves the tables held (the
daemon skips their events; the next run copies again), never a log that cannot be pruned (but a
kill -9 leaves the pin: the next add-table or remove-table for that slave drops it).
One add-table or remove-table per slave at a time (an advisory lock on the slave).

remove-table marks the tables `removed`: their events are left out until add-table copies them again.
"""
import contextlib
import os
import tempfile
import threading
import time

import psycopg2
from psycopg2 import sql

from . import apply, clone, compare, faults, log, master, progress
from .batch import Event
from .db import ReplicaError, abandon_and_close, close_quietly, connect, fetch_one, fetch_row, first_line
from .filters import Pipeline

PIN_SUFFIX = "+add-table"       # the registration that holds the master's log while tables join
JOIN_AT = 1000                  # events left to replay when the join (under lock) is attempted
CHUNK = 2000                    # events replayed per statement batch
LOCK_TRY = "1s"
RETRY_EVERY = 0.2

# Session-level, on the slave, for the whole command: one add-table/remove-table per slave name.
CAPTURE_LOCK_TIMEOUT = "5s"
ONE_AT_A_TIME = "SELECT pg_catalog.pg_try_advisory_lock(1887007334, pg_catalog.hashtext(%s::text))"
RESOLVE = "SELECT rel::oid, problem FROM pyreplica.py_log_resolve(%s::text)"
DESCRIBE = """
SELECT pg_catalog.format('%%I.%%I', n.nspname, c.relname), n.nspname::text, c.relname::text,
       c.relispartition, pyreplica.py_log_is_captured(c.oid),
       EXISTS (SELECT FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       greatest(c.reltuples, 0)::bigint,
       ARRAY(SELECT ARRAY[pg_catalog.format('%%I.%%I', mn.nspname, m.relname), mn.nspname::text, m.relname::text]
               FROM pyreplica.py_log_members(c.oid) p
               JOIN pg_catalog.pg_class m ON m.oid = p JOIN pg_catalog.pg_namespace mn ON mn.oid = m.relnamespace)
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = %s
"""
CAPTURE = "SELECT pyreplica.py_log_create_tg(%s::text)"
# The held tables' events a slave at %(start)s has left out, up to its position %(end)s.
LEFT_OUT = f"SELECT * FROM ({master.BATCH_EVENTS}) e WHERE e.relname = ANY(%(tables)s)"
LEFT_OUT_COUNT = f"SELECT count(*) FROM ({LEFT_OUT}) e"

DAEMON_TABLES = "SELECT tables FROM pyreplica.position WHERE slave = %s"
STATES = "SELECT relname, state FROM pyreplica.table_states WHERE slave = %s AND relname = ANY(%s)"
HOLD = """
INSERT INTO pyreplica.table_states AS t (slave, relname, state)
SELECT %(slave)s, r, %(state)s FROM unnest(%(tables)s::text[]) r
ON CONFLICT (slave, relname) DO UPDATE
   SET state = EXCLUDED.state, copy_snapshot = NULL, caught_up = NULL, changed_at = now()
"""
COPIED = """
UPDATE pyreplica.table_states SET state = 'catching_up', copy_snapshot = %(at)s::pg_snapshot,
       caught_up = %(at)s::pg_snapshot, changed_at = now()
 WHERE slave = %(slave)s AND relname = ANY(%(tables)s) AND state = 'copying'
"""
CAUGHT_UP = """
UPDATE pyreplica.table_states SET caught_up = %(at)s::pg_snapshot, changed_at = now()
 WHERE slave = %(slave)s AND relname = ANY(%(tables)s) AND state = 'catching_up'
"""
READ_CAUGHT_UP = """
SELECT DISTINCT caught_up::text FROM pyreplica.table_states
 WHERE slave = %s AND relname = ANY(%s) AND state = 'catching_up'
"""
TAKE_FOR_JOIN = """
SELECT caught_up::text FROM pyreplica.table_states
 WHERE slave = %s AND relname = ANY(%s) AND state = 'catching_up' FOR UPDATE
"""
JOINED = "DELETE FROM pyreplica.table_states WHERE slave = %s AND relname = ANY(%s) AND state = 'catching_up'"
RELEASE = "DELETE FROM pyreplica.table_states WHERE slave = %s AND relname = ANY(%s) AND state = 'copying'"
SLAVE_TABLE_EXISTS = "SELECT pg_catalog.to_regclass(%s) IS NOT NULL"


class Wanted:
    """One table named on the command line, as the master describes it."""

    def __init__(self, qualified, schema, name, is_partition, captured, has_pk, estimate, members):
        self.qualified, self.schema, self.name = qualified, schema, name
        self.is_partition, self.captured, self.has_pk = is_partition, captured, has_pk
        self.estimate = estimate
        self.members = [m[0] for m in members]              # it and its partitions, as the log names them
        self.member_names = [(m[1], m[2]) for m in members]  # (schema, name) of each
        self.ident = sql.Identifier(schema, name)


def relnames(tables):
    return [m for t in tables for m in t.members]


class Changed(ReplicaError):
    """The tables' rows on the slave are not what this run left there."""


# -- what is asked ----------------------------------------------------------------------------------
def describe_tables(conn, names):
    """The tables named, once each."""
    found = {}
    for name in names:
        table = Wanted(*fetch_row(conn, DESCRIBE, (resolve(conn, name),)))
        found.setdefault(table.qualified, table)
    return list(found.values())


def check_tables(tables, daemon_tables):
    """Each table: a primary key, not a partition, taken by the running daemon's TABLES."""
    daemon = Pipeline(daemon_tables)
    for table in tables:
        if table.is_partition:
            raise ReplicaError(f"table {table.qualified} is a partition: name the partitioned table it belongs to",
                               "master")
        if not table.has_pk:
            raise ReplicaError(f"table {table.qualified} has no primary key: pyreplica replays rows by primary "
                               f"key (ALTER TABLE ... ADD PRIMARY KEY first)", "master")
        if not daemon.wants_table(table.qualified):
            raise ReplicaError(f"table {table.qualified} is not in the TABLES of the daemon replicating into this "
                               f"slave ({', '.join(daemon_tables)}): add it to the config and restart the daemon "
                               f"first, or its changes would be filtered out after the copy", "slave")


def daemon_tables(slave, name):
    """The TABLES patterns the running daemon recorded ([]: every table)."""
    tables = fetch_one(slave, DAEMON_TABLES, (name,))
    if tables is None:
        raise ReplicaError(f"the daemon replicating into slave {name} has not recorded which tables it takes: "
                           f"(re)start it with this version of pyreplica first", "slave")
    return tables


def resolve(conn, name):
    rel, problem = fetch_row(conn, RESOLVE, (name,))
    if problem:
        raise ReplicaError(problem, "master")
    return rel


def refuse_replicated(slave, name, tables):
    """A table the slave already takes from the stream is not copied over itself (repair is for that)."""
    with slave.cursor() as cur:
        cur.execute(STATES, (name, [t.qualified for t in tables]))
        states = dict(cur.fetchall())
    for table in tables:
        if table.captured and table.qualified not in states and slave_has(slave, table):
            raise ReplicaError(f"table {table.qualified} is already replicated to slave {name}: to make it equal "
                               f"to the master's, use `pyreplica repair`; to copy it again, `pyreplica "
                               f"remove-table` it first", "slave")


def slave_has(slave, table):
    return fetch_one(slave, SLAVE_TABLE_EXISTS, (table.qualified,))


# -- the steps --------------------------------------------------------------------------------------
def with_row_locks(slave, wait, step):
    """Run step(cursor) in a slave transaction and commit it, retrying while a batch holds the
    table_states rows (it holds them until it commits; an in-doubt one, until it is settled)."""
    deadline = time.monotonic() + wait
    while True:
        with slave.cursor() as cur:
            cur.execute("SET LOCAL lock_timeout = %s", (LOCK_TRY,))
            try:
                step(cur)
            except psycopg2.errors.LockNotAvailable:
                slave.rollback()
                if time.monotonic() >= deadline:
                    raise ReplicaError("the slave's pyreplica.table_states rows stayed locked by a batch for "
                                       f"{wait:g} s (one prepared and never committed? `pyreplica status` lists "
                                       "them, `pyreplica recover` settles them)", "slave") from None
                time.sleep(RETRY_EVERY)
                continue
        slave.commit()
        return


def hold(slave, name, tables, state, wait):
    with_row_locks(slave, wait, lambda cur: cur.execute(HOLD, {"slave": name, "state": state,
                                                              "tables": relnames(tables)}))


def release(slave, name, tables, wait):
    with_row_locks(slave, wait, lambda cur: cur.execute(RELEASE, (name, relnames(tables))))


def capture(master_admin, slave, name, tables, wait):
    """py_log_create_tg for the tables not captured yet; a refusal releases the hold. Its table lock
    is waited for CAPTURE_LOCK_TIMEOUT at most: behind an open transaction that wrote the table it
    would wait for ever, and every writer of the table would queue behind it."""
    for table in tables:
        if table.captured:
            continue
        try:
            with master_admin.cursor() as cur:
                cur.execute("SELECT pg_catalog.set_config('lock_timeout', %s, false)", (CAPTURE_LOCK_TIMEOUT,))
                try:
                    cur.execute(CAPTURE, (table.qualified,))
                    answer = cur.fetchone()[0]
                finally:
                    cur.execute("RESET lock_timeout")
        except psycopg2.errors.LockNotAvailable:
            release(slave, name, tables, wait)
            raise ReplicaError(f"cannot capture {table.qualified} on the master: a transaction has held a lock on "
                               f"it for {CAPTURE_LOCK_TIMEOUT} (an open one that wrote to it?), and writers would "
                               f"queue behind add-table: end it (pg_stat_activity), then run add-table again",
                               "master") from None
        if not answer.startswith("created trigger"):
            release(slave, name, tables, wait)
            raise ReplicaError(f"cannot capture it on the master: {answer}", "master")
        log.get().info("%s", answer)
        table.captured = True


def create_missing(config, master_admin, slave, name, tables, wait):
    """Create on the slave, from the master's definition (pg_dump -s), the tables it lacks; first the
    administrator's statements still to replay there (a captured CREATE TABLE may be one)."""
    if all(slave_has(slave, t) for t in tables):
        slave.rollback()
        return
    wait_for_admin_sql(master_admin, slave, name, wait)
    missing = [t for t in tables if not slave_has(slave, t)]
    slave.rollback()
    if not missing:
        return
    log.get().info("Creating %s on the slave", ", ".join(t.qualified for t in missing))
    with tempfile.TemporaryDirectory(prefix="pyreplica-add-table-") as tmp:
        dump, listing = os.path.join(tmp, "schema.dump"), os.path.join(tmp, "restore.list")
        selected = [arg for t in missing for names in t.member_names for arg in ("-t", dump_pattern(*names))]
        clone.run_tool([clone.tool("pg_dump"), "-Fc", "--schema-only", "--no-owner", "--no-privileges",
                        *selected, "-f", dump, "-d", clone.client_dsn(config.DSN0, tmp, "master")],
                       "pg_dump of the tables' definition on the master")
        clone.write_restore_list(dump, listing, [])
        clone.restore(dump, listing, clone.client_dsn(config.DSN1, tmp, "slave"))


def wait_for_admin_sql(master_admin, slave, name, wait):
    deadline = time.monotonic() + wait
    while True:
        position, _ = compare.slave_position(slave, name)
        slave.rollback()
        pending = fetch_one(master_admin, master.PENDING_ADMIN_SQL, (position,))
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise ReplicaError(f"slave {name} still has {pending} administrator's statement(s) to replay (is "
                               f"`pyreplica run` running for it? see --wait): the tables are created after them",
                               "slave")
        time.sleep(RETRY_EVERY)


def dump_pattern(schema, name):
    """pg_dump -t takes a pattern: both names double-quoted, so nothing in them is a wildcard."""
    return '"{}"."{}"'.format(schema.replace('"', '""'), name.replace('"', '""'))


def check_columns(slave, captured):
    for table in captured:
        problem = compare.slave_problem(slave, compare.Table(table.schema, table.name, table.columns, table.pk))
        if problem:
            raise ReplicaError(f"cannot add {table.qualified}: {problem} (make the slave's table the master's "
                               f"first)", "slave")
    slave.rollback()


def pin(master_admin, name):
    """Register the pin now (its snapshot is before the copy's): pruning keeps every event after it."""
    drop_pin(master_admin, name)        # one an interrupted run left
    master.register(master_admin, name + PIN_SUFFIX)


def drop_pin(master_admin, name):
    with contextlib.suppress(psycopg2.Error):
        master.drop_slave(master_admin, name + PIN_SUFFIX)


def copy(config, slave, name, tables, wait):
    """Copy the tables' rows at one master snapshot; commits the copy with its point. Returns it."""
    reader = compare.open_session(config.DSN0, "master")
    try:
        with reader.cursor() as cur:
            at = master.current_snapshot(cur)
        # the columns as of the copy's snapshot (a catalog read in this transaction sees them so)
        captured = {t.qualified: t for t in master.captured_tables(reader)}
        with slave.cursor() as cur:
            for table in tables:
                cur.execute(sql.SQL("TRUNCATE {}").format(table.ident))
                copy_table(reader, cur, table, captured[table.qualified])
            cur.execute("SAVEPOINT copied")
        mark_copied(slave, name, tables, at, wait)
        return at
    finally:
        close_quietly(reader)


def mark_copied(slave, name, tables, at, wait):
    """In the copy's transaction: the tables' point. Retried (from a savepoint, the copy kept) while
    a batch holds their rows; commits."""
    deadline = time.monotonic() + wait
    with slave.cursor() as cur:
        while True:
            cur.execute("SET LOCAL lock_timeout = %s", (LOCK_TRY,))
            try:
                cur.execute(COPIED, {"slave": name, "at": at, "tables": relnames(tables)})
                break
            except psycopg2.errors.LockNotAvailable:
                cur.execute("ROLLBACK TO SAVEPOINT copied")
                if time.monotonic() >= deadline:
                    raise ReplicaError("a batch kept the slave's pyreplica.table_states rows locked: the copy is "
                                       "undone (`pyreplica status`, `pyreplica recover`)", "slave") from None
        if cur.rowcount != len(relnames(tables)):
            raise Changed("the tables' state on the slave changed during the copy (another command?): the copy "
                          "is undone; run add-table again", "slave")
    slave.commit()


def copy_table(reader, slave_cur, table, captured):
    """COPY out of the master into the slave, streamed through a pipe, with a progress line."""
    columns = sql.SQL(", ").join(map(sql.Identifier, captured.written_columns))
    copy_out = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(columns, table.ident)
    copy_in = sql.SQL("COPY {} ({}) FROM STDIN").format(table.ident, columns)
    read_fd, write_fd = os.pipe()
    failure = []

    def produce():
        with os.fdopen(write_fd, "wb") as pipe:
            try:
                with reader.cursor() as cur:
                    cur.copy_expert(copy_out, pipe)
            except BaseException as error:      # raised in the caller, before anything commits
                failure.append(error)

    rows = RowCounter(os.fdopen(read_fd, "rb"))
    producer = threading.Thread(target=produce, name="pyreplica-copy", daemon=True)
    describe = lambda elapsed: (f"add-table: {table.qualified}: {rows.count} of about {table.estimate} rows "  # noqa: E731
                                f"copied, {elapsed:.0f} s")
    producer.start()
    try:
        with progress.every(compare.PROGRESS_EVERY, describe):
            slave_cur.copy_expert(copy_in, rows)
    finally:
        rows.close()        # a slave that failed stops reading: the master's side then fails too
        producer.join()
    if failure:
        raise ReplicaError(f"copy of {table.qualified} from the master failed: {failure[0]}", "master")
    log.get().info("Copied %s rows of %s", rows.count, table.qualified)


class RowCounter:
    """A file psycopg2 reads COPY data from, counting rows (COPY's text format: one line each)."""

    def __init__(self, raw):
        self.raw, self.count = raw, 0

    def read(self, size=-1):
        data = self.raw.read(size)
        self.count += data.count(b"\n")
        return data

    def readline(self, size=-1):
        data = self.raw.readline(size)
        self.count += data.count(b"\n")
        return data

    def close(self):
        self.raw.close()


# -- catching up ------------------------------------------------------------------------------------
class Replay:
    """Replays the held tables' left-out events on the slave, as the daemon would have: filters,
    SKIP_USER, skip-event's requests (marked in the same transaction)."""

    def __init__(self, config, master_conn, slave, name, tables):
        self.master_conn, self.slave, self.name, self.relnames = master_conn, slave, name, relnames(tables)
        self.pipeline = Pipeline(config.TABLES, config.FILTERS)
        self.skip_user = config.SKIP_USER or None
        self.debug_level = config.DEBUG_LEVEL
        self.replayed = 0

    def arguments(self, start, end):
        return {"start": start, "end": end, "skip_user": self.skip_user, "tables": self.relnames}

    def pending(self, start, end):
        count = fetch_one(self.master_conn, LEFT_OUT_COUNT, self.arguments(start, end))
        self.master_conn.rollback()
        return count

    def covers(self, later, earlier):
        covered = fetch_one(self.master_conn, master.COVERS, (later, earlier))
        self.master_conn.rollback()
        return covered

    def run(self, start, end, batch_id):
        """Apply, in the slave's open transaction, the events visible at `end` and not at `start`."""
        with self.slave.cursor() as cur:
            skips = apply.pending_skips(cur, self.name)
            for chunk in self.chunks(start, end):
                chunk, _ = apply.take_skips(cur, chunk, skips, batch_id, self.name)
                chunk = self.pipeline(chunk)
                if chunk:
                    apply.apply_chunk(cur, chunk, debug_level=self.debug_level)
                    self.replayed += len(chunk)
        self.master_conn.rollback()

    def chunks(self, start, end):
        """The events in lists of about CHUNK, never split between the TRUNCATEs of one statement
        (they replay as one, apply.merge_truncates)."""
        with self.master_conn.cursor(name="pyreplica_add_table") as events:
            events.execute(LEFT_OUT, self.arguments(start, end))
            chunk = []
            while True:
                rows = events.fetchmany(CHUNK)
                chunk += [Event(*row) for row in rows]
                if not rows or (chunk and chunk[-1].op != "T"):
                    if chunk:
                        yield chunk
                    chunk = []
                if not rows:
                    return


def catch_up(replay, slave, name, wait):
    """Replay left-out events in committed rounds until few are left, then join under lock."""
    deadline = time.monotonic() + wait
    describe = lambda elapsed: (f"add-table: {replay.replayed} events of the new tables replayed, "  # noqa: E731
                                f"{elapsed:.0f} s")
    with progress.every(compare.PROGRESS_EVERY, describe):
        while True:
            position, batch_id = compare.slave_position(slave, name)
            caught_up = read_caught_up(slave, name, replay.relnames)
            slave.rollback()
            # until the daemon's position covers the copy's point, events it will still bring may be
            # in the copy already: nothing can be replayed yet
            if replay.covers(position, caught_up):
                if replay.pending(caught_up, position) > JOIN_AT:
                    replay.run(caught_up, position, batch_id)
                    with slave.cursor() as cur:
                        cur.execute(CAUGHT_UP, {"slave": name, "at": position, "tables": replay.relnames})
                    slave.commit()
                    continue
                if join(replay, slave, name):
                    return
            if time.monotonic() >= deadline:
                raise ReplicaError(f"slave {name} has not reached the copy's point within {wait:g} s (is "
                                   f"`pyreplica run` running for it? see --wait); the tables stay held: run "
                                   f"add-table again", "slave")
            time.sleep(RETRY_EVERY)


def read_caught_up(slave, name, tables):
    with slave.cursor() as cur:
        cur.execute(READ_CAUGHT_UP, (name, tables))
        points = cur.fetchall()
    if len(points) != 1:
        raise Changed("the tables' state on the slave changed under add-table (remove-table?): run add-table "
                      "again", "slave")
    return points[0][0]


def join(replay, slave, name):
    """The last events and the end of the hold, in one slave transaction no batch runs beside.
    False when a batch kept the rows locked for LOCK_TRY (tried again)."""
    with slave.cursor() as cur:
        cur.execute("SET LOCAL lock_timeout = %s", (LOCK_TRY,))
        try:
            cur.execute(TAKE_FOR_JOIN, (name, replay.relnames))
        except psycopg2.errors.LockNotAvailable:
            slave.rollback()
            return False
        points = {row[0] for row in cur.fetchall()}
        if cur.rowcount != len(replay.relnames) or len(points) != 1:
            raise Changed("the tables' state on the slave changed under add-table: run add-table again", "slave")
        cur.execute("SET LOCAL lock_timeout = 0")
    # READ COMMITTED: the latest position and TABLES; no batch after it can leave events out any more
    position, batch_id = compare.slave_position(slave, name)
    check_tables_taken(slave, name, replay.relnames)
    replay.run(points.pop(), position, batch_id)
    with slave.cursor() as cur:
        cur.execute(JOINED, (name, replay.relnames))
    slave.commit()
    return True


def check_tables_taken(slave, name, held):
    """At the join: the daemon (restarted meanwhile, maybe with other TABLES) still takes them."""
    daemon = Pipeline(daemon_tables(slave, name))
    dropped = [t for t in held if not daemon.wants_table(t)]
    if dropped:
        raise Changed(f"the daemon replicating into slave {name} was restarted with TABLES that leave out "
                      f"{', '.join(dropped)}: the tables stay held; fix TABLES, restart it, run add-table again",
                      "slave")


# -- the commands -----------------------------------------------------------------------------------
def open_slave(dsn, name, command):
    conn = connect(dsn, "slave", f"pyreplica {command}", settings={"search_path": master.SEARCH_PATH})
    conn.autocommit = True
    apply.install(conn, check_owners=False)
    if not fetch_one(conn, ONE_AT_A_TIME, (name,)):
        conn.close()
        raise ReplicaError(f"another add-table or remove-table is running for slave {name}: wait for it to end",
                           "slave")
    with conn.cursor() as cur:
        apply.start_session(cur)
    # READ COMMITTED whatever the database's default: the join reads the position after its lock
    conn.set_session(isolation_level="READ COMMITTED", autocommit=False)
    return conn


def open_master(dsn, command):
    conn = connect(dsn, "master", f"pyreplica {command}", settings={"search_path": master.SEARCH_PATH})
    conn.autocommit = True
    master.require_installed(conn)
    return conn


def add_table(config, name, names, wait=300.0):
    try:
        return add_tables(config, name, names, wait)
    except (psycopg2.Error, apply.ApplyError) as e:     # e.g. a foreign key refusing the TRUNCATE
        text = first_line(e) if isinstance(e, psycopg2.Error) else str(e)
        raise ReplicaError(f"add-table failed: {text} (the tables stay held out of the stream, nothing is lost: "
                           f"fix it and run add-table again, or remove-table)") from e


def add_tables(config, name, names, wait):
    master_admin = slave = reader = None
    pinned = False
    try:
        master_admin, slave = open_master(config.DSN0, "add-table"), open_slave(config.DSN1, name, "add-table")
        compare.slave_position(slave, name)         # a slave that replicates from this master
        tables = describe_tables(master_admin, names)
        check_tables(tables, daemon_tables(slave, name))
        refuse_replicated(slave, name, tables)
        slave.rollback()
        hold(slave, name, tables, "copying", wait)
        capture(master_admin, slave, name, tables, wait)
        create_missing(config, master_admin, slave, name, tables, wait)
        captured = {t.qualified: t for t in master.captured_tables(master_admin)}
        check_columns(slave, [captured[t.qualified] for t in tables])
        pin(master_admin, name)
        pinned = True
        at = copy(config, slave, name, tables, wait)
        faults.point("add_table_copied")
        reader = connect(config.DSN0, "master", "pyreplica add-table", settings={"search_path": master.SEARCH_PATH})
        replay = Replay(config, reader, slave, name, tables)
        catch_up(replay, slave, name, wait)
        print(f"Added {', '.join(t.qualified for t in tables)} to slave {name}: copied at master snapshot {at}, "
              f"{replay.replayed} later events replayed; the daemon replicates them from now on")
        return 0
    finally:
        abandon_and_close(reader, slave)
        if pinned:
            drop_pin(master_admin, name)
        close_quietly(master_admin)


def remove_table(config, name, names, wait=60.0):
    master_conn = slave = None
    try:
        master_conn, slave = open_master(config.DSN0, "remove-table"), open_slave(config.DSN1, name, "remove-table")
        compare.slave_position(slave, name)
        slave.rollback()
        tables = describe_tables(master_conn, names)
        hold(slave, name, tables, "removed", wait)
        drop_pin(master_conn, name)         # no add-table runs (we hold the lock): a killed one's
        print(f"Removed {', '.join(t.qualified for t in tables)} from slave {name}: their changes are no longer "
              f"applied there (the slave's tables are kept as they are; `pyreplica add-table` copies them again)")
        return 0
    finally:
        abandon_and_close(slave)
        close_quietly(master_conn)
