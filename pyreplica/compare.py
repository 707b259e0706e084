"""`pyreplica compare` (docs/design.md §8): every replicated table's row count and content hash, on both sides,
at one consistent point.

The point: a REPEATABLE READ transaction on the slave reads the slave's position (the master
snapshot it has applied up to, stored with the data it covers); then a REPEATABLE READ transaction
on the master checks that every log event its own snapshot sees is covered by that position. The
slave's snapshot was taken on the master before ours, so it sees no more than ours does; if ours sees
no event beyond it, both transactions see the same replicated changes. While events are pending we
retry (the daemon is running) until --wait runs out, then say how far behind the slave is.

The hash of a table is order-independent: the sum of the md5s of its rows (128 bits, as two
64-bit halves), computed in the server in one pass, with no sort and flat memory however big the
table. Rows are unique by primary key, so equal sums mean equal contents. (md5, not the 2-3 times
cheaper hashtextextended: md5 is the same on every architecture, the master and slave may differ.)
Only a table that differs is read again, in primary-key order on both sides, to name its first
differing rows.
"""
import concurrent.futures
import itertools
import json
import time

import psycopg2
from psycopg2 import sql

from . import apply, master, progress, sequences
from .db import ReplicaError, abandon_and_close, connect, fetch_one, first_line
from .filters import Pipeline

# Row text depends on these settings: both sides must print values the same way.
SESSION = """
SET "TimeZone" = 'UTC';
SET "DateStyle" = 'ISO, YMD';
SET "IntervalStyle" = 'postgres';
SET extra_float_digits = 1;
SET bytea_output = 'hex';
SET lc_monetary = 'C';
"""

SLAVE_COLUMNS = """
SELECT array_agg(a.attname::text) FROM pg_attribute a
 WHERE a.attrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) AND a.attnum > 0 AND NOT a.attisdropped
"""
# Tables add-table or remove-table hold out of this slave's stream (docs/design.md §13): not compared.
HAS_TABLE_STATES = "SELECT pg_catalog.to_regclass('pyreplica.table_states') IS NOT NULL"
HELD_STATES = {"removed": "removed from this slave (remove-table)",
               "copying": "being added (add-table is copying it)",
               "catching_up": "being added (add-table is replaying its changes)"}
HAS_POSITION_TABLE = "SELECT pg_catalog.to_regclass('pyreplica.position') IS NOT NULL"
RETRY_EVERY = 0.2
SHOW_DIFFERENCES = 5        # differing rows named per table
PROGRESS_EVERY = 5.0        # seconds between progress lines for a long table


class Table:
    def __init__(self, schema, name, columns, pk, relname=None):
        self.schema, self.name, self.columns, self.pk = schema, name, columns, pk
        self.ident = sql.Identifier(schema, name)
        self.relname = relname      # as the log names it (format('%I.%I'))

    @property
    def qualified(self):
        return f"{self.schema}.{self.name}"

    @staticmethod
    def as_text(column):
        """A column's value in its type's output form (NULL stays NULL), never through a cast: the
        owner of a type may CREATE CAST (type AS text) WITH FUNCTION, which `::text` would run as
        whoever compares or repairs. concat() calls the output function (and, unlike format, needs
        no %, which a query with parameters would take for one); num_nulls: a composite of NULLs is
        not NULL, unlike IS NULL."""
        return sql.SQL("CASE WHEN pg_catalog.num_nulls({0}) = 0 THEN pg_catalog.concat({0}) END").format(
            sql.Identifier(column))

    def row_text(self, columns):
        return sql.SQL("ROW({})::text").format(sql.SQL(", ").join(map(sql.Identifier, columns)))

    def row_hash(self, columns):
        # md5 of the UTF-8 bytes: md5(text) hashes the database's encoding, which may differ per side
        return sql.SQL("md5(convert_to({}, 'UTF8'))").format(self.row_text(columns))

    def hash_query(self):
        # count and sum of the rows' md5s as two 64-bit halves (numeric: no overflow), folded into one md5
        return sql.SQL("""
            SELECT count(*),
                   md5(count(*) || ':' || coalesce(sum(('x' || left(h, 16))::bit(64)::bigint::numeric), 0)
                                || ':' || coalesce(sum(('x' || right(h, 16))::bit(64)::bigint::numeric), 0))
              FROM (SELECT {row} AS h FROM {table} t) s""").format(
            row=self.row_hash(self.columns), table=self.ident)

    def rows_query(self, with_keys=False):
        """(key text, row md5) in key order; with_keys adds each key column as text, to address the row
        (`pyreplica repair`)."""
        # C collation: the same order on both sides, and Python's str order (code points)
        key = self.row_text(self.pk)
        keys = [self.as_text(c) for c in self.pk] if with_keys else []
        return sql.SQL('SELECT {columns} FROM {table} t ORDER BY {key} COLLATE "C"').format(
            columns=sql.SQL(", ").join([key, self.row_hash(self.columns), *keys]), key=key, table=self.ident)


