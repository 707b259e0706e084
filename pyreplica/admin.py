"""Small administrative commands on the master."""
import contextlib

from .db import ReplicaError, connect, fetch_one

DROP_SLAVE = "SELECT public.replica_drop_slave(%s)"


def drop_slave(master_dsn, name):
    """Forget a slave on the master, so the log is pruned without waiting for it."""
    with contextlib.closing(connect(master_dsn, "master")) as conn:
        conn.autocommit = True
        if not fetch_one(conn, DROP_SLAVE, (name,)):
            raise ReplicaError(f"no slave named {name} is registered on the master", "master")
    print(f"slave {name} dropped: the master's log no longer waits for it")
    return 0
