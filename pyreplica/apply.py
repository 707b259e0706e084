"""Applying events on the slave: its schema `pyreplica`, its position, and the checked replay."""
import os
import re
from dataclasses import dataclass, field

import psycopg2

from . import SQL_DIR
from .db import ReplicaError

# Session settings for replay. The logged literals do not depend on them (the capture pins its
# own), but administrator's SQL and money/xml input do; replica role keeps the slave's triggers
# and FK checks (and pyreplica's own capture trigger, in multi-master) from firing.
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

READ_POSITION = "SELECT snapshot::text, batch_id FROM pyreplica.position WHERE slave = %s"

WRITE_POSITION = """
INSERT INTO pyreplica.position AS p (slave, snapshot, batch_id, applied, updated_at)
VALUES (%(slave)s, %(cur)s, %(batch_id)s, %(events)s, now())
ON CONFLICT (slave) DO UPDATE
   SET snapshot = EXCLUDED.snapshot, batch_id = EXCLUDED.batch_id,
       applied = p.applied + EXCLUDED.applied, updated_at = now()
"""

APPLY_EVENTS = "SELECT pyreplica.apply_events(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::int[])"

# The head of an INSERT as the capture writes it: INSERT INTO "s"."t" (cols) [OVERRIDING ...] VALUES (
_IDENT = r'(?:"(?:[^"]|"")*"|[a-z_][a-z0-9_$]*)'
INSERT_HEAD = re.compile(rf"INSERT INTO {_IDENT}\.{_IDENT} \({_IDENT}(?:, {_IDENT})*\)"
                         rf"(?: OVERRIDING SYSTEM VALUE)? VALUES (?=\()")
MERGE_MAX_BYTES = 1 << 20

# An UPDATE as the capture writes it: UPDATE s.t SET c = 'v', ... WHERE k = 'v' AND ...
# Literals are quote_literal's ('..'  with '' inside, E'..' with '' and \\ inside) or NULL; a quote
# inside a literal is always doubled, so the parse is unique.
_LITERAL = r"(?:E'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|NULL)"
_ASSIGN = rf"{_IDENT} = {_LITERAL}"
UPDATE_STMT = re.compile(rf"UPDATE ({_IDENT}\.{_IDENT}) SET ((?:{_ASSIGN}, )*{_ASSIGN}) "
                         rf"WHERE ((?:{_ASSIGN} AND )*{_ASSIGN})", re.S)
ASSIGNMENT = re.compile(rf"({_IDENT}) = ({_LITERAL})", re.S)
COLUMN_TYPES = """
SELECT quote_ident(attname), atttypid::regtype::text FROM pg_attribute
 WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped
"""


class ApplyError(ReplicaError):
    """A statement failed on the slave (conflict, constraint, missing table): replay stops there."""

    def __init__(self, message, event=None, conflict=False):
        super().__init__(message, "slave")
        self.event = event
        self.conflict = conflict
        self.merged = False     # the failing statement stood for several events


def install(slave_conn):
    """Create the slave's `pyreplica` schema if needed (autocommit connection)."""
    with open(os.path.join(SQL_DIR, "slave-install.sql")) as f, slave_conn.cursor() as cur:
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


def merge_inserts(events):
    """Statements to run for events: consecutive INSERTs into one table become one multi-row INSERT.

    Returns (first event id, op, relname, sql, rows expected) tuples. The row count check stays
    exact (k rows for k events); only the event an error is pinned on gets coarser, which is why
    a failed merged statement is retried unmerged (precise=True) to name the very event.
    """
    statements = []     # [first id, op, relname, [sql parts], rows, bytes]
    heads = {}          # relname -> its INSERT head, checked with startswith (cheaper than the regex)
    previous_head = None
    for event in events:
        head = None
        if event.op == "I":
            head = heads.get(event.relname)
            if head is None or not event.sql.startswith(head):
                match = INSERT_HEAD.match(event.sql)
                head = heads[event.relname] = match.group() if match else None
        last = statements[-1] if statements else None
        if head and head == previous_head and last[2] == event.relname and last[5] < MERGE_MAX_BYTES:
            values = event.sql[len(head):]
            last[3].append(values)
            last[4] += 1
            last[5] += len(values)
            continue
        previous_head = head
        statements.append([event.id, event.op, event.relname, [event.sql], 1, len(event.sql)])
    return [(first, op, rel, ", ".join(parts), rows) for first, op, rel, parts, rows, _ in statements]


def parse_update(sql):
    """(table, ((column, literal), ...) set, ((key column, literal), ...) where) or None."""
    match = UPDATE_STMT.fullmatch(sql)
    if match is None:
        return None
    return match.group(1), tuple(ASSIGNMENT.findall(match.group(2))), tuple(ASSIGNMENT.findall(match.group(3)))


