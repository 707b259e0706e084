"""Sequences follow the master's (docs/design.md §11).

nextval writes no log row and a sequence ignores rollbacks, so sequences cannot travel in the log.
Each batch reads the master's values (pyreplica.sequence_values(), in the statement that takes the
batch's snapshot and after it, so they are at least the values at that snapshot) and moves every
slave sequence that is behind up to them; never backwards. setval is not transactional either: a
batch that rolls back may leave a slave sequence ahead of its rows, which is harmless (a sequence
only has to stay ahead of the rows).
"""
from psycopg2 import sql

from . import master
from .apply import ApplyError

# Moves every slave sequence that is behind ("behind" in the sequence's own direction) up to the
# master's value and returns those, and the missing ones: one round trip per batch at most.
ADVANCE_BEHIND = """
SELECT f.name, s.oid IS NULL AS missing,
       CASE WHEN s.oid IS NOT NULL THEN pg_catalog.setval(s.oid::regclass, f.value) END
  FROM unnest(%s::text[], %s::bigint[]) AS f(name, value)
  LEFT JOIN pg_catalog.pg_class s ON s.oid = pg_catalog.to_regclass(f.name) AND s.relkind = 'S'
  LEFT JOIN pg_catalog.pg_sequence q ON q.seqrelid = s.oid
 WHERE s.oid IS NULL
    OR pg_catalog.pg_sequence_last_value(s.oid) IS NULL
    OR pg_catalog.sign(q.seqincrement) * (f.value - pg_catalog.pg_sequence_last_value(s.oid)) > 0
"""


def catch_up(slave_cur, values, known):
    """Bring the slave's sequences up to `values` (read by master.batch_start). `known` is what an
    earlier batch of this daemon already set: unchanged sequences cost nothing. Returns the
    sequences moved."""
    changed = {name: value for name, value in values.items() if known.get(name) != value}
    if not changed:
        return []
    slave_cur.execute(ADVANCE_BEHIND, (list(changed), list(changed.values())))
    moved = slave_cur.fetchall()
    missing = [name for name, gone, _ in moved if gone]
    if missing:
        raise ApplyError(f"sequence {', '.join(missing)} of the master is missing on the slave: create it "
                         f"there (it must follow the master's), or, for a sequence named with "
                         f"py_log_create_seq, stop following it on the master with py_log_drop_seq")
    known.update(changed)
    return [name for name, _, _ in moved]


# -- compare ------------------------------------------------------------------------------------
SLAVE_SEQUENCE = """
SELECT pg_catalog.pg_sequence_last_value(s.oid), pg_catalog.sign(q.seqincrement)::int
  FROM pg_catalog.pg_class s JOIN pg_catalog.pg_sequence q ON q.seqrelid = s.oid
 WHERE s.oid = pg_catalog.to_regclass(%s) AND s.relkind = 'S'
"""
# The columns a sequence numbers on the slave: serial and identity columns depend on it, a DEFAULT
# calling nextval depends the other way round.
SEQUENCE_COLUMNS = """
SELECT n.nspname::text, t.relname::text, a.attname::text
  FROM pg_catalog.pg_depend d
  LEFT JOIN pg_catalog.pg_attrdef ad ON d.classid = 'pg_catalog.pg_attrdef'::regclass AND ad.oid = d.objid
  JOIN pg_catalog.pg_class t ON t.oid = coalesce(ad.adrelid, d.refobjid)
  JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace
  JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attnum = coalesce(ad.adnum, d.refobjsubid)
 WHERE d.refclassid = 'pg_catalog.pg_class'::regclass
   AND ((d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = pg_catalog.to_regclass(%(seq)s)
         AND d.deptype IN ('a', 'i'))
        OR (ad.oid IS NOT NULL AND d.refobjid = pg_catalog.to_regclass(%(seq)s)))
"""
EXTREME = sql.SQL("SELECT {}({}) FROM {}")


def compare(master_cur, slave_cur):
    """One entry per followed sequence: both values and what is wrong, if anything. A slave value
    below the highest value in the rows it numbers is a difference (promoted, the slave would
    collide); below the master's value it is not by itself: nextval runs in transactions still
    open or rolled back, which no batch waits for."""
    found = []
    for name, master_value in master.sequence_values(master_cur).items():
        entry = {"sequence": name, "master_value": master_value, "slave_value": None, "problem": None}
        slave_cur.execute(SLAVE_SEQUENCE, (name,))
        row = slave_cur.fetchone()
        if row is None:
            entry["problem"] = "missing on the slave"
        else:
            entry["slave_value"], direction = row
            entry["problem"] = _below_rows(slave_cur, name, entry["slave_value"], direction)
        found.append(entry)
    return found


def _below_rows(slave_cur, name, value, direction):
    slave_cur.execute(SEQUENCE_COLUMNS, {"seq": name})
    for schema, table, column in slave_cur.fetchall():
        extreme = sql.SQL("max" if direction > 0 else "min")
        slave_cur.execute(EXTREME.format(extreme, sql.Identifier(column), sql.Identifier(schema, table)))
        used = slave_cur.fetchone()[0]
        if used is not None and (value is None or direction * (used - value) > 0):
            return (f"slave's value {'(never used)' if value is None else value} is "
                    f"{'below the highest' if direction > 0 else 'above the lowest'} value in its rows ({used})")
    return None
