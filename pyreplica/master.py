"""The master as pyreplica sees it: every question and state change is one function of
master-install.sql (docs/design.md §3), called here by its schema-qualified name with typed
arguments, so that no object planted in another schema can answer in its place.
"""
from dataclasses import dataclass

from .db import ReplicaError, fetch_one

CHANNEL = "replicas"                    # the capture trigger's NOTIFY channel
# Pinned in every session pyreplica opens, on the master and on the slave: no schema any role may
# write is searched, so no function or operator planted there stands in for a built-in one (pg_temp
# is never searched for either). Replayed statements get public back (apply.REPLAY_PATH).
SEARCH_PATH = "pg_catalog, pg_temp"

# the newest function of master-install.sql: an older install of this layout must be re-run
INSTALLED = "SELECT to_regprocedure('pyreplica.confirm(text,pg_snapshot,bigint,bigint,text,text)') IS NOT NULL"
ANY_INSTALL = "SELECT to_regprocedure('pyreplica.unapplied(pg_snapshot)') IS NOT NULL"
OLD_INSTALL = "SELECT to_regprocedure('public.replica_confirm(text,pg_snapshot,bigint,bigint)') IS NOT NULL"
CAPTURED_TABLES = """
SELECT qualified, schema_name, table_name, columns, written_columns, pk, is_partition
  FROM pyreplica.captured_tables()
"""
CURRENT_SNAPSHOT = "SELECT pg_catalog.pg_current_snapshot()::text"
# Is every transaction visible in the second snapshot visible in the first (add-table, switchover)?
COVERS = "SELECT pyreplica.snapshot_covers(%s::pg_snapshot, %s::pg_snapshot)"
# Which events may have to run alone, before their batch (apply.run_alone): `{e}` names the event.
MAY_RUN_ALONE = r"{e}.op = 'S' AND {e}.sql ~* '^\s*alter\s+type\s'"
# The reader's snapshot and where the next batch from $1 (the slave's snapshot) ends: that snapshot,
# or a tick when more than $2 events separate them (docs/design.md §4; NULL: no bound), the followed
# sequences' values, read after that snapshot (§11), whether the batch holds any event, and whether
# it holds one that may have to run alone. The first statement of every batch: prepared once per
# session (planning it took longer than running it), run in the same round trip as BEGIN.
PREPARE_BATCH_START = f"""
PREPARE pyreplica_batch_start (pg_snapshot, bigint) AS
WITH b AS MATERIALIZED (
    SELECT c, CASE WHEN $2 IS NULL THEN c ELSE pyreplica.batch_end($1, c, $2) END AS e
      FROM (SELECT pg_catalog.pg_current_snapshot() AS c) now)
SELECT c::text, e::text,
       CASE WHEN EXISTS (SELECT FROM pyreplica.replica_sequences)       -- (else spare the call)
            THEN (SELECT pg_catalog.json_object_agg(name, last_value) FROM pyreplica.sequence_values()) END,
       EXISTS (SELECT FROM pyreplica.unapplied($1) l
                WHERE l.txid < pg_catalog.pg_snapshot_xmax(e) AND pg_catalog.pg_visible_in_snapshot(l.txid, e)),
       EXISTS (SELECT FROM pyreplica.unapplied($1) l
                WHERE l.txid < pg_catalog.pg_snapshot_xmax(e) AND pg_catalog.pg_visible_in_snapshot(l.txid, e)
                  AND {MAY_RUN_ALONE.format(e='l')})
  FROM b
"""
BATCH_START = "EXECUTE pyreplica_batch_start (%s::pg_snapshot, %s::bigint)"
REGISTER = "SELECT pyreplica.register_slave(%s::text, %s::pg_snapshot, %s::text, %s::text)::text"
CLAIM = "SELECT confirmed, batch_id, start_snapshot FROM pyreplica.claim_slave(%s::text, %s::text, %s::text)"
LOG_START = "SELECT pyreplica.log_start()::text"
CONFIRM = "SELECT pyreplica.confirm(%s::text, %s::pg_snapshot, %s::bigint, %s::bigint, %s::text, %s::text)"
REWIND = "SELECT pyreplica.rewind_slave(%s::text, %s::pg_snapshot, %s::bigint)"
TOUCH = "SELECT pyreplica.touch(%s::text)"
PRUNE = "SELECT pyreplica.prune()"
DROP_SLAVE = "SELECT pyreplica.drop_slave(%s::text)"
SEQUENCE_VALUES = "SELECT name, last_value FROM pyreplica.sequence_values()"   # (compare)
# Capture triggers that do not fire for ordinary writes ('D' disabled, 'R' replica sessions only):
# the table's writes are not logged, so every slave silently misses them (status, the daemon).
CAPTURE_OFF = """
SELECT t.tgrelid::pg_catalog.regclass::text, t.tgenabled::text, pg_catalog.array_agg(t.tgname::text ORDER BY t.tgname)
  FROM pg_catalog.pg_trigger t
 WHERE pyreplica.py_log_is_capture_fn(t.tgfoid) AND t.tgenabled IN ('D', 'R')
 GROUP BY 1, 2
 ORDER BY 1, 2
"""
TRIGGER_STATES = {"D": "disabled", "R": "enabled for replica sessions only"}

