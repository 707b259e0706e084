"""Applying events on the slave: its schema `pyreplica`, its position, and the checked replay."""
import collections
import concurrent.futures
import functools
import operator
import os
import re
import threading
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

# The search_path replayed statements run with (apply_events sets it around each one, run_alone too):
# the logged ones name their tables in full, but administrators' SQL names them as the master's
# default path did, and the operators of an extension's types (citext's =) live in public. Only
# there, and only while no role but a superuser or the daemon's own owns an operator in public
# (UNTRUSTED_OPERATORS): else one could stand in for pg_catalog's = in a replayed WHERE.
REPLAY_PATH = "pg_catalog, public"

# slave-install.sql stamps this on pyreplica.apply_events; bump both together when the script changes.
SLAVE_SCHEMA_VERSION = "pyreplica slave schema 5"
APPLY_EVENTS_SIGNATURE = "pyreplica.apply_events(bigint[], text[], text[], text[], integer[])"
# (whether there is a schema at all, whether it is current)
SLAVE_SCHEMA_CURRENT = """
SELECT to_regclass('pyreplica.position') IS NOT NULL,
       obj_description(to_regprocedure(%s), 'pg_proc') IS NOT DISTINCT FROM %s
"""

READ_POSITION = "SELECT snapshot::text, batch_id FROM pyreplica.position WHERE slave = %s"

WRITE_POSITION = """
INSERT INTO pyreplica.position AS p (slave, snapshot, batch_id, applied, tables, updated_at)
VALUES (%(slave)s, %(cur)s, %(batch_id)s, %(events)s, %(tables)s::text[], now())
ON CONFLICT (slave) DO UPDATE
   SET snapshot = EXCLUDED.snapshot, batch_id = EXCLUDED.batch_id,
       applied = p.applied + EXCLUDED.applied, tables = EXCLUDED.tables, updated_at = now()
"""
RECORD_TABLES = "UPDATE pyreplica.position SET tables = %s::text[] WHERE slave = %s"
# Tables add-table or remove-table hold out of a slave's stream (docs/design.md §13), by relname.
HELD_TABLES = "SELECT relname, state FROM pyreplica.table_states WHERE slave = %s"

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

# An INSERT as the capture writes it: INSERT INTO "s"."t" (cols) [OVERRIDING ...] VALUES ('v', ...);
# group 1 is its head (up to VALUES), which a grouped INSERT takes once. (_LITERAL is below.)
# (written as unrolled loops, [^"]*(?:""[^"]*)*: Python's re runs them several times faster than (?:[^"]|"")*)
_IDENT = r'(?:"[^"]*(?:""[^"]*)*"|[a-z_][a-z0-9_$]*)'
IDENTIFIER = re.compile(_IDENT)
GROUP_MAX_ROWS = 1000       # events per grouped UPDATE or DELETE
GROUP_FROM = 16             # statements in a chunk from which grouping pays for its catalog lookup
MERGE_MAX_BYTES = 1 << 20   # bytes of the events' statements per grouped statement

# An UPDATE as the capture writes it: UPDATE s.t SET c = 'v', ... WHERE k = 'v' AND ...
# Literals are quote_literal's ('..'  with '' inside, E'..' with '' and \\ inside) or NULL; a quote
# inside a literal is always doubled, so the parse is unique.
_LITERAL = r"(?:'[^']*(?:''[^']*)*'|E'[^'\\]*(?:(?:\\.|'')[^'\\]*)*'|NULL)"
_ASSIGN = rf"{_IDENT} = {_LITERAL}"
UPDATE_STMT = re.compile(rf"UPDATE ({_IDENT}\.{_IDENT}) SET ((?:{_ASSIGN}, )*{_ASSIGN}) "
                         rf"WHERE ((?:{_ASSIGN} AND )*{_ASSIGN})", re.S)
ASSIGNMENT = re.compile(rf"({_IDENT}) = ({_LITERAL})", re.S)
LITERAL = re.compile(_LITERAL, re.S)
INSERT_STMT = re.compile(rf"(INSERT INTO ({_IDENT}\.{_IDENT}) \(((?:{_IDENT}, )*{_IDENT})\)"
                         rf"(?: OVERRIDING SYSTEM VALUE)? VALUES )\(((?:{_LITERAL}, )*{_LITERAL})\)", re.S)
