"""Administrative commands: register, drop-slave, recover, skip-event (docs/design.md §6, §5)."""
import contextlib

import psycopg2

from . import apply, log, master
from .db import ReplicaError, connect, refusal
from .filters import Pipeline
from .sides import Sides

LOCK_TIMEOUT = "5s"     # a registry row locked by an in-doubt batch must not hang the command

SKIP_ON_MASTER = "SELECT event_txid, description FROM pyreplica.skip_event(%s::text, %s::bigint)"
SKIP_ON_SLAVE = """
INSERT INTO pyreplica.skip_requests (slave, event_id, txid, described) VALUES (%s, %s, %s::xid8, %s)
ON CONFLICT (slave, event_id) DO NOTHING
"""


@contextlib.contextmanager
def master_session(dsn):
    with contextlib.closing(connect(dsn, "master", settings={"search_path": master.SEARCH_PATH,
                                                              "lock_timeout": LOCK_TIMEOUT})) as conn:
        conn.autocommit = True
        master.require_installed(conn)
        yield conn


def locked_by_in_doubt_batch(name, what, side):
    """The error for a lock_timeout behind one of slave `name`'s batches, prepared and left in doubt."""
    return ReplicaError(f"slave {name}'s {what} is locked by one of its batches prepared (in doubt) on the {side}: "
                        f"settle it first (pyreplica recover MASTER SLAVE --name {name}, or start its daemon)", side)


def drop_slave(master_dsn, name):
    """Forget a slave on the master, so the log is pruned without waiting for it."""
    with master_session(master_dsn) as conn:
        try:
            dropped = master.drop_slave(conn, name)
        except psycopg2.errors.LockNotAvailable:
            raise locked_by_in_doubt_batch(name, "registration", "master") from None
        if not dropped:
            raise ReplicaError(f"no slave named {name} is registered on the master", "master")
    print(f"slave {name} dropped: the master's log no longer waits for it")
    return 0


def register(master_dsn, name):
    """Register a slave at the master's current snapshot, before its data is copied by hand."""
    with master_session(master_dsn) as conn:
        try:
            snapshot = master.register(conn, name)
        except psycopg2.Error as e:
            raise refusal(e, "master") from e
    print(f"slave {name} registered on the master at snapshot {snapshot}: the master keeps every event from "
          f"now on for it. Copy the data now (with writers stopped, or use pyreplica clone instead), then start "
          f"`pyreplica run` for it")
    return 0


def recover(config, name):
    """Settle this slave's in-doubt batches and reconcile both records, without replicating."""
    sides = Sides(config, name, Pipeline(config.TABLES), log.get(), may_register=False)
    try:
        sides.open()
        snapshot, batch_id = sides.position
    finally:
        sides.close()
    print(f"slave {name}: nothing in doubt; the slave and the master's record agree at batch {batch_id}")
    return 0


def skip_event(config, name, event_id):
    """Tell slave `name`'s daemon to skip exactly event `event_id`, recorded on both sides: first on
    the master, which refuses an event not pending for this slave, then on the slave, where the
    daemon reads it. Running it again is harmless (e.g. after the slave's side failed)."""
    with master_session(config.DSN0) as conn:
        try:
            with conn.cursor() as cur:
                cur.execute(SKIP_ON_MASTER, (name, event_id))
                txid, described = cur.fetchone()
        except psycopg2.Error as e:
            raise refusal(e, "master") from e
    with contextlib.closing(connect(config.DSN1, "slave", settings={"search_path": master.SEARCH_PATH,
                                                                    "lock_timeout": LOCK_TIMEOUT})) as conn:
        conn.autocommit = True
        apply.install(conn, check_owners=False)
        try:
            with conn.cursor() as cur:
                cur.execute(SKIP_ON_SLAVE, (name, event_id, txid, described))
        except psycopg2.errors.LockNotAvailable:
            # the request's row is updated by the batch that skips the event: that batch is in doubt
            raise locked_by_in_doubt_batch(name, f"request to skip event {event_id}", "slave") from None
    print(f"event {event_id} ({described}) will be skipped by slave {name}: recorded on the master and on the "
          f"slave; its daemon leaves it out of its next batch (and logs and mails it)")
    return 0
