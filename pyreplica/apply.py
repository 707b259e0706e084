"""Applying events on the slave: its schema `pyreplica`, its position, and the checked replay."""
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import psycopg2

from . import SQL_DIR, log, master
from .db import ReplicaError, is_connection_error

# Session settings for replay. The logged literals do not depend on them (the capture pins its
# own), but administrator's SQL and money/xml input do; replica role keeps the slave's triggers
# and FK checks (and pyreplica's own capture trigger, in multi-master) from firing.
# (client_encoding and standard_conforming_strings are pinned when db.connect opens the connection.)
SLAVE_SESSION = """
SET session_replication_role = replica;
SET "DateStyle" = 'ISO, YMD';
SET "IntervalStyle" = 'iso_8601';
SET "TimeZone" = 'UTC';
SET extra_float_digits = 1;
SET standard_conforming_strings = on;
SET lc_monetary = 'C';
SET xmloption = content;
"""

# slave-install.sql stamps this on pyreplica.apply_events; bump both together when the script changes.
SLAVE_SCHEMA_VERSION = "pyreplica slave schema 3"
APPLY_EVENTS_SIGNATURE = "pyreplica.apply_events(bigint[], text[], text[], text[], integer[])"
SLAVE_SCHEMA_CURRENT = """
SELECT to_regclass('pyreplica.position') IS NOT NULL
   AND obj_description(to_regprocedure(%s), 'pg_proc') IS NOT DISTINCT FROM %s
"""

READ_POSITION = "SELECT snapshot::text, batch_id FROM pyreplica.position WHERE slave = %s"

WRITE_POSITION = """
INSERT INTO pyreplica.position AS p (slave, snapshot, batch_id, applied, updated_at)
VALUES (%(slave)s, %(cur)s, %(batch_id)s, %(events)s, now())
ON CONFLICT (slave) DO UPDATE
   SET snapshot = EXCLUDED.snapshot, batch_id = EXCLUDED.batch_id,
       applied = p.applied + EXCLUDED.applied, updated_at = now()
"""

# Returns one row: all NULL when every statement succeeded, else the failing statement's index
# (1-based) and PostgreSQL's SQLSTATE, message, DETAIL and HINT; the chunk's work is then undone.
APPLY_EVENTS = ("SELECT failed, code, message, detail, hint "
                "FROM pyreplica.apply_events(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::int[])")

# The SQLSTATE slave-install.sql's apply_events raises when a statement touched another number of
# rows than the events it stands for (see "USING ERRCODE = 'PR001'" there).
ROW_COUNT_CONFLICT = "PR001"

PRIMARY_KEY = """
SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord)
  FROM pg_index i
 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
 WHERE i.indrelid = to_regclass(%s) AND i.indisprimary
"""

# The head of an INSERT as the capture writes it: INSERT INTO "s"."t" (cols) [OVERRIDING ...] VALUES (
_IDENT = r'(?:"(?:[^"]|"")*"|[a-z_][a-z0-9_$]*)'
INSERT_HEAD = re.compile(rf"INSERT INTO {_IDENT}\.{_IDENT} \({_IDENT}(?:, {_IDENT})*\)"
                         rf"(?: OVERRIDING SYSTEM VALUE)? VALUES (?=\()")
MERGE_MAX_BYTES = 1 << 20
UPDATE_RUN_MAX = 1000

# An UPDATE as the capture writes it: UPDATE s.t SET c = 'v', ... WHERE k = 'v' AND ...
# Literals are quote_literal's ('..'  with '' inside, E'..' with '' and \\ inside) or NULL; a quote
# inside a literal is always doubled, so the parse is unique.
_LITERAL = r"(?:E'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|NULL)"
_ASSIGN = rf"{_IDENT} = {_LITERAL}"
UPDATE_STMT = re.compile(rf"UPDATE ({_IDENT}\.{_IDENT}) SET ((?:{_ASSIGN}, )*{_ASSIGN}) "
                         rf"WHERE ((?:{_ASSIGN} AND )*{_ASSIGN})", re.S)
ASSIGNMENT = re.compile(rf"({_IDENT}) = ({_LITERAL})", re.S)

# The type each column's literals are cast to in the UPDATE fast path: the column's type WITHOUT its
# modifier, spelled so that it parses back as exactly that (format_type with typmod -1 writes
# `bpchar`, `"bit"`, `bpchar[]`, where the bare name `character` would mean char(1) and cut values).
# The modifier is then applied as the single UPDATE applies it: the SET's assignment to the column
# (char(n) padded, numeric(p,s) rounded, a too long value an error, never a silent cut), and the
# key compared as the single UPDATE's untyped literal is.
COLUMN_TYPES = """
SELECT quote_ident(attname), format_type(atttypid, -1) FROM pg_attribute
 WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped
"""