DELETE_STMT = re.compile(rf"DELETE FROM ({_IDENT}\.{_IDENT}) WHERE ((?:{_ASSIGN} AND )*{_ASSIGN})", re.S)

# A slave table as grouping sees it (apply.Table): each column's quoted name, the type its literals
# are cast to in a grouped UPDATE or DELETE, its place in the primary key, and whether its events may
# move past others'. The type is the column's WITHOUT its modifier, spelled so that it parses back
# as exactly that (format_type with typmod -1 writes `bpchar`, `"bit"`, `bpchar[]`, where the bare
# name `character` would mean char(1) and cut values). The modifier is then applied as the single
# UPDATE applies it: the SET's assignment to the column (char(n) padded, numeric(p,s) rounded, a
# too long value an error, never a silent cut), and the key compared as the single statement's
# untyped literal is. A rule, or a trigger that fires under session_replication_role = replica
# (ENABLE ALWAYS / REPLICA, on the table or a partition), could see the order of rows: such a
# table's events are grouped only while consecutive. A row of a partitioned table may be written
# through its partition or through any table above it, each logging its own relname: grouping knows
# a row by its partition tree's root.
TABLE_INFO = """
SELECT quote_ident(a.attname), format_type(a.atttypid, -1), k.ord,
       NOT c.relhasrules AND NOT EXISTS (
           SELECT FROM pg_trigger g
            WHERE (g.tgrelid = c.oid OR g.tgrelid IN (SELECT relid FROM pg_partition_tree(c.oid)))
              AND g.tgenabled IN ('A', 'R'))
       AND EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       coalesce(pg_partition_root(c.oid), c.oid)::oid
  FROM pg_class c
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
  LEFT JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON k.attnum = a.attnum
 WHERE c.oid = to_regclass(%s)
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
ALONE_CANDIDATES = f"SELECT * FROM ({master.BATCH_EVENTS}) e WHERE {master.MAY_RUN_ALONE.format(e='e')}"

PENDING_SKIPS = """
SELECT event_id, txid::text FROM pyreplica.skip_requests WHERE slave = %s AND skipped_at IS NULL
"""
# Roles whose objects the daemon lets run as its own role: superusers, and itself.
TRUSTED_OWNER = "(owner = current_user::regrole OR (SELECT rolsuper FROM pg_roles WHERE oid = owner))"
# = operators in public (REPLAY_PATH) owned by anyone else, e.g. "public.=(character varying,...)
# owned by evil": while one exists, no batch is replayed. Only =: the one operator replayed
# statements use (WHERE k = '...', grouped joins, IN) on the columns' types; by name, so the
# catalog's index finds them (a scan of pg_operator cost 0.2 ms a batch).
UNTRUSTED_OPERATORS = f"""
SELECT o.oid::regoperator::text || ' owned by ' || owner::text
  FROM pg_operator o CROSS JOIN LATERAL (SELECT o.oprowner::regrole AS owner) r
 WHERE o.oprname = '=' AND o.oprnamespace = (SELECT oid FROM pg_namespace WHERE nspname = 'public')
   AND NOT {TRUSTED_OWNER}
"""
# The batch's first slave statement: skip-event's pending requests, the tables this slave does not
# take from the stream now (table_states), locked FOR SHARE until the batch ends (docs/design.md §13),
# and the operators in public that a replayed statement could run (UNTRUSTED_OPERATORS).
# Prepared once per slave session (prepare_batch_state): planning it cost more than running it.
PREPARE_BATCH_SLAVE_STATE = f"""
PREPARE pyreplica_batch_state (text) AS
SELECT ARRAY(SELECT ARRAY[event_id::text, txid::text] FROM pyreplica.skip_requests
              WHERE slave = $1 AND skipped_at IS NULL),
       ARRAY(SELECT relname FROM pyreplica.table_states WHERE slave = $1 FOR SHARE),
       ARRAY({UNTRUSTED_OPERATORS})