@dataclass
class UpdateRun:
    """Consecutive single-row UPDATEs that can be replayed as one statement."""
    statement: tuple            # the first one, as it came
    table: str
    set_columns: tuple
    key_columns: tuple
    rows: list = field(default_factory=list)     # (key literals..., value literals...) per UPDATE
    keys: set = field(default_factory=set)

    def takes(self, relname, set_columns, key_columns, key_values):
        return (self.statement[2] == relname and self.set_columns == set_columns
                and self.key_columns == key_columns and key_values not in self.keys and len(self.rows) < 1000)

    def add(self, key_values, values):
        self.rows.append(key_values + values)
        self.keys.add(key_values)

    def sql(self, types):
        """UPDATE t SET c = v.p1::type ... FROM (VALUES ...) v WHERE t.k = v.p0::type ...

        Every piece is already quoted by PostgreSQL: the table and literals by the master's capture
        (format %I / %L), the columns by quote_ident and the types by regtype on the slave.
        """
        keys = len(self.key_columns)
        names = ", ".join(f"p{i}" for i in range(keys + len(self.set_columns)))
        values = ", ".join(f"({', '.join(row)})" for row in self.rows)
        assignments = ", ".join(f"{column} = pyreplica_v.p{keys + i}::{types[column]}"
                                for i, column in enumerate(self.set_columns))
        match = " AND ".join(f"pyreplica_t.{column} = pyreplica_v.p{i}::{types[column]}"
                             for i, column in enumerate(self.key_columns))
        return (f"UPDATE {self.table} AS pyreplica_t SET {assignments} "
                f"FROM (VALUES {values}) AS pyreplica_v({names}) WHERE {match}")


def merge_updates(statements, column_types):
    """Consecutive single-row UPDATEs of one table setting the same columns, keyed on distinct rows
    and not changing the key, become one UPDATE ... FROM (VALUES ...): parsed and planned once.

    column_types(relname) gives {quoted column: type} on the slave. The VALUES hold the very
    literals of the log, cast to the column's type (its input function, as the single UPDATE's
    untyped literal was); the statement must touch exactly as many rows as it stands for.
    """
    merged, run = [], None

    def close(run):
        if run is None:
            return
        if len(run.rows) == 1:
            merged.append(run.statement)
        else:
            first, _, relname, _, _ = run.statement
            merged.append((first, "U", relname, run.sql(column_types(relname)), len(run.rows)))

    for i, statement in enumerate(statements):
        _, op, relname, sql, rows = statement
        # parse only what could join a run: a lone UPDATE between other events costs nothing extra
        following = statements[i + 1] if i + 1 < len(statements) else None
        candidate = op == "U" and rows == 1 and (
            (run is not None and run.statement[2] == relname)
            or (following is not None and following[1] == "U" and following[2] == relname))
        parsed = parse_update(sql) if candidate else None
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


def slave_column_types(slave_cur):
    """relname -> {quoted column: type name} on the slave, looked up once per chunk and table."""
    cache = {}

    def types(relname):
        if relname not in cache:
            slave_cur.execute(COLUMN_TYPES, (relname,))
            cache[relname] = dict(slave_cur.fetchall()) or None
        return cache[relname]
    return types


def apply_chunk(slave_cur, events, precise=False):
    """Apply events in one round trip; raise ApplyError naming the failing event."""
    if precise:
        statements = [(e.id, e.op, e.relname, e.sql, 1) for e in events]
    else:
        statements = merge_updates(merge_inserts(events), slave_column_types(slave_cur))
    try:
        slave_cur.execute(APPLY_EVENTS, [list(column) for column in zip(*statements)])
    except psycopg2.DatabaseError as e:
        if not e.pgcode or e.pgcode.startswith(("08", "57P")):
            raise       # the connection, not the statement: the caller retries
        # PR001: a row count other than expected; class 23: a constraint the slave's data violates
        error = _apply_error(e, events, conflict=e.pgcode == "PR001" or e.pgcode.startswith("23"))
        error.merged = error.event is not None and any(
            first == error.event.id and rows > 1 for first, _, _, _, rows in statements)
        raise error from e


def _apply_error(error, events, conflict):
    message = (error.diag.message_primary or str(error)).strip()
    failing = None
    for event in events:
        if f"event {event.id} " in message:
            failing = event
            break
    if failing is None and not message.startswith(("conflict at event", "error at event")):
        message = f"error applying events {events[0].id}..{events[-1].id}: {message}"
    return ApplyError(message, failing, conflict)


def write_position(slave_cur, batch):
    slave_cur.execute(WRITE_POSITION, {"slave": batch.slave, "cur": batch.end_snapshot,
                                       "batch_id": batch.batch_id, "events": batch.applied})
