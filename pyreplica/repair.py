"""`pyreplica repair` (docs/design.md §8): make one diverged table on the slave equal to the master's,
at one consistent point, while the daemon runs and writers write.

The point: one slave transaction takes LOCK TABLE ... IN EXCLUSIVE MODE (the daemon's writes to that
table wait for us; a batch that already wrote to it, prepared or not, finishes first), then reads the
slave's position P. No batch can change the table until we commit, so the table is the master's as
of P plus whatever diverged. A REPEATABLE READ transaction on the master then checks that its
snapshot S sees no event for that table beyond P: S was taken after P, so the master's table is the
same at S as at P, and reading it at S is reading it at P. While events for the table are pending
(the daemon cannot apply them while we hold the lock) we release everything and retry until --wait
runs out, as compare does.

Then both sides stream (key, md5 of the row) in key order (compare's queries) and the merge names
every differing key. The differences are applied in batches inside the same slave transaction, with
session_replication_role = replica as the daemon replays: delete what only the slave has, insert
what only the master has, update what differs (the master's values, read again by key). Each
statement's row count is checked; any surprise rolls everything back. --dry-run rolls back too,
having changed nothing. Memory stays flat: server-side cursors and batches of BATCH_KEYS keys.
"""
import json
import time
from dataclasses import dataclass, field

import psycopg2
from psycopg2 import sql

from . import apply, compare, master, progress
from .db import ReplicaError, abandon_and_close, connect, first_line, safe_dsn
from .filters import Pipeline

BATCH_KEYS = 500            # differing keys read from the master and written to the slave at once
LOCK_TRY = "1s"             # one attempt at the slave table's lock; retried until --wait runs out
RETRY_EVERY = 0.2
DONE = {"insert": "inserted", "update": "updated", "delete": "deleted"}

# Events the daemon has yet to apply to this table (or to one of its partitions), and administrator's
# SQL, which may touch any table: while any is pending, the two sides are not at one point.
PENDING = """
SELECT count(*) FROM pyreplica.unapplied(%(since)s::pg_snapshot) l
 WHERE l.op = 'S'
    OR l.relname = %(table)s
    OR l.relname IN (SELECT pg_catalog.format('%%I.%%I', n.nspname, c.relname)
                       FROM pg_catalog.pg_partition_tree(%(table)s::regclass) p
                       JOIN pg_catalog.pg_class c ON c.oid = p.relid
                       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace)
"""
SLAVE_PRIMARY_KEY = """
SELECT array_agg(a.attname::text ORDER BY k.ord)
  FROM pg_catalog.pg_index i
 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
  JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
 WHERE i.indrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) AND i.indisprimary
"""


class Table(compare.Table):
    """compare's table, plus the columns a statement may write (no generated ones)."""

    def __init__(self, captured):
        super().__init__(captured.schema, captured.name, captured.columns, captured.pk)
        self.written = captured.written_columns
        self.relname = captured.qualified     # quoted, as the log names it

    def _key_matches(self, count):
        """(k1, k2) IN ((%s, %s), ...): untyped literals, each read as its key column's type."""
        one = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() * len(self.pk)))
        return sql.SQL("({}) IN ({})").format(sql.SQL(", ").join(map(sql.Identifier, self.pk)),
                                              sql.SQL(", ").join([one] * count))

    def master_rows_query(self, count):
        # every value as text: the slave reads it back as its column's type (compare.SESSION pins formats)
        return sql.SQL("SELECT {keys}, {values} FROM {table} WHERE {match}").format(
            keys=sql.SQL(", ").join(map(self.as_text, self.pk)),
            values=sql.SQL(", ").join(map(self.as_text, self.written)),
            table=self.ident, match=self._key_matches(count))

    def delete_query(self, count):
        return sql.SQL("DELETE FROM {} WHERE {}").format(self.ident, self._key_matches(count))

    def insert_query(self, count, update=False):
        row = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() * len(self.written)))
        query = sql.SQL("INSERT INTO {table} ({columns}) OVERRIDING SYSTEM VALUE VALUES {rows}").format(
            table=self.ident, columns=sql.SQL(", ").join(map(sql.Identifier, self.written)),
            rows=sql.SQL(", ").join([row] * count))
        if not update:
            return query
        # a row that differs: its key is there, the rest takes the master's values (the key itself
        # when there is nothing else, so a generated column is computed again)
        targets = [c for c in self.written if c not in self.pk] or self.pk
        return query + sql.SQL(" ON CONFLICT ({keys}) DO UPDATE SET {sets}").format(
            keys=sql.SQL(", ").join(map(sql.Identifier, self.pk)),
            sets=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in targets))


@dataclass
class Report:
    slave: str
    table: str
    dry_run: bool
    batch_id: int = None
    master_snapshot: str = None
    slave_snapshot: str = None
    master_rows: int = 0
    slave_rows: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    differences: list = field(default_factory=list)     # the first ones, as compare names them

    @property
    def identical(self):
        return self.inserted == self.updated == self.deleted == 0


