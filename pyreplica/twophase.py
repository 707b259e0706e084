"""Two-phase commit of a batch, and recovery of in-doubt batches (docs/design.md §5).

Order per batch: slave PREPARE (changes + new position), master PREPARE (the slave's confirmed
position), slave COMMIT PREPARED, master COMMIT PREPARED. So the master's record of a slave is
never ahead of the slave, and pruning never removes an event the slave has not applied.

A gid names pyreplica, the slave's name, the batch, the side, the slave's identity (a token of its
server's system identifier and database) and a random part:
    pyreplica:<slave>:<batch>:<side>:<identity>:<random>
The identity means a daemon only ever settles its own slave's transactions (two slaves given one
name by mistake never touch each other's); the random part means nobody can prepare the daemon's
next gid in advance to stop it.
"""
import hashlib
import secrets
from typing import NamedTuple

import psycopg2

from . import faults, log, master
from .db import ReplicaError, fetch_one

# Only the daemon's own role's: another role that prepared a look-alike gid must never have its
# transaction settled (or taken for a fact about this slave's batches) by recovery.
OUR_PREPARED = """
SELECT gid FROM pg_catalog.pg_prepared_xacts
 WHERE database = pg_catalog.current_database() AND gid LIKE %s AND owner = CURRENT_USER
"""
SETTINGS_CHECK = "SELECT pg_catalog.current_setting('max_prepared_transactions')::int"
FINISH = {"COMMIT": "COMMIT PREPARED %s", "ROLLBACK": "ROLLBACK PREPARED %s"}

# PREPARE refused for reasons that go away: the gid is in use (someone prepared it), or
# max_prepared_transactions is full. One log line and a retry, never an exit.
RETRYABLE_PREPARE = {"42710": "its transaction name is already in use by another prepared transaction",
                     "53200": "max_prepared_transactions is full on that server"}


class PrepareRefused(ReplicaError):
    """PREPARE TRANSACTION failed for a reason that passes: the batch is retried."""


class Gid(NamedTuple):
    slave: str
    batch_id: int
    side: str           # "master" or "slave"
    identity: str       # token of the slave's identity


def identity_token(identity):
    """A short stable token of (system identifier, database) for gids."""
    return hashlib.md5("/".join(identity).encode()).hexdigest()[:12]


def make_gid(slave, batch_id, side, token):
    return f"pyreplica:{slave}:{batch_id}:{side}:{token}:{secrets.token_hex(4)}"


def parse_gid(gid):
    """The Gid of one of pyreplica's transactions, or None for anybody else's."""
    parts = gid.split(":")
    if len(parts) != 6 or parts[0] != "pyreplica" or parts[3] not in ("master", "slave"):
        return None
    try:
        return Gid(parts[1], int(parts[2]), parts[3], parts[4])
    except ValueError:
        return None


def require_two_phase_commit(conn, side):
    """Refuse to start against a server that cannot prepare transactions."""
    if fetch_one(conn, SETTINGS_CHECK) == 0:
        raise ReplicaError(
            f"the {side} has max_prepared_transactions = 0: pyreplica needs two-phase commit; set "
            f"max_prepared_transactions = 10 (at least the number of pyreplica workers using it, "
            f"or max_connections) in its postgresql.conf and restart it", side)


def _prepare(conn, side):
    try:
        conn.tpc_prepare()
    except psycopg2.Error as e:
        reason = RETRYABLE_PREPARE.get(getattr(e, "pgcode", None))
        if reason is None:
            raise
        raise PrepareRefused(f"PREPARE TRANSACTION refused on the {side}: {reason}; the batch is "
                             f"retried", side) from e


def prepare_and_commit(master_conn, slave_conn, batch):
    """Finish a batch whose changes are applied (but not committed) on the slave."""
    faults.point("before_slave_prepare")
    try:
        _prepare(slave_conn, "slave")
        faults.point("after_slave_prepare")
        with master_conn.cursor() as cur:
            master.confirm(cur, batch.slave, batch.end_snapshot, batch.batch_id, batch.applied)
        _prepare(master_conn, "master")
    except BaseException:
        # The master never recorded the batch: undo both sides now (a refused PREPARE is retried
        # on these very connections) rather than at the next start (recovery would roll the
        # slave's side back too, by the same rule).
        for conn in (slave_conn, master_conn):
            try:
                conn.tpc_rollback()
            except Exception:
                pass
        raise
    faults.point("after_master_prepare")
    slave_conn.tpc_commit()
    faults.point("after_slave_commit")
    master_conn.tpc_commit()


def prepared(conn, slave, token):
    """{batch_id: gid} of this slave's own prepared transactions in conn's database."""
    pattern = f"pyreplica:{slave}:".replace("_", r"\_").replace("%", r"\%") + "%"
    with conn.cursor() as cur:
        cur.execute(OUR_PREPARED, (pattern,))
        found = {}
        for (gid,) in cur.fetchall():
            parsed = parse_gid(gid)
            if parsed and parsed.slave == slave and parsed.identity == token:
                found[parsed.batch_id] = gid
        return found


def decide(batch_id, on_slave, on_master, slave_batch, master_batch):
    """What to do with one in-doubt batch: [(side, verb)], from the facts of both sides.

    on_slave / on_master: the batch is prepared there; slave_batch / master_batch: the last batch
    committed on the slave (its stored position) and recorded on the master (None: unknown).
    The rule keeps the master's record never ahead of the slave's data, whoever settled what by hand.
    """
    if on_slave and on_master:
        return [("slave", "COMMIT"), ("master", "COMMIT")]
    if on_slave:
        # the master committed this batch's record (by hand): the slave must commit its data too
        if master_batch is not None and master_batch >= batch_id:
            return [("slave", "COMMIT")]
        return [("slave", "ROLLBACK")]
    if slave_batch is not None and slave_batch >= batch_id:
        return [("master", "COMMIT")]      # the slave committed it: record it on the master
    return [("master", "ROLLBACK")]        # the slave's side was rolled back: so is the record


def recover(master_conn, slave_conn, slave, token, slave_batch, master_batch):
    """Settle this slave's in-doubt batches (both connections in autocommit); returns what was done."""
    logger = log.get()
    on_slave, on_master = prepared(slave_conn, slave, token), prepared(master_conn, slave, token)
    done = []
    for batch_id in sorted(set(on_slave) | set(on_master)):
        actions = decide(batch_id, batch_id in on_slave, batch_id in on_master, slave_batch, master_batch)
        where = " and ".join(side for side in ("slave", "master") if batch_id in (on_slave if side == "slave" else on_master))
        logger.warning("Recovering batch %s (prepared on the %s): %s", batch_id, where,
                       ", ".join(f"{verb} PREPARED on the {side}" for side, verb in actions))
        for side, verb in actions:
            conn, gids = (slave_conn, on_slave) if side == "slave" else (master_conn, on_master)
            with conn.cursor() as cur:
                cur.execute(FINISH[verb], (gids[batch_id],))
            done.append((batch_id, side, verb))
            if verb == "COMMIT" and side == "slave":
                slave_batch = max(slave_batch or 0, batch_id)
            elif verb == "COMMIT":
                master_batch = max(master_batch or 0, batch_id)
    return done