"""
BATCH_SLAVE_STATE = "EXECUTE pyreplica_batch_state (%s)"
# Objects in the slave's schema pyreplica owned by another role than a trusted one: its owner could
# run code as the daemon (a planted apply_events, a trigger on pyreplica.position). Checked before
# the schema is used or installed.
UNTRUSTED_SLAVE_OBJECTS = f"""
SELECT kind || ' ' || name || ' owned by ' || owner::text FROM (
    SELECT 'schema', nspname::text, nspowner::regrole FROM pg_namespace WHERE nspname = 'pyreplica'
    UNION ALL SELECT 'relation', oid::regclass::text, relowner::regrole FROM pg_class
     WHERE relnamespace = to_regnamespace('pyreplica')
    UNION ALL SELECT 'function', oid::regprocedure::text, proowner::regrole FROM pg_proc
     WHERE pronamespace = to_regnamespace('pyreplica')
    UNION ALL SELECT 'type', oid::regtype::text, typowner::regrole FROM pg_type
     WHERE typnamespace = to_regnamespace('pyreplica')
    UNION ALL SELECT 'operator', oid::regoperator::text, oprowner::regrole FROM pg_operator
     WHERE oprnamespace = to_regnamespace('pyreplica')) o(kind, name, owner)
 WHERE NOT {TRUSTED_OWNER}
"""
MARK_SKIPPED = """
UPDATE pyreplica.skip_requests SET skipped_at = now(), batch_id = %s
 WHERE slave = %s AND event_id = %s AND skipped_at IS NULL
"""

VERBS = {"I": "INSERT", "U": "UPDATE", "D": "DELETE", "T": "TRUNCATE"}
# A DETAIL that quotes a whole row (CHECK, NOT NULL, partition routing): shown from DEBUG_LEVEL 2 only.
# Known by its SQLSTATE, whatever the slave's lc_messages; by its English words for any other.
ROW_DETAIL_CODES = {"23502", "23514"}   # not_null_violation, check_violation
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
        """Several INSERTs/UPDATEs/DELETEs made one for speed (apply.group)."""
        return self.rows > 1 and self.op in ("I", "U", "D")


class ApplyError(ReplicaError):
    """A statement failed on the slave (conflict, constraint, missing table): replay stops there."""

    def __init__(self, message, event=None, conflict=False, code=None, detail=None, hint=None):
        super().__init__(message, "slave")
        self.event = event
        self.conflict = conflict
        self.code, self.detail, self.hint = code, detail, hint


def install(slave_conn, check_owners=True):
    """Create or upgrade the slave's `pyreplica` schema when it is missing or outdated (autocommit
    connection). When it is current nothing is executed, so a role without CREATE works once an
    administrator (or an earlier run) has installed it. True when there was no schema before.
    check_owners: refuse a schema with objects of a role neither a superuser nor this one (the
    daemon). An administrator's command leaves it off: in README's least-privilege setup the
    daemon's role owns the schema, and the administrator trusts it."""
    with slave_conn.cursor() as cur:
        if check_owners:
            refuse_untrusted_objects(cur)
        cur.execute(SLAVE_SCHEMA_CURRENT, (APPLY_EVENTS_SIGNATURE, SLAVE_SCHEMA_VERSION))
        exists, current = cur.fetchone()
        if exists and current:
            return False
        with open(os.path.join(SQL_DIR, "slave-install.sql")) as f:
            cur.execute(f.read())
        return not exists


def refuse_untrusted_objects(slave_cur):
    """Refuse a slave schema pyreplica holding objects of a role neither a superuser nor this one."""
    slave_cur.execute(UNTRUSTED_SLAVE_OBJECTS)
    untrusted = [row[0] for row in slave_cur.fetchall()]
    if untrusted:
        raise ReplicaError(
            f"the slave's schema pyreplica holds {'; '.join(untrusted)}: its owner could run code "
            "as the daemon's role. Only a superuser or the daemon's role may own what is in it: "
            "drop what someone else made (DROP SCHEMA pyreplica CASCADE, if it holds no position "
            "you need), or change its owner", "slave")


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
                cur.execute("SELECT pg_catalog.set_config('search_path', %s, true)", (REPLAY_PATH,))
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