def replicated_tables(conn, patterns):
    """The captured tables this slave takes; a partition is compared as part of its partitioned table."""
    pipeline = Pipeline(patterns)
    tables = [Table(t.schema, t.name, t.columns, t.pk, t.qualified) for t in master.captured_tables(conn)
              if not t.is_partition and pipeline.wants_table(t.qualified)]
    if not tables:
        raise ReplicaError("the master replicates no table" + (f" matching TABLES {', '.join(patterns)}"
                                                               if patterns else ""), "master")
    return tables


def open_session(dsn, side):
    conn = connect(dsn, side, "pyreplica compare", settings={"search_path": master.SEARCH_PATH})
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(SESSION)
    conn.set_session(isolation_level="REPEATABLE READ", readonly=True, autocommit=False)
    return conn


def slave_position(slave, name):
    with slave.cursor() as cur:
        cur.execute(HAS_POSITION_TABLE)
        if cur.fetchone()[0]:
            row = apply.read_position(slave, name)
            if row:
                return row
    raise ReplicaError(f"the slave has no position for {name}: it never replicated from this master "
                       f"(wrong --name? start `pyreplica run` first)", "slave")


def one_point(master_conn, slave, name, wait):
    """Open both transactions at one point; returns (master snapshot, slave snapshot, slave batch)."""
    deadline = time.monotonic() + wait
    while True:
        snapshot, batch_id = slave_position(slave, name)
        with master_conn.cursor() as cur:
            master_snapshot = master.current_snapshot(cur)   # fixes the snapshot the rest reads with
            cur.execute(master.BEHIND, {"since": snapshot})
            pending = cur.fetchone()[0]
        if pending == 0:
            return master_snapshot, snapshot, batch_id
        master_conn.rollback()
        slave.rollback()
        if time.monotonic() >= deadline:
            raise ReplicaError(f"slave {name} is behind by {pending} events, cannot compare at one point "
                               f"(is `pyreplica run` running for it? waited {wait:g} s; see --wait)")
        time.sleep(RETRY_EVERY)


def slave_problem(slave, table):
    """Why the slave's table cannot be compared, or None."""
    with slave.cursor() as cur:
        cur.execute(SLAVE_COLUMNS, (table.schema, table.name))
        present = cur.fetchone()[0]
    if present is None:
        return "missing on the slave"
    missing = [c for c in table.columns if c not in present]
    extra = [c for c in present if c not in table.columns]
    if missing or extra:
        return "columns differ: " + "; ".join(
            part for part in (missing and f"slave lacks {', '.join(missing)}",
                              extra and f"slave has extra {', '.join(extra)}") if part)
    return None


def fetch(conn, query):
    with conn.cursor() as cur:
        cur.execute(query)
        return cur.fetchone()


def streamed(conn, query, cursor_name):
    with conn.cursor(name=cursor_name) as cur:
        cur.itersize = 5000
        cur.execute(query)
        yield from cur


def merged(mine, theirs):
    """Merge both sides' (key, md5, ...) streams, each in key order: yields (master row, slave row) for
    every key that differs, None for the side that lacks it."""
    m, s = next(mine, None), next(theirs, None)
    while m or s:
        if s is None or (m is not None and m[0] < s[0]):
            yield m, None
            m = next(mine, None)
        elif m is None or s[0] < m[0]:
            yield None, s
            s = next(theirs, None)
        else:
            if m[1] != s[1]:
                yield m, s
            m, s = next(mine, None), next(theirs, None)


def describe(m, s):
    """One difference as `compare` and `repair` name it."""
    if s is None:
        return f"{m[0]} only on the master"
    if m is None:
        return f"{s[0]} only on the slave"
    return f"{m[0]} differs"


def first_differences(master, slave, table, limit=SHOW_DIFFERENCES):
    """The first rows (by primary key) that differ."""
    mine = streamed(master, table.rows_query(), "pyreplica_compare_m")
    theirs = streamed(slave, table.rows_query(), "pyreplica_compare_s")
    found = [describe(m, s) for m, s in itertools.islice(merged(mine, theirs), limit)]
    mine.close()
    theirs.close()
    return found


