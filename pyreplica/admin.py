"""Administrative commands: register, drop-slave, recover (docs/design.md §6, §5)."""
import contextlib

import psycopg2

from . import log, master
from .db import ReplicaError, connect, first_line
from .filters import Pipeline
from .sides import Sides

LOCK_TIMEOUT = "5s"     # a registry row locked by an in-doubt batch must not hang the command


@contextlib.contextmanager
def master_session(dsn):
    with contextlib.closing(connect(dsn, "master", settings={"search_path": master.SEARCH_PATH,
                                                              "lock_timeout": LOCK_TIMEOUT})) as conn:
        conn.autocommit = True
        master.require_installed(conn)
        yield conn


def drop_slave(master_dsn, name):
    """Forget a slave on the master, so the log is pruned without waiting for it."""
    with master_session(master_dsn) as conn:
        try:
            dropped = master.drop_slave(conn, name)
        except psycopg2.errors.LockNotAvailable:
            raise ReplicaError(f"slave {name}'s registration is locked by one of its batches prepared (in doubt) on "
                               f"the master: settle it first (pyreplica recover MASTER SLAVE, or start its daemon)",
                               "master") from None
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
            raise ReplicaError(first_line(e).removeprefix("ERROR:").strip().removeprefix("pyreplica: "),
                               "master") from e
    print(f"slave {name} registered on the master at snapshot {snapshot}: the master keeps every event from "
          f"now on for it. Copy the data now (with writers stopped, or use pyreplica clone instead), then start "
          f"`pyreplica run` for it")
    return 0


def recover(config, name):
    """Settle this slave's in-doubt batches and reconcile both records, without replicating."""
    sides = Sides(config, name, Pipeline(config.TABLES), log.get())
    try:
        sides.open()
        snapshot, batch_id = sides.position
    finally:
        sides.close()
    print(f"slave {name}: nothing in doubt; the slave and the master's record agree at batch {batch_id}")
    return 0