def prepare_batch_state(slave_conn):
    """Once per slave session, before its first batch_state."""
    with slave_conn.cursor() as cur:
        cur.execute(PREPARE_BATCH_SLAVE_STATE)


def batch_state(slave_cur, slave, begin=""):
    """({event id: transaction} skip-event named, {relname} of the tables held out of the stream), read
    in the batch's transaction (`begin` opens it): the held tables' rows stay locked FOR SHARE until it
    ends."""
    slave_cur.execute(begin + BATCH_SLAVE_STATE, (slave,))
    pairs, held, untrusted = slave_cur.fetchone()
    if untrusted:       # (an ApplyError: the batch is rolled back and retried, and resumes once it is gone)
        raise ApplyError(
            f"the slave has {'; '.join(untrusted)}: a replayed statement could run it as the daemon's "
            "role, so nothing is replayed until an administrator drops it or gives it to a trusted "
            "owner (a superuser, or this daemon's role)")
    return {int(event_id): txid for event_id, txid in pairs}, frozenset(held)


def leave_out_held(events, held):
    """The events of tables add-table is copying or catching up, or remove-table removed, left out."""
    if not held:
        return events
    return [event for event in events if event.relname not in held]


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
    planned, truncated = [], []     # truncated: the TRUNCATE events of the statement being built

    def close():
        if truncated:
            tables = ", ".join(dict.fromkeys(e.relname for e in truncated))
            planned.append(Statement(truncated[0].id, "T", tables, f"TRUNCATE {tables}", len(truncated)))
            truncated.clear()

    for event in events:
        if event.op == "T":
            if truncated and truncated[-1].txid != event.txid:
                close()
            truncated.append(event)
        else:
            close()
            planned.append(one_statement(event) if event.op == "S" else
                           new_statement((event.id, event.op, event.relname, event.sql, 1)))
    close()
    return planned


# One I/U/D event as the grouping sees it: which statement it can join (its group), the row it
# touches (its primary key's literals; None when only consecutive events may join it) and its part
# of the grouped statement (an INSERT's "(values)", an UPDATE's key then SET literals, a DELETE's key).
class Row(NamedTuple):
    group: tuple        # (op, relname, shape): events with the same one can be one statement
    key: tuple
    part: object
    reorder: bool       # may move past events of other groups (docs/design.md §6)


# Built once per event while planning: without the NamedTuples' generated __new__ (as batch.event_from_row)
new_row = functools.partial(tuple.__new__, Row)
new_statement = functools.partial(tuple.__new__, Statement)


class Table(NamedTuple):
    """What grouping needs to know of a slave table."""
    types: dict         # quoted column -> type without modifier (see TABLE_INFO)
    key: tuple          # quoted primary-key columns, in key order (() when none)
    reorder: bool       # has a primary key, and no rule or trigger that fires in replica mode
    root: int = None    # the oid of its partition tree's root (its own when not a partition)


def parse_update(text):
    """(table, ((column, literal), ...) set, ((key column, literal), ...) where) or None."""
    match = UPDATE_STMT.fullmatch(text)
    if match is None:
        return None
    return match.group(1), tuple(ASSIGNMENT.findall(match.group(2))), tuple(ASSIGNMENT.findall(match.group(3)))


def parse_insert(text):
    """(head, table, (column, ...), "(values)", (literal, ...)) or None."""
    match = INSERT_STMT.fullmatch(text)
    if match is None:
        return None
    head, table, columns, values = match.groups()
    return head, table, tuple(IDENTIFIER.findall(columns)), text[len(head):], tuple(LITERAL.findall(values))


def parse_delete(text):
    """(table, ((key column, literal), ...)) or None."""
    match = DELETE_STMT.fullmatch(text)
    return None if match is None else (match.group(1), tuple(ASSIGNMENT.findall(match.group(2))))