# An administrator's statement that must not run in the batch's transaction (docs/design.md §6): a
# value ALTER TYPE ... ADD VALUE adds cannot be used in the transaction that added it (55P04), and
# one batch may hold both. Only an event that is exactly this one statement qualifies (a string
# with more statements would run its other ones twice). Group 1 is everything before the value, so
# that IF NOT EXISTS can be put in when missing.
_NAME = r'(?:"(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_$]*)'
_ENUM_LABEL = r"(?:[Ee]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*')"
ADD_VALUE = re.compile(rf"(\s*ALTER\s+TYPE\s+{_NAME}(?:\s*\.\s*{_NAME})?\s+ADD\s+VALUE\s+)(IF\s+NOT\s+EXISTS\s+)?"
                       rf"({_ENUM_LABEL}(?:\s+(?:BEFORE|AFTER)\s+{_ENUM_LABEL})?\s*;?\s*)", re.I)

# The batch's candidates for running alone, read in the batch's own master transaction (the same
# snapshot as its event stream); apply.run_alone decides from the full statement.
ALONE_CANDIDATES = (f"SELECT * FROM ({master.BATCH_EVENTS}) e "
                    r"WHERE e.op = 'S' AND e.sql ~* '^\s*alter\s+type\s'")

PENDING_SKIPS = """
SELECT event_id, txid::text FROM pyreplica.skip_requests WHERE slave = %s AND skipped_at IS NULL
"""
MARK_SKIPPED = """
UPDATE pyreplica.skip_requests SET skipped_at = now(), batch_id = %s
 WHERE slave = %s AND event_id = %s AND skipped_at IS NULL
"""

VERBS = {"I": "INSERT", "U": "UPDATE", "D": "DELETE", "T": "TRUNCATE"}
# A DETAIL that quotes a whole row (CHECK, NOT NULL, partition routing): shown from DEBUG_LEVEL 2 only.
ROW_DETAIL = re.compile(r"failing row contains", re.I)


class Statement(NamedTuple):
    """One statement to run on the slave, standing for one or more consecutive events."""
    first_event: int    # id of the first event it stands for
    op: str             # I, U, D, T or S (an administrator's statement)
    relname: str        # the table, quoted and qualified (for a TRUNCATE: every table, comma separated)
    sql: str
    rows: int           # rows an I/U/D must touch exactly; events a TRUNCATE stands for

    @property
    def merged(self):
        """Several INSERTs/UPDATEs made one for speed: a failure is retried one event at a time."""
        return self.rows > 1 and self.op in ("I", "U")


class ApplyError(ReplicaError):
    """A statement failed on the slave (conflict, constraint, missing table): replay stops there."""

    def __init__(self, message, event=None, conflict=False, code=None, detail=None, hint=None):
        super().__init__(message, "slave")
        self.event = event
        self.conflict = conflict
        self.merged = False     # the failing statement stood for several merged events
        self.code, self.detail, self.hint = code, detail, hint


def install(slave_conn):
    """Create or upgrade the slave's `pyreplica` schema when it is missing or outdated (autocommit
    connection). When it is current nothing is executed, so a role without CREATE works once an
    administrator (or an earlier run) has installed it."""
    with slave_conn.cursor() as cur:
        cur.execute(SLAVE_SCHEMA_CURRENT, (APPLY_EVENTS_SIGNATURE, SLAVE_SCHEMA_VERSION))
        if cur.fetchone()[0]:
            return
        with open(os.path.join(SQL_DIR, "slave-install.sql")) as f:
            cur.execute(f.read())


def read_position(slave_conn, slave):
    """(snapshot, batch_id) the slave has committed, or None for a slave seen the first time."""
    with slave_conn.cursor() as cur:
        cur.execute(READ_POSITION, (slave,))
        return cur.fetchone()


def start_session(slave_cur):
    try:
        slave_cur.execute(SLAVE_SESSION)
    except psycopg2.errors.InsufficientPrivilege as e:
        raise ReplicaError(
            "the slave's role may not set session_replication_role: connect as a superuser, or "
            "GRANT SET ON PARAMETER session_replication_role TO <role> (PostgreSQL 15+)", "slave") from e