def compare_table(master, slave, table, pool, position):
    result = {"table": table.qualified, "master_rows": None, "slave_rows": None,
              "master_hash": None, "slave_hash": None, "identical": False, "differences": []}
    problem = slave_problem(slave, table)
    query = table.hash_query()
    describe = lambda elapsed: (f"compare: {table.qualified} ({position}) still hashing after "  # noqa: E731
                                f"{elapsed:.0f} s")
    with progress.every(PROGRESS_EVERY, describe):
        # both sides at once: each connection is used by one thread only
        on_master = pool.submit(fetch, master, query)
        on_slave = None if problem else pool.submit(fetch, slave, query)
        result["master_rows"], result["master_hash"] = on_master.result()
        if on_slave is not None:
            result["slave_rows"], result["slave_hash"] = on_slave.result()
    if problem:
        result["differences"] = [problem]
    elif (result["master_rows"], result["master_hash"]) == (result["slave_rows"], result["slave_hash"]):
        result["identical"] = True
    else:
        with progress.every(PROGRESS_EVERY, lambda e: f"compare: {table.qualified}: looking for the differing "
                                                      f"rows, {e:.0f} s"):
            result["differences"] = first_differences(master, slave, table) or ["hash differs"]
    return result


def collect(config, name, wait):
    master_conn = slave = None
    try:
        master_conn = open_session(config.DSN0, "master")
        master.require_installed(master_conn)
        slave = open_session(config.DSN1, "slave")
        tables = replicated_tables(master_conn, config.TABLES)
        master_conn.rollback()
        master_snapshot, slave_snapshot, batch_id = one_point(master_conn, slave, name, wait)
        report = {"slave": name, "batch_id": batch_id, "master_snapshot": master_snapshot,
                  "slave_snapshot": slave_snapshot, "tables": []}
        held = held_tables(slave, name)
        report["not_compared"] = [{"table": t.qualified, "why": HELD_STATES[held[t.relname]]}
                                  for t in tables if t.relname in held]
        tables = [t for t in tables if t.relname not in held]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for i, table in enumerate(tables, 1):
                report["tables"].append(compare_table(master_conn, slave, table, pool, f"{i} of {len(tables)}"))
        with master_conn.cursor() as mcur, slave.cursor() as scur:
            report["sequences"] = sequences.compare(mcur, scur)
        report["identical"] = (all(t["identical"] for t in report["tables"])
                               and not any(s["problem"] for s in report["sequences"]))
        return report
    finally:
        abandon_and_close(master_conn, slave)


def held_tables(slave, name):
    """{relname: state} of the tables held out of this slave's stream (none before slave schema 4)."""
    if not fetch_one(slave, HAS_TABLE_STATES):
        return {}
    return apply.held_tables(slave, name)


def format_table(report):
    lines = [f"Slave {report['slave']} at batch {report['batch_id']}, compared with the master at snapshot "
             f"{report['master_snapshot']}"]
    rows = [("TABLE", "MASTER ROWS", "SLAVE ROWS", "MASTER HASH", "SLAVE HASH", "RESULT")]
    for t in report["tables"]:
        rows.append((t["table"], _text(t["master_rows"]), _text(t["slave_rows"]), _text(t["master_hash"])[:12],
                     _text(t["slave_hash"])[:12], "identical" if t["identical"] else "DIFFERENT"))
    lines += _columns(rows)
    differing = [t for t in report["tables"] if not t["identical"]]
    for t in differing:
        lines += [f"  {t['table']}: {difference}" for difference in t["differences"]]
    if differing:
        lines.append(f"{len(differing)} of {len(report['tables'])} table(s) differ: "
                     f"{', '.join(t['table'] for t in differing)}")
    else:
        lines.append(f"All {len(report['tables'])} table(s) identical")
    lines += [f"  {t['table']}: not compared: {t['why']}" for t in report["not_compared"]]
    return "\n".join(lines + format_sequences(report["sequences"]))


def format_sequences(found):
    if not found:
        return []
    rows = [("SEQUENCE", "MASTER VALUE", "SLAVE VALUE", "RESULT")]
    rows += [(s["sequence"], _text(s["master_value"]), _text(s["slave_value"]), "DIFFERENT" if s["problem"] else "ok")
             for s in found]
    lines = _columns(rows)
    lines += [f"  {s['sequence']}: {s['problem']}" for s in found if s["problem"]]
    bad = [s for s in found if s["problem"]]
    lines.append(f"{len(bad)} of {len(found)} sequence(s) differ" if bad else f"All {len(found)} sequence(s) ok")
    return lines


def _columns(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _text(value):
    return "-" if value is None else str(value)


def compare(config, slave_name, as_json=False, wait=30.0):
    try:
        report = collect(config, slave_name, wait)
    except psycopg2.Error as e:     # e.g. no right to read a table: one line, not a traceback
        raise ReplicaError(f"compare failed: {first_line(e)}") from e
    print(json.dumps(report, indent=2) if as_json else format_table(report))
    return 0 if report["identical"] else 1