class Shape(NamedTuple):
    """One form of statement the capture writes for a table and operation (the columns it names),
    compiled into a regex with the literals as its groups: parsing a statement of a known shape is
    one fullmatch, several times faster than the general regexes."""
    regex: re.Pattern       # None: not compiled (Shapes.KEEP)
    group: tuple            # Row.group; None: statements of this shape run as they are
    key: object             # literals -> the tuple of the key's literals; None: not tracked
    reorder: bool
    head: int               # an INSERT: length of its head, before "(values)"
    set_count: int          # an UPDATE: literals in its SET, before the key's

    def row(self, literals, text):
        group = self.group
        if group is None:
            return None
        op = group[0]
        if op == "I":
            part = text[self.head:]
        elif op == "U":
            part = literals[self.set_count:] + literals[:self.set_count]
        else:
            part = literals
        return new_row((group, None if self.key is None else self.key(literals), part, self.reorder))


def _picker(indexes):
    """literals -> the tuple of the literals at these indexes (itemgetter's speed, always a tuple)."""
    if len(indexes) == 1:
        index = indexes[0]
        return lambda literals: (literals[index],)
    return operator.itemgetter(*indexes)


def _pattern(*pieces):
    """A regex of literal text (str) and literals (None), each literal a group."""
    return re.compile("".join(f"({_LITERAL})" if p is None else re.escape(p) for p in pieces), re.S)


def _assignments(columns, separator):
    pieces = []
    for i, column in enumerate(columns):
        pieces += [separator] * (i > 0) + [f"{column} = ", None]
    return pieces


class Shapes:
    """Rows of single-row I/U/D statements exactly as the capture writes them (see Shape), learnt per
    table and operation. None for a statement that must run as it is: another form (e.g. a filter's
    rewrite), a key change, a table the slave lacks. tables(relname) gives the slave's Table."""
    KEEP = 16       # shapes compiled per table and operation, the most recent tried first: past
                    # that (each statement another set of columns) the general regexes parse them

    def __init__(self, tables):
        self.tables = tables
        self.known = {}     # (op, relname) -> [Shape]
        self.learnt = {}    # (op, relname) -> shapes learnt

    def row(self, statement):
        _, op, relname, text, rows = statement
        if rows != 1 or op not in ("I", "U", "D"):
            return None
        shapes = self.known.setdefault((op, relname), [])
        for shape in shapes:
            match = shape.regex.fullmatch(text)
            if match is not None:
                return shape.row(match.groups(), text)
        learnt = self.learnt[op, relname] = self.learnt.get((op, relname), 0) + 1
        shape, literals = self.learn(op, relname, text, learnt <= self.KEEP)
        if shape is None:
            return None
        if shape.regex is not None:
            shapes.insert(0, shape)
        return shape.row(literals, text)

    def learn(self, op, relname, text, compiled):
        """(the Shape of a statement the general regexes parse, its literals), else (None, None)."""
        table = self.tables(relname)
        pattern = _pattern if compiled else lambda *pieces: None
        if op == "I":
            parsed = parse_insert(text)
            if parsed is None or parsed[1] != relname:
                return None, None
            head, _, columns, _, literals = parsed
            regex = pattern(head, "(", *[p for i in range(len(columns)) for p in [", "] * (i > 0) + [None]], ")")
            positions = tuple(columns.index(c) for c in table.key if c in columns) if table else ()
            reorder = table is not None and table.reorder and len(positions) == len(table.key)
            return Shape(regex, None if table is None else ("I", relname, head),
                         _picker(positions) if reorder and positions else None, reorder, len(head), 0), literals
        parsed = parse_update(text) if op == "U" else parse_delete(text)
        if parsed is None or parsed[0] != relname:
            return None, None
        assignments, keys = (parsed[1], parsed[2]) if op == "U" else ((), parsed[1])
        set_columns, key_columns = tuple(c for c, _ in assignments), tuple(c for c, _ in keys)
        if op == "U":
            regex = pattern(f"UPDATE {relname} SET ", *_assignments(set_columns, ", "), " WHERE ",
                             *_assignments(key_columns, " AND "))
        else:
            regex = pattern(f"DELETE FROM {relname} WHERE ", *_assignments(key_columns, " AND "))
        groupable = table is not None and not set(set_columns) & set(key_columns) and all(
            c in table.types for c in set_columns + key_columns)
        return Shape(regex, (op, relname, set_columns, key_columns) if groupable else None,
                     _picker(range(len(set_columns), len(set_columns) + len(key_columns))),
                     groupable and table.reorder and key_columns == table.key, 0, len(set_columns)), \
            tuple(v for _, v in assignments + keys)