# -- refusals ---------------------------------------------------------------------------------------
def find_table(master_conn, patterns, wanted):
    """The replicated table named `wanted` (name, schema.name or "schema"."name"), or a clear refusal."""
    captured = master.captured_tables(master_conn)
    found = [t for t in captured if wanted in (t.qualified, f"{t.schema}.{t.name}")]
    found = found or [t for t in captured if t.name == wanted]
    shown = safe_dsn(wanted)    # a connection string given in its place must not show its password
    if not found:
        raise ReplicaError(f"table {shown} is not replicated by this master: repair works on captured tables "
                           f"(`pyreplica compare` lists them)", "master")
    if len(found) > 1:
        raise ReplicaError(f"table name {shown} is ambiguous: {', '.join(t.qualified for t in found)} "
                           f"(give the schema)", "master")
    (table,) = found
    if table.is_partition:
        raise ReplicaError(f"table {table.qualified} is a partition: repair the partitioned table it belongs to",
                           "master")
    if patterns and not Pipeline(patterns).wants_table(table.qualified):
        raise ReplicaError(f"table {table.qualified} is not replicated to this slave (not in the config's "
                           f"TABLES)", "master")
    if not table.pk:
        raise ReplicaError(f"table {table.qualified} has no primary key on the master: repair matches rows "
                           f"by primary key (add one on both sides)", "master")
    return Table(table)


def check_slave_table(slave, table):
    problem = compare.slave_problem(slave, table)
    if problem == "missing on the slave":
        raise ReplicaError(f"cannot repair {table.qualified}: it is missing on the slave (create it there "
                           f"first)", "slave")
    if problem:
        raise ReplicaError(f"cannot repair {table.qualified}: {problem} (make the slave's columns the "
                           f"master's first)", "slave")
    with slave.cursor() as cur:
        cur.execute(SLAVE_PRIMARY_KEY, (table.schema, table.name))
        pk = cur.fetchone()[0]
    if pk != table.pk:
        theirs = f"({', '.join(pk)})" if pk else "none"
        raise ReplicaError(f"cannot repair {table.qualified}: the slave's primary key is {theirs}, the "
                           f"master's ({', '.join(table.pk)})", "slave")


# -- the consistent point ---------------------------------------------------------------------------
def open_slave(dsn, dry_run):
    conn = connect(dsn, "slave", "pyreplica repair", settings={"search_path": master.SEARCH_PATH})
    conn.autocommit = True
    with conn.cursor() as cur:
        if not dry_run:
            apply.start_session(cur)        # replay's role: no trigger, no FK action fires
        cur.execute(compare.SESSION)        # after it: row text must print as on the master
    # READ COMMITTED whatever the database's default: the position is read after the lock is granted,
    # so it is the latest one
    conn.set_session(isolation_level="READ COMMITTED", autocommit=False)
    return conn


def lock(slave, table):
    """Lock the slave's table against the daemon; False when it stayed locked for LOCK_TRY."""
    with slave.cursor() as cur:
        cur.execute("SET LOCAL lock_timeout = %s", (LOCK_TRY,))
        try:
            cur.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(table.ident))
        except psycopg2.errors.LockNotAvailable:
            slave.rollback()
            return False
        cur.execute("SET LOCAL lock_timeout = 0")
    return True


def one_point(master_conn, slave, name, table, wait, report):
    """Hold the slave's table locked at a position the master's snapshot agrees with for that table."""
    deadline = time.monotonic() + wait
    while True:
        pending = None
        if lock(slave, table):
            snapshot, batch_id = compare.slave_position(slave, name)
            with master_conn.cursor() as cur:
                master_snapshot = master.current_snapshot(cur)   # fixes the snapshot the rest reads with
                cur.execute(PENDING, {"since": snapshot, "table": table.relname})
                pending = cur.fetchone()[0]
            if pending == 0:
                report.batch_id, report.slave_snapshot, report.master_snapshot = batch_id, snapshot, master_snapshot
                return
            master_conn.rollback()
            slave.rollback()            # lets the daemon apply them
        if time.monotonic() >= deadline:
            if pending is None:
                raise ReplicaError(f"the slave's table {table.qualified} stayed locked for {wait:g} s, cannot "
                                   f"repair it (a batch prepared and never committed? `pyreplica status` lists "
                                   f"them, `pyreplica recover` settles them; see --wait)", "slave")
            raise ReplicaError(f"slave {name} has {pending} events for {table.qualified} not applied yet, cannot "
                               f"repair at one point (is `pyreplica run` running for it? waited {wait:g} s; "
                               f"see --wait)")
        time.sleep(RETRY_EVERY)


