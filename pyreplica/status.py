"""`pyreplica status` (docs/design.md §8): per slave registered on the master, how far it has got.

Everything is read from the master's registry (pyreplica.replica_slaves) and log: a slave is behind
by the events pyreplica.unapplied() finds for the snapshot it confirmed (docs/design.md §4).
In-doubt prepared transactions are pyreplica's own (twophase's gids), looked for on the master and,
when its DSN is given, on the slave; one older than a minute is an alert (exit code 3). So is a
capture trigger disabled on the master (its table's writes reach no slave), and, with the slave's
DSN, a slave whose own position is behind the master's record of it (settled by hand).
"""
import contextlib
import json
import os

from . import master
from .db import ReplicaError, connect, fetch_one
from .sides import SLAVE_IDENTITY
from .twophase import in_doubt

EXIT_ALERT = 3              # monitoring: a prepared transaction has been in doubt too long
# seconds; only the test suite sets PYREPLICA_TEST_IN_DOUBT_ALERT (as PYREPLICA_TEST_FAULT), so that
# it need not wait a minute: the `prepared` time of a transaction cannot be faked
IN_DOUBT_ALERT = float(os.environ.get("PYREPLICA_TEST_IN_DOUBT_ALERT") or 60.0)

# The slave's own positions, by name (the table exists from its daemon's first start on).
HAS_POSITIONS = "SELECT pg_catalog.to_regclass('pyreplica.position') IS NOT NULL"
SLAVE_POSITIONS = "SELECT slave, batch_id FROM pyreplica.position"


def slaves(master_conn):
    """One dict per registered slave, with its lag."""
    with master_conn.cursor() as cur:
        cur.execute(master.SLAVES)
        return [{"name": name, "batch_id": batch_id, "applied": applied, "confirmed": confirmed,
                 "confirmed_at": confirmed_at.isoformat(), "last_contact": last_contact.isoformat(),
                 "last_contact_seconds": round(contact_age, 1),
                 "events_behind": events, "seconds_behind": round(seconds, 1),
                 "system_identifier": system_id, "database": database}
                for name, batch_id, applied, confirmed, confirmed_at, last_contact, events, seconds, contact_age,
                system_id, database in cur.fetchall()]


def collect(config, only=None):
    """The status report as a dict (what --json prints); `only` narrows it to one slave."""
    with contextlib.closing(connect(config.DSN0, "master", "pyreplica status",
                                    settings={"search_path": master.SEARCH_PATH})) as conn:
        conn.autocommit = True
        master.require_installed(conn)
        report = {"master": conn.info.dbname, "slaves": slaves(conn), "in_doubt": in_doubt(conn, "master"),
                  "capture_off": master.capture_off(conn)}
    if only:
        report["slaves"] = [s for s in report["slaves"] if s["name"] == only]
        report["in_doubt"] = [x for x in report["in_doubt"] if x["slave"] == only]
        if not report["slaves"]:
            raise ReplicaError(f"no slave named {only} is registered on the master", "master")
    if config.DSN1:
        with contextlib.closing(connect(config.DSN1, "slave", "pyreplica status",
                                        settings={"search_path": master.SEARCH_PATH})) as slave:
            slave.autocommit = True
            report["in_doubt"] += in_doubt(slave, "slave")
            report["behind_the_record"] = behind_the_record(slave, report["slaves"])
    return report


def behind_the_record(slave_conn, registered):
    """The slaves of this server whose own position is behind the master's record of them: a batch
    committed on the master and rolled back on the slave by hand. The daemon moves the record back
    at its next start, unless a prune removed events the slave needs meanwhile."""
    with slave_conn.cursor() as cur:
        if not fetch_one(slave_conn, HAS_POSITIONS):
            return []
        cur.execute(SLAVE_IDENTITY)
        system_id, database = cur.fetchone()
        cur.execute(SLAVE_POSITIONS)
        own = dict(cur.fetchall())
    return [{"slave": s["name"], "slave_batch": own.get(s["name"], 0), "master_batch": s["batch_id"]}
            for s in registered
            if (s["system_identifier"], s["database"]) == (system_id, database)
            and own.get(s["name"], 0) < s["batch_id"]]


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _ago(seconds):
    return f"{_duration(seconds)} ago"


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
        lines.append("In-doubt prepared transactions (settled by the daemon at its next start, or by "
                     "`pyreplica recover MASTER SLAVE --name SLAVE`):")
        lines += [f"  {x['side']}: {x['gid']} prepared {x['prepared'][:19]} ({_ago(x['age_seconds'])})"
                  for x in report["in_doubt"]]
    else:
        lines.append("In-doubt prepared transactions: none")
    for alert in report["alerts"]:
        lines.append(f"ALERT: {alert}")
    return "\n".join(lines)


def alerts(report):
    """What a monitoring check must hear about.

    A prepared transaction older than IN_DOUBT_ALERT: it holds back VACUUM of the whole cluster,
    keeps its locks (a re-install, drop-slave, DDL would wait) and its batch is not committed.
    A capture trigger that does not fire: the slaves silently miss that table's writes."""
    in_doubt = [f"{x['side']}: {x['gid']} has been prepared for {_duration(x['age_seconds'])}: it holds back "
                f"VACUUM of the whole {x['side']} cluster and keeps its locks; start the daemon for slave "
                f"{x['slave']} or run `pyreplica recover MASTER SLAVE --name {x['slave']}`"
                for x in report["in_doubt"] if x["age_seconds"] > IN_DOUBT_ALERT]
    capture = [master.capture_off_message(x) for x in report["capture_off"]]
    in_doubt_slaves = {x["slave"] for x in report["in_doubt"]}
    behind = [f"slave {x['slave']} has committed batch {x['slave_batch']} but the master records batch "
              f"{x['master_batch']} for it (settled by hand?): start its daemon now, which moves the record "
              f"back, before a prune removes events the slave still needs"
              for x in report.get("behind_the_record", []) if x["slave"] not in in_doubt_slaves]
    return in_doubt + capture + behind


def status(config, as_json=False, only=None):
    """Print the report; exit code 0, or EXIT_ALERT when something needs a person."""
    report = collect(config, only)
    report["alerts"] = alerts(report)
    print(json.dumps(report, indent=2) if as_json else format_table(report))
    return EXIT_ALERT if report["alerts"] else 0