@dataclass
class Group:
    """Events that become one statement: INSERT ... VALUES (...), (...); UPDATE ... FROM (VALUES ...);
    DELETE ... USING (VALUES ...)."""
    first: Statement        # the first one, as it came
    group: tuple
    parts: list = field(default_factory=list)
    size: int = 0

    def add(self, part, size):
        self.parts.append(part)
        self.size += size

    def full(self):
        return self.size >= MERGE_MAX_BYTES or (self.group[0] != "I" and len(self.parts) >= GROUP_MAX_ROWS)

    def statement(self, tables):
        if len(self.parts) == 1:
            return self.first
        op, relname = self.group[:2]
        if op == "I":
            sql = self.group[2] + ", ".join(self.parts)
        else:
            sql = values_sql(op, relname, self.group[2], self.group[3], self.parts, tables(relname).types)
        return Statement(self.first.first_event, op, relname, sql, len(self.parts))


def values_sql(op, table, set_columns, key_columns, rows, types):
    """WITH pyreplica_u AS (UPDATE t AS pyreplica_t SET c = pyreplica_v.p1::type ...
                           FROM (VALUES (1, ...), ...) AS pyreplica_v(n, p0, p1 ...)
                           WHERE pyreplica_t.k = pyreplica_v.p0::type ... RETURNING pyreplica_v.n)
       SELECT n FROM pyreplica_u GROUP BY n HAVING count(*) = 1
    (a DELETE: DELETE FROM t AS pyreplica_t USING (VALUES ...) ...).

    Returns one row per event that touched exactly one row, so the row count equals the number of
    events only when each of them matched exactly one row, as each alone must (a plain count would
    let a key matching two rows on the slave hide one matching none, and two events on one row
    count once). Every piece is already quoted by PostgreSQL: the table and literals by the
    master's capture (format %I / %L), the columns by quote_ident and the types by format_type.
    """
    keys = len(key_columns)
    names = ", ".join(["n"] + [f"p{i}" for i in range(keys + len(set_columns))])
    values = ", ".join(f"({n}, {', '.join(row)})" for n, row in enumerate(rows, 1))
    source = f"(VALUES {values}) AS pyreplica_v({names})"
    match = " AND ".join(f"pyreplica_t.{column} = pyreplica_v.p{i}::{types[column]}"
                         for i, column in enumerate(key_columns))
    if op == "U":
        assignments = ", ".join(f"{column} = pyreplica_v.p{keys + i}::{types[column]}"
                                for i, column in enumerate(set_columns))
        change = f"UPDATE {table} AS pyreplica_t SET {assignments} FROM {source}"
    else:
        change = f"DELETE FROM {table} AS pyreplica_t USING {source}"
    return (f"WITH pyreplica_u AS ({change} WHERE {match} RETURNING pyreplica_v.n) "
            f"SELECT n FROM pyreplica_u GROUP BY n HAVING count(*) = 1")