# -- statements that run alone, skipped events ----------------------------------------------------
def alone_sql(event):
    """The statement to run in its own committed transaction before the event's batch, made
    idempotent (ALTER TYPE ... ADD VALUE IF NOT EXISTS); None for every other event."""
    match = ADD_VALUE.fullmatch(event.sql) if event.op == "S" else None
    if match is None:
        return None
    return f"{match.group(1)}IF NOT EXISTS {match.group(3)}"


def run_alone(slave_conn, events):
    """Run the statements of a batch that must not share its transaction, each in its own committed
    one, before the batch's transaction begins (docs/design.md §6). Idempotent, so a retried batch,
    or a value an administrator added by hand, is no error; in the batch the event runs again in its
    place (a no-op then). One that fails here (its type is created earlier in the same batch) is
    left to its place, where it works unless the same batch uses the value: then replay stops
    naming the event, and README says the way out (create the type by hand, skip-event)."""
    for event in events:
        sql = alone_sql(event)
        if sql is None:
            continue
        try:
            with slave_conn.cursor() as cur:
                cur.execute(sql)
            slave_conn.commit()
        except psycopg2.DatabaseError as e:
            slave_conn.rollback()
            if is_connection_error(e):
                raise
            log.get().info("Event %s could not run before its batch (%s): it runs in its place",
                           event.id, (e.diag.message_primary or str(e)).strip())
            continue
        log.get().info("Event %s (%s) committed in its own transaction, before its batch", event.id, sql.strip())


def alone_candidates(master_conn, batch, skip_user=None):
    """The batch's events that may have to run alone, read in its master transaction."""
    with master_conn.cursor() as cur:
        cur.execute(ALONE_CANDIDATES, {"start": batch.start_snapshot, "end": batch.end_snapshot,
                                       "skip_user": skip_user or None})
        return cur.fetchall()


def before_batch(slave_conn, master_conn, batch, to_events, skip_user=None):
    """Run, before a batch's transaction, its statements that must run alone (each committed), but
    not one skip-event named. to_events makes the log's rows the events the slave takes (filters
    applied). Costs one master query when there is none. The slave's connection is left outside
    any transaction, also when this fails."""
    rows = alone_candidates(master_conn, batch, skip_user)
    if not rows:
        return
    try:
        with slave_conn.cursor() as cur:
            skips = pending_skips(cur, batch.slave)
        slave_conn.commit()
        run_alone(slave_conn, to_events([row for row in rows if skips.get(row[0]) != row[1]]))
    except BaseException:
        if not slave_conn.closed:
            try:
                slave_conn.rollback()
            except psycopg2.Error:
                pass
        raise


def pending_skips(slave_cur, slave):
    """{event id: its transaction} that skip-event told this slave to skip and no batch has yet."""
    slave_cur.execute(PENDING_SKIPS, (slave,))
    return dict(slave_cur.fetchall())


def describe(event):
    return f"{VERBS.get(event.op, 'SQL')} on {event.relname or '-'}"


def take_skips(slave_cur, events, skips, batch_id, slave):
    """(events to apply, events skipped): an event is skipped only when skip-event named its id AND
    its transaction; each skipped one is marked on the slave in the batch's transaction and logged."""
    if not skips:
        return events, []
    kept, skipped = [], []
    for event in events:
        if skips.get(event.id) != event.txid:
            kept.append(event)
            continue
        log.get().warning("Skipping event %s (%s) as told by skip-event", event.id, describe(event))
        slave_cur.execute(MARK_SKIPPED, (batch_id, slave, event.id))
        skipped.append(event)
    return kept, skipped


# -- planning -----------------------------------------------------------------------------------
def one_statement(event):
    # an administrator's statement that ran alone before the batch runs again here, idempotent
    return Statement(event.id, event.op, event.relname, alone_sql(event) or event.sql, 1)


def merge_truncates(events):
    """Consecutive TRUNCATE events of one transaction become one `TRUNCATE a, b, c` (never CASCADE).

    The master logs one event per table a TRUNCATE emptied (those it named and those it cascaded
    to); truncated together, FK-linked tables replay, and a slave-only table referencing one of
    them makes the TRUNCATE fail (replay stops) instead of being emptied. Always done, also
    precise: it is what the master did, not a speed-up.
    """
    statements = []
    for event in events:
        last = statements[-1] if statements else None
        if event.op == "T" and last is not None and last[0] == "T" and last[1] == event.txid:
            last[2].append(event)
        else:
            statements.append([event.op, event.txid, [event]])
    planned = []
    for op, _, group in statements:
        if op != "T":
            planned.append(one_statement(group[0]))
            continue
        tables = ", ".join(dict.fromkeys(e.relname for e in group))
        planned.append(Statement(group[0].id, "T", tables, f"TRUNCATE {tables}", len(group)))
    return planned