# The events a batch replays (docs/design.md §4): not applied at the start snapshot, visible at the end.
# The txid bound lets the log's txid index do the work.
BATCH_EVENTS = """
SELECT l.id, l.txid::text, l.relname, l.op::text, l.sql, l.username::text
  FROM pyreplica.unapplied(%(start)s::pg_snapshot) l
 WHERE l.txid < pg_catalog.pg_snapshot_xmax(%(end)s::pg_snapshot)
   AND pg_catalog.pg_visible_in_snapshot(l.txid, %(end)s::pg_snapshot)
   AND (%(skip_user)s::text IS NULL OR l.username::text <> %(skip_user)s::text)
 ORDER BY l.id
"""
# Administrators' statements (py_log_sql) a slave at this snapshot has still to replay.
PENDING_ADMIN_SQL = "SELECT count(*) FROM pyreplica.unapplied(%s::pg_snapshot) WHERE op = 'S'"
# How far behind a slave at snapshot %(since)s is: events and the age of the oldest.
BEHIND = "SELECT count(*), min(ts) FROM pyreplica.unapplied(%(since)s::pg_snapshot)"

SLAVES = """
SELECT s.name, s.batch_id, s.applied, s.confirmed::text, s.confirmed_at, s.last_contact,
       behind.events,
       coalesce(extract(epoch FROM now() - behind.oldest), 0)::float8,
       extract(epoch FROM now() - s.last_contact)::float8,
       s.slave_system_id, s.slave_database
  FROM pyreplica.replica_slaves s
 CROSS JOIN LATERAL (SELECT count(*) AS events, min(l.ts) AS oldest
                       FROM pyreplica.unapplied(s.confirmed) l) behind
 ORDER BY s.name
"""


@dataclass(frozen=True)
class Table:
    """A captured table, as pyreplica.captured_tables() describes it."""
    qualified: str              # "schema"."table", quoted as the log's relname
    schema: str
    name: str
    columns: list               # every column (compare hashes them)
    written_columns: list       # the columns a logged statement may name (no generated ones)
    pk: list
    is_partition: bool


def require_installed(conn):
    """Raise a ReplicaError saying what to run when pyreplica is not installed on this master."""
    if fetch_one(conn, INSTALLED):
        return
    db = conn.info.dbname
    if fetch_one(conn, OLD_INSTALL) or fetch_one(conn, ANY_INSTALL):
        raise ReplicaError(f"the master database {db} has an older pyreplica install: run "
                           f"`psql {db} -f master-install.sql` on it as a superuser to upgrade it", "master")
    raise ReplicaError(f"the master database {db} has no pyreplica log: run "
                       f"`psql {db} -f master-install.sql` on it as a superuser", "master")


def captured_tables(conn):
    with conn.cursor() as cur:
        cur.execute(CAPTURED_TABLES)
        return [Table(*row) for row in cur.fetchall()]


def current_snapshot(cur):
    cur.execute(CURRENT_SNAPSHOT)
    return cur.fetchone()[0]


def prepare_batch_start(conn):
    """Once per reader session, before its first batch_start."""
    with conn.cursor() as cur:
        cur.execute(PREPARE_BATCH_START)


def batch_start(cur, start, max_events, begin=""):
    """(current snapshot, end snapshot of the next batch from `start`, {sequence: value}, whether
    it holds events, whether one may run alone); run as the first statement of the reader's
    REPEATABLE READ transaction (`begin` opens it), so the batch's events are read with that
    snapshot."""
    cur.execute(begin + BATCH_START, (start, max_events))
    current, end, values, has_events, may_run_alone = cur.fetchone()
    return current, end, values or {}, has_events, may_run_alone


def register(conn, name, at=None, identity=(None, None)):
    """Register a slave at snapshot `at` (default: now); returns its starting snapshot."""
    return fetch_one(conn, REGISTER, (name, at, *identity))


def claim(conn, name, identity):
    """(snapshot, batch_id, start snapshot) the master has recorded for this slave, or None when
    unregistered.
    Raises when the name belongs to another slave (identity = (system id, database))."""
    with conn.cursor() as cur:
        cur.execute(CLAIM, (name, *identity))
        return cur.fetchone()


def log_start(conn):
    """Where an unregistered slave may start, or None once the log has been pruned."""
    return fetch_one(conn, LOG_START)


def confirm(cur, name, snapshot, batch_id, events, identity):
    """Record the slave's position; refused when the name now belongs to another slave identity
    (system id, database)."""
    cur.execute(CONFIRM, (name, snapshot, batch_id, events, *identity))


def rewind(cur, name, snapshot, batch_id):
    cur.execute(REWIND, (name, snapshot, batch_id))


def touch(cur, name):
    cur.execute(TOUCH, (name,))


def prune(cur):
    """Empty the log's partitions every slave has applied; events removed. `cur` is on an autocommit
    connection: prune runs in a READ COMMITTED transaction of its own whatever the database's
    default, since it must read again after taking a lock."""
    cur.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
    try:
        cur.execute(PRUNE)
        removed = cur.fetchone()[0]
    except BaseException:
        if not cur.connection.closed:
            cur.execute("ROLLBACK")
        raise
    cur.execute("COMMIT")
    return removed


def drop_slave(conn, name):
    return fetch_one(conn, DROP_SLAVE, (name,))


def sequence_values(cur):
    """{"schema"."sequence": last value} of every followed sequence that has handed out a value."""
    cur.execute(SEQUENCE_VALUES)
    return dict(cur.fetchall())


def capture_off(conn):
    """Captured tables whose capture triggers do not fire for the master's writes."""
    with conn.cursor() as cur:
        cur.execute(CAPTURE_OFF)
        return [{"table": table, "triggers": triggers, "state": TRIGGER_STATES[state]}
                for table, state, triggers in cur.fetchall()]


def capture_off_message(off):
    return (f"The capture of {off['table']} is off (trigger(s) {', '.join(off['triggers'])} {off['state']}): its "
            f"writes on the master reach no slave. Enable them (ALTER TABLE {off['table']} ENABLE TRIGGER ...), "
            f"then `pyreplica compare` each slave and `pyreplica repair` what differs")