def group(statements, tables):
    """Single-row INSERTs, UPDATEs and DELETEs become one statement per table, operation and shape
    (columns written, key columns) within a segment: a run of such events that touch distinct rows
    (distinct primary keys, per table). Parsed and planned once, not once per event.

    Events of distinct rows commute under session_replication_role = replica (no FK check, no
    ordinary trigger: a table with a rule or a trigger enabled in replica mode never moves), so a
    segment's groups run in the order of their first event; an event on a row the segment already
    touched, any other statement, or a full group ends the segment. Each group's row count is
    checked per event (values_sql), so whatever goes wrong is caught, and apply_chunk replays
    the chunk in id order to name the very event. tables(relname) gives the slave's Table or None,
    as it is before the chunk runs: from an administrator's statement on (it may change a table's
    columns, key or triggers), every event runs as it came.
    """
    planned, groups, keys, shapes = [], {}, set(), Shapes(tables)
    last = None             # the previous event's Row in the segment
    admin = next((i for i, s in enumerate(statements) if s.op == "S"), len(statements))
    statements, after_admin = statements[:admin], statements[admin:]

    def row_owner(relname):
        """What a row belongs to: its partition tree (a partition and its parent log other names)."""
        table = tables(relname)
        return relname if table is None or table.root is None else table.root

    def flush():
        planned.extend(g.statement(tables) for g in groups.values())
        groups.clear()
        keys.clear()

    for statement in statements:
        row = shapes.row(statement)
        if row is None:
            flush()
            planned.append(statement)
            last = None
            continue
        kind, key, part, reorder = row
        current = groups.get(kind)
        moves = last is not None and last.group != kind     # other groups between? only if both may move
        touched = None if key is None else (row_owner(kind[1]), key)   # (table, primary key): the row it changes
        if ((touched is not None and touched in keys) or (current is not None and current.full())
                or (moves and not (reorder and last.reorder))):
            flush()
            current = None
        if current is None:
            current = groups[kind] = Group(statement, kind)
        current.add(part, len(statement.sql))
        if touched is not None:
            keys.add(touched)
        last = row
    flush()
    return planned + after_admin


def plan(events, tables, precise=False):
    """The statements that replay events. TRUNCATEs of one transaction are always one statement;
    unless precise, single-row INSERTs, UPDATEs and DELETEs of a chunk of GROUP_FROM statements or
    more are grouped for speed (group), else every other event is one statement, in id order."""
    statements = merge_truncates(events)
    if precise or len(statements) < GROUP_FROM:
        # a few statements: planning each costs less than a round trip to look up their tables
        # (what a daemon that keeps up mostly applies, where that round trip is latency)
        return statements
    return group(statements, tables)


def slave_tables(slave_cur):
    """relname -> Table on the slave (None for a missing one), looked up once per chunk and table."""
    cache = {}

    def table(relname):
        if relname not in cache:
            slave_cur.execute(TABLE_INFO, (relname,))
            rows = slave_cur.fetchall()
            cache[relname] = Table({c: t for c, t, *_ in rows}, tuple(c for c, _, k, *_ in sorted(
                (r for r in rows if r[2] is not None), key=lambda r: r[2])), rows[0][3], rows[0][4]) if rows else None
        return cache[relname]
    return table


# -- applying -----------------------------------------------------------------------------------
def apply_chunk(slave_cur, events, precise=False, debug_level=0):
    """Apply events in one round trip; raise ApplyError naming the failing event.

    A failure leaves the slave's transaction usable, the chunk's work undone (apply_events'
    savepoint). A failure of the grouped plan is retried here in id order, one event per statement
    (precise), so the error names the very event the master's order fails at. debug_level >= 2
    lets a DETAIL quoting a whole row into the message.
    """
    run_planned(slave_cur, plan(events, slave_tables(slave_cur), precise), events, precise, debug_level)


def run_planned(slave_cur, statements, events, precise=False, debug_level=0):
    """apply_chunk's second half: run the statements planned for events."""
    try:
        slave_cur.execute(APPLY_EVENTS, [[s.first_event for s in statements], [s.op for s in statements],
                                         [s.relname for s in statements], [s.sql for s in statements],
                                         [s.rows for s in statements]])
    except psycopg2.DatabaseError as e:
        if not e.pgcode or e.pgcode.startswith(("08", "57P")):
            raise       # the connection, not the statement: the caller retries
        # what apply_events cannot catch (a cancel, a statement timeout): the batch is retried
        raise ApplyError(f"error applying events {events[0].id}..{events[-1].id}: "
                         f"{(e.diag.message_primary or str(e)).strip()}", code=e.pgcode) from e
    failed, code, message, detail, hint = slave_cur.fetchone()
    if failed is None:
        return
    if not precise:
        return apply_chunk(slave_cur, events, True, debug_level)
    raise _apply_error(slave_cur, statements[failed - 1], events, code, message, detail, hint, debug_level)