def merge_inserts(statements):
    """Consecutive INSERTs into one table become one multi-row INSERT.

    The row count check stays exact
    (k rows for k events); only the event an error is pinned on gets coarser, which is why a failed
    merged statement is retried unmerged (precise=True) to name the very event.
    """
    merged = []         # [first id, op, relname, [sql parts], rows, bytes]
    heads = {}          # relname -> its INSERT head, checked with startswith (cheaper than the regex)
    previous_head = None
    for first, op, relname, text, rows in statements:
        head = None
        if op == "I" and rows == 1:
            head = heads.get(relname)
            if head is None or not text.startswith(head):
                match = INSERT_HEAD.match(text)
                head = heads[relname] = match.group() if match else None
        last = merged[-1] if merged else None
        if head and head == previous_head and last[2] == relname and last[5] < MERGE_MAX_BYTES:
            values = text[len(head):]
            last[3].append(values)
            last[4] += 1
            last[5] += len(values)
            continue
        previous_head = head
        merged.append([first, op, relname, [text], rows, len(text)])
    return [Statement(first, op, rel, ", ".join(parts), rows) for first, op, rel, parts, rows, _ in merged]


def parse_update(text):
    """(table, ((column, literal), ...) set, ((key column, literal), ...) where) or None."""
    match = UPDATE_STMT.fullmatch(text)
    if match is None:
        return None
    return match.group(1), tuple(ASSIGNMENT.findall(match.group(2))), tuple(ASSIGNMENT.findall(match.group(3)))


@dataclass
class UpdateRun:
    """Consecutive single-row UPDATEs that can be replayed as one statement."""
    statement: Statement        # the first one, as it came
    table: str
    set_columns: tuple
    key_columns: tuple
    rows: list = field(default_factory=list)     # (key literals..., value literals...) per UPDATE
    keys: set = field(default_factory=set)

    def takes(self, relname, set_columns, key_columns, key_values):
        return (self.statement.relname == relname and self.set_columns == set_columns
                and self.key_columns == key_columns and key_values not in self.keys
                and len(self.rows) < UPDATE_RUN_MAX)

    def add(self, key_values, values):
        self.rows.append(key_values + values)
        self.keys.add(key_values)

    def sql(self, types):
        """WITH u AS (UPDATE t SET c = v.p1::type ... FROM (VALUES (1, ...), ...) v
                      WHERE t.k = v.p0::type ... RETURNING v.n)
           SELECT n FROM u GROUP BY n HAVING count(*) = 1

        Returns one row per UPDATE that touched exactly one row, so the row count equals the
        number of UPDATEs only when each of them matched exactly one row, as each alone must
        (a plain count would let a key matching two rows on the slave hide one matching none).
        Every piece is already quoted by PostgreSQL: the table and literals by the master's
        capture (format %I / %L), the columns by quote_ident and the types by format_type.
        """
        keys = len(self.key_columns)
        names = ", ".join(["n"] + [f"p{i}" for i in range(keys + len(self.set_columns))])
        values = ", ".join(f"({n}, {', '.join(row)})" for n, row in enumerate(self.rows, 1))
        assignments = ", ".join(f"{column} = pyreplica_v.p{keys + i}::{types[column]}"
                                for i, column in enumerate(self.set_columns))
        match = " AND ".join(f"pyreplica_t.{column} = pyreplica_v.p{i}::{types[column]}"
                             for i, column in enumerate(self.key_columns))
        return (f"WITH pyreplica_u AS (UPDATE {self.table} AS pyreplica_t SET {assignments} "
                f"FROM (VALUES {values}) AS pyreplica_v({names}) WHERE {match} RETURNING pyreplica_v.n) "
                f"SELECT n FROM pyreplica_u GROUP BY n HAVING count(*) = 1")