# -- differences ------------------------------------------------------------------------------------
def repair_rows(master_conn, slave, table, report):
    """Merge both sides' streams; apply the differences in batches unless it is a dry run."""
    on_master = compare.streamed(master_conn, table.rows_query(with_keys=True), "pyreplica_repair_m")
    on_slave = compare.streamed(slave, table.rows_query(with_keys=True), "pyreplica_repair_s")
    mine, theirs = counted(on_master, report, "master_rows"), counted(on_slave, report, "slave_rows")
    batch = {"insert": [], "update": [], "delete": []}
    describe = lambda elapsed: (f"repair: {table.qualified}: {report.master_rows} master rows compared, "  # noqa: E731
                                f"{report.inserted + report.updated + report.deleted} differences, "
                                f"{elapsed:.0f} s")
    with progress.every(compare.PROGRESS_EVERY, describe):
        for m, s in compare.merged(mine, theirs):
            kind = "insert" if s is None else "delete" if m is None else "update"
            setattr(report, DONE[kind], getattr(report, DONE[kind]) + 1)
            if len(report.differences) < compare.SHOW_DIFFERENCES:
                report.differences.append(compare.describe(m, s))
            if not report.dry_run:
                batch[kind].append(tuple((m or s)[2:]))
                if sum(map(len, batch.values())) >= BATCH_KEYS:
                    apply_batch(master_conn, slave, table, batch)
                    batch = {"insert": [], "update": [], "delete": []}
        if not report.dry_run:
            apply_batch(master_conn, slave, table, batch)
    for rows in (on_master, on_slave):
        rows.close()


def counted(rows, report, attribute):
    for row in rows:
        setattr(report, attribute, getattr(report, attribute) + 1)
        yield row


def apply_batch(master_conn, slave, table, batch):
    """Deletes first (a key the master has under another spelling comes back as an insert), then the
    master's rows, read by key at the master's snapshot."""
    with slave.cursor() as cur:
        if batch["delete"]:
            execute_checked(cur, table.delete_query(len(batch["delete"])), batch["delete"], table)
        for kind in ("insert", "update"):
            keys = batch[kind]
            if not keys:
                continue
            with master_conn.cursor() as mcur:
                mcur.execute(table.master_rows_query(len(keys)), [v for key in keys for v in key])
                rows = [row[len(table.pk):] for row in mcur.fetchall()]
            if len(rows) != len(keys):
                raise ReplicaError(f"repair of {table.qualified}: the master returned {len(rows)} rows for "
                                   f"{len(keys)} keys; nothing was changed")
            execute_checked(cur, table.insert_query(len(rows), update=kind == "update"), rows, table)


def execute_checked(cur, query, rows, table):
    cur.execute(query, [v for row in rows for v in row])
    if cur.rowcount != len(rows):
        raise ReplicaError(f"repair of {table.qualified}: a statement touched {cur.rowcount} rows instead of "
                           f"{len(rows)}; nothing was changed", "slave")


# -- the command ------------------------------------------------------------------------------------
def collect(config, name, wanted, dry_run, wait):
    master_conn = slave = None
    try:
        master_conn = compare.open_session(config.DSN0, "master")
        master.require_installed(master_conn)
        table = find_table(master_conn, config.TABLES, wanted)
        master_conn.rollback()
        slave = open_slave(config.DSN1, dry_run)
        compare.slave_position(slave, name)      # refuse an unknown name before anything else
        check_slave_table(slave, table)
        slave.rollback()
        report = Report(name, f"{table.schema}.{table.name}", dry_run)
        one_point(master_conn, slave, name, table, wait, report)
        repair_rows(master_conn, slave, table, report)
        if dry_run:
            slave.rollback()
        else:
            slave.commit()
        return report
    finally:
        abandon_and_close(master_conn, slave)


def format_report(report):
    lines = [f"Slave {report.slave} at batch {report.batch_id}, {report.table} compared with the master at "
             f"snapshot {report.master_snapshot} ({report.master_rows} master rows, {report.slave_rows} slave rows)"]
    lines += [f"  {report.table}: {difference}" for difference in report.differences]
    counts = f"{report.inserted} inserted, {report.updated} updated, {report.deleted} deleted"
    if report.identical:
        lines.append(f"{report.table} identical: nothing to repair")
    elif report.dry_run:
        lines.append(f"Dry run, nothing changed: {report.table} would have {counts}")
    else:
        lines.append(f"Repaired {report.table}: {counts}")
    return "\n".join(lines)


def repair(config, slave_name, table, dry_run=False, as_json=False, wait=30.0):
    """Exit 0 when repaired (or identical); a dry run exits 1 when the table differs, like compare."""
    try:
        report = collect(config, slave_name, table, dry_run, wait)
    except psycopg2.Error as e:     # e.g. no right to lock the table: one line, not a traceback
        raise ReplicaError(f"repair failed, nothing was changed: {first_line(e)}") from e
    if as_json:
        print(json.dumps({**report.__dict__, "identical": report.identical}, indent=2))
    else:
        print(format_report(report))
    return 1 if dry_run and not report.identical else 0
