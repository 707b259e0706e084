"""`pyreplica status` (DESIGN §8): per slave registered on the master, how far it has got.

Everything is read from the master's registry (replica_slaves) and log: a slave is behind by the
log rows whose transaction is not visible in the snapshot it confirmed (DESIGN §4). In-doubt
prepared transactions are pyreplica's own (gid `pyreplica:<slave>:<batch>:<side>`), looked for on
the master and, when its DSN is given, on the slave.
"""
import contextlib
import json

from .batch import parse_gid
from .db import ReplicaError, connect

MASTER_INSTALLED = "SELECT to_regclass('public.replica_slaves') IS NOT NULL"

# The txid range lets the log's txid index do the work: a transaction below the snapshot's xmin is
# visible in it (committed) or never logged anything (rolled back).
SLAVES = """
SELECT s.name, s.batch_id, s.applied, s.confirmed::text, s.confirmed_at, s.last_contact,
       behind.events,
       coalesce(extract(epoch FROM now() - behind.oldest), 0)::float8,
       extract(epoch FROM now() - s.last_contact)::float8
  FROM public.replica_slaves s
 CROSS JOIN LATERAL (
       SELECT count(*) AS events, min(l.ts) AS oldest
         FROM public.replica_log l
        WHERE l.txid >= pg_snapshot_xmin(s.confirmed)
          AND NOT pg_visible_in_snapshot(l.txid, s.confirmed)) behind
 ORDER BY s.name
"""

IN_DOUBT = """
SELECT gid, prepared, extract(epoch FROM now() - prepared)::float8
  FROM pg_prepared_xacts
 WHERE database = current_database() AND gid LIKE 'pyreplica:%'
 ORDER BY prepared
"""


def slaves(master_conn):
    """One dict per registered slave, with its lag."""
    with master_conn.cursor() as cur:
        cur.execute(SLAVES)
        return [{"name": name, "batch_id": batch_id, "applied": applied, "confirmed": confirmed,
                 "confirmed_at": confirmed_at.isoformat(), "last_contact": last_contact.isoformat(),
                 "last_contact_seconds": round(contact_age, 1),
                 "events_behind": events, "seconds_behind": round(seconds, 1)}
                for name, batch_id, applied, confirmed, confirmed_at, last_contact, events, seconds, contact_age
                in cur.fetchall()]


def in_doubt(conn, side):
    """pyreplica's prepared transactions in this database (normal for an instant mid-batch)."""
    with conn.cursor() as cur:
        cur.execute(IN_DOUBT)
        found = []
        for gid, prepared, age in cur.fetchall():
            slave, batch_id, _ = parse_gid(gid) or (None, None, None)
            found.append({"side": side, "gid": gid, "slave": slave, "batch_id": batch_id,
                          "prepared": prepared.isoformat(), "age_seconds": round(age, 1)})
        return found


def collect(config, only=None):
    """The status report as a dict (what --json prints); `only` narrows it to one slave."""
    with contextlib.closing(connect(config.DSN0, "master", "pyreplica status")) as master:
        master.autocommit = True
        with master.cursor() as cur:
            cur.execute(MASTER_INSTALLED)
            if not cur.fetchone()[0]:
                raise ReplicaError(f"the master database {master.info.dbname} has no pyreplica installed "
                                   f"(run master-install.sql on it)", "master")
        report = {"master": master.info.dbname, "slaves": slaves(master), "in_doubt": in_doubt(master, "master")}
    if only:
        report["slaves"] = [s for s in report["slaves"] if s["name"] == only]
        report["in_doubt"] = [x for x in report["in_doubt"] if x["slave"] == only]
        if not report["slaves"]:
            raise ReplicaError(f"no slave named {only} is registered on the master", "master")
    if config.DSN1:
        with contextlib.closing(connect(config.DSN1, "slave", "pyreplica status")) as slave:
            slave.autocommit = True
            report["in_doubt"] += in_doubt(slave, "slave")
    return report


def _ago(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def format_table(report):
    lines = [f"Master {report['master']}: {len(report['slaves'])} slave(s) registered"]
    if report["slaves"]:
        rows = [("SLAVE", "BATCH", "APPLIED", "EVENTS BEHIND", "SECONDS BEHIND", "LAST CONTACT")]
        rows += [(s["name"], str(s["batch_id"]), str(s["applied"]), str(s["events_behind"]),
                  f"{s['seconds_behind']:.1f}", f"{s['last_contact'][:19]} ({_ago(s['last_contact_seconds'])})")
                 for s in report["slaves"]]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if report["in_doubt"]:
        lines.append("In-doubt prepared transactions (settled by the daemon at its next start):")
        lines += [f"  {x['side']}: {x['gid']} prepared {x['prepared'][:19]} ({_ago(x['age_seconds'])})"
                  for x in report["in_doubt"]]
    else:
        lines.append("In-doubt prepared transactions: none")
    return "\n".join(lines)


def status(config, as_json=False, only=None):
    report = collect(config, only)
    print(json.dumps(report, indent=2) if as_json else format_table(report))
    return 0