def merge_updates(statements, column_types):
    """Consecutive single-row UPDATEs of one table setting the same columns, keyed on distinct rows
    and not changing the key, become one UPDATE ... FROM (VALUES ...): parsed and planned once.

    column_types(relname) gives {quoted column: type} on the slave (None for a missing table).
    Rows on distinct keys are independent, so their order within the run does not matter.
    """
    merged, run = [], None

    def close(run):
        if run is None:
            return
        if len(run.rows) == 1:
            merged.append(run.statement)
        else:
            first, _, relname, _, _ = run.statement
            merged.append(Statement(first, "U", relname, run.sql(column_types(relname)), len(run.rows)))

    for i, statement in enumerate(statements):
        _, op, relname, text, rows = statement
        # parse only what could join a run: a lone UPDATE between other events costs nothing extra
        following = statements[i + 1] if i + 1 < len(statements) else None
        candidate = op == "U" and rows == 1 and (
            (run is not None and run.statement.relname == relname)
            or (following is not None and following.op == "U" and following.relname == relname))
        parsed = parse_update(text) if candidate else None
        if parsed is None:
            close(run)
            run = None
            merged.append(statement)
            continue
        table, assignments, keys = parsed
        set_columns, values = tuple(c for c, _ in assignments), tuple(v for _, v in assignments)
        key_columns, key_values = tuple(c for c, _ in keys), tuple(v for _, v in keys)
        if run is not None and run.takes(relname, set_columns, key_columns, key_values):
            run.add(key_values, values)
            continue
        close(run)
        types = column_types(relname)
        if types is None or set(set_columns) & set(key_columns) or not all(
                c in types for c in set_columns + key_columns):
            run = None          # a key change, or a table the slave lacks: replayed as it is
            merged.append(statement)
            continue
        run = UpdateRun(statement, table, set_columns, key_columns)
        run.add(key_values, values)
    close(run)
    return merged


def plan(events, column_types, precise=False):
    """The statements that replay events, in order. TRUNCATEs of one transaction are always one
    statement; unless precise, INSERTs and UPDATEs are merged for speed."""
    statements = merge_truncates(events)
    if precise:
        return statements
    return merge_updates(merge_inserts(statements), column_types)


def slave_column_types(slave_cur):
    """relname -> {quoted column: type} on the slave, looked up once per chunk and table."""
    cache = {}

    def types(relname):
        if relname not in cache:
            slave_cur.execute(COLUMN_TYPES, (relname,))
            cache[relname] = dict(slave_cur.fetchall()) or None
        return cache[relname]
    return types


# -- applying -----------------------------------------------------------------------------------
def apply_chunk(slave_cur, events, precise=False, debug_level=0):
    """Apply events in one round trip; raise ApplyError naming the failing event.

    A failure leaves the slave's transaction usable, the chunk's work undone (apply_events'
    savepoint). A merged statement that fails is retried here one event at a time, so the error
    names the very event. debug_level >= 2 lets a DETAIL quoting a whole row into the message.
    """
    statements = plan(events, slave_column_types(slave_cur), precise)
    try:
        slave_cur.execute(APPLY_EVENTS, [list(column) for column in zip(*statements)])
    except psycopg2.DatabaseError as e:
        if not e.pgcode or e.pgcode.startswith(("08", "57P")):
            raise       # the connection, not the statement: the caller retries
        # what apply_events cannot catch (a cancel, a statement timeout): the batch is retried
        raise ApplyError(f"error applying events {events[0].id}..{events[-1].id}: "
                         f"{(e.diag.message_primary or str(e)).strip()}", code=e.pgcode) from e
    failed, code, message, detail, hint = slave_cur.fetchone()
    if failed is None:
        return
    statement = statements[failed - 1]
    if statement.merged:
        return apply_chunk(slave_cur, events, True, debug_level)
    raise _apply_error(slave_cur, statement, events, code, message, detail, hint, debug_level)


def _apply_error(slave_cur, statement, events, code, message, detail, hint, debug_level):
    """The one place an ApplyError is worded: event, verb and table, then PostgreSQL's words."""
    event = next(e for e in events if e.id == statement.first_event)
    # class 23: a constraint the slave's data violates
    conflict = code == ROW_COUNT_CONFLICT or code.startswith("23")
    what = "conflict" if code == ROW_COUNT_CONFLICT else "error"
    text = f"{what} at event {event.id} ({VERBS.get(statement.op, 'SQL')} on {statement.relname or '-'}): {message}"
    if conflict and statement.op in ("I", "U", "D"):
        slave_cur.execute(PRIMARY_KEY, (statement.relname,))
        key = slave_cur.fetchone()[0]
        text += f" (primary key: {key})" if key else " (the slave's table has no primary key)"
    if detail and (debug_level >= 2 or not ROW_DETAIL.search(detail)):
        text += f"\n  DETAIL: {detail}"
    if hint:
        text += f"\n  HINT: {hint}"
    error = ApplyError(text, event, conflict, code, detail, hint)
    error.merged = statement.merged
    return error


def write_position(slave_cur, batch):
    slave_cur.execute(WRITE_POSITION, {"slave": batch.slave, "cur": batch.end_snapshot,
                                       "batch_id": batch.batch_id, "events": batch.applied})