class Applier:
    """Applies a batch's chunks on the slave, in order, each as apply_chunk does.

    In the background (a batch of several chunks), a worker thread runs the chunks' statements while
    the caller plans the next ones: the slave's server and the daemon's Python then work at the same
    time (psycopg2 lets go of the GIL while it waits for the server). Up to QUEUED chunks wait planned
    behind the one running, so the worker goes from one chunk to the next without waiting for the
    caller's thread to be scheduled (docs/design.md §10). One connection, one statement at a time
    (psycopg2 serialises them); once a chunk fails, the worker runs none of those queued behind it.
    The tables' columns are looked up once per batch, not per chunk, except after a chunk that holds an
    administrator's statement (it may alter a table): every chunk is then waited for, and the tables
    are looked up again. A worker's error is raised by the next call, or on leaving the block; leaving
    always waits for the worker, so the connection is idle before anyone rolls it back.
    """
    QUEUED = 1

    def __init__(self, conn, debug_level=0):
        self.conn, self.debug_level = conn, debug_level
        self.executor = None
        self.pending = collections.deque()  # futures of the chunks given to the worker, oldest first
        self.failed = threading.Event()     # a chunk failed: the worker skips the ones queued after it
        self.cursor = self.tables = None     # the planning side's, kept for the batch

    def __enter__(self):
        self.cursor = self.conn.cursor()
        return self

    def apply(self, events, background=False):
        if self.tables is None:
            self.wait()
            self.tables = slave_tables(self.cursor)
        statements = plan(events, self.tables)
        if any(e.op == "S" for e in events):
            self.tables = None
        if not background:
            self.wait()
            self._run(statements, events)
            return
        while len(self.pending) > self.QUEUED:
            self._wait_oldest()
        if self.executor is None:
            self.executor = concurrent.futures.ThreadPoolExecutor(1, "pyreplica-apply")
        self.pending.append(self.executor.submit(self._run, statements, events))

    def _run(self, statements, events):
        if self.failed.is_set():
            return      # an earlier chunk's error is the one raised
        try:
            with self.conn.cursor() as cur:
                run_planned(cur, statements, events, debug_level=self.debug_level)
        except BaseException:
            self.failed.set()
            raise

    def _wait_oldest(self):
        self.pending.popleft().result()

    def wait(self):
        """Until every chunk given to the worker is applied; raises the first one's error."""
        while self.pending:
            self._wait_oldest()

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is None:
                self.wait()
            else:
                self.failed.set()
                concurrent.futures.wait(self.pending)     # their error is not the one to raise
        finally:
            if self.executor is not None:
                self.executor.shutdown(wait=True)
            self.cursor.close()


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
    if detail and (debug_level >= 2 or not (code in ROW_DETAIL_CODES or ROW_DETAIL.search(detail))):
        text += f"\n  DETAIL: {detail}"
    if hint:
        text += f"\n  HINT: {hint}"
    return ApplyError(text, event, conflict, code, detail, hint)


def position_statement(batch, tables):
    """(query, params) that writes the batch's new position, and the TABLES patterns of the daemon
    that applied it: the last statement of the batch's slave transaction (twophase runs it)."""
    return WRITE_POSITION, {"slave": batch.slave, "cur": batch.end_snapshot, "batch_id": batch.batch_id,
                            "events": batch.applied, "tables": tables}


def record_tables(slave_conn, slave, tables):
    """At start: which tables this daemon takes, for add-table to check (autocommit connection)."""
    with slave_conn.cursor() as cur:
        cur.execute(RECORD_TABLES, (tables, slave))


def held_tables(slave_conn, slave):
    """{relname: state} of the tables held out of this slave's stream."""
    with slave_conn.cursor() as cur:
        cur.execute(HELD_TABLES, (slave,))
        return dict(cur.fetchall())
