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
import psycopg2.extensions

from . import faults, log, master
from .db import ReplicaError, fetch_one

# Only the daemon's own role's are settled: another role that prepared a look-alike gid must never
# have its transaction settled (or taken for a fact about this slave's batches) by recovery. Those
# are named in the log: the daemon may have run as another role before (then it waits for that
# transaction's locks, and only that role or a superuser can settle it).
OUR_PREPARED = """
SELECT gid, owner::text, owner = CURRENT_USER FROM pg_catalog.pg_prepared_xacts
 WHERE database = pg_catalog.current_database() AND gid LIKE %s
"""
# Every pyreplica transaction prepared in this database, any slave's (status, recover's refusal).
IN_DOUBT = """
SELECT gid, prepared, extract(epoch FROM now() - prepared)::float8
  FROM pg_catalog.pg_prepared_xacts
 WHERE database = pg_catalog.current_database() AND gid LIKE 'pyreplica:%'
 ORDER BY prepared
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


# A batch's transactions are driven by SQL on autocommit connections, not by psycopg2's tpc_*
# methods, so that BEGIN travels with a transaction's first statement and PREPARE TRANSACTION with its
# last: four round trips less per batch, which is latency (docs/design.md §5).
# BEGIN[side] is put before the side's first statement (master.batch_start, apply.batch_state).
BEGIN = {"master": "BEGIN ISOLATION LEVEL REPEATABLE READ;\n", "slave": "BEGIN;\n"}
# The master's record of the slave is written in a transaction of its own, after the reading one
# ends: a catch-up step read ahead (replicator.begin_next_step) has a snapshot older than the
# previous step's record, which its REPEATABLE READ transaction could not update. Same round trip.
MASTER_RECORD_BEGIN = b"COMMIT;\nBEGIN ISOLATION LEVEL READ COMMITTED;\n"


def in_transaction(conn):
    return not conn.closed and conn.info.transaction_status in (
        psycopg2.extensions.TRANSACTION_STATUS_INTRANS, psycopg2.extensions.TRANSACTION_STATUS_INERROR)


def rollback(conn, prepared_gid=None):
    """Undo one side's transaction of a batch: ROLLBACK PREPARED once prepared, else ROLLBACK. Quiet:
    what it cannot undo (a lost connection) the server undoes, or recovery settles."""
    try:
        with conn.cursor() as cur:
            if prepared_gid is not None:
                cur.execute(FINISH["ROLLBACK"], (prepared_gid,))
            elif in_transaction(conn):
                cur.execute("ROLLBACK")
    except Exception:
        pass


def _prepare(conn, side, gid, query, params, before=b""):
    """Run the transaction's last statement and PREPARE it, in one round trip."""
    try:
        with conn.cursor() as cur:
            cur.execute(before + cur.mogrify(query, params) + b";\n" + cur.mogrify("PREPARE TRANSACTION %s", (gid,)))
    except psycopg2.Error as e:
        reason = RETRYABLE_PREPARE.get(getattr(e, "pgcode", None))
        if reason is None:
            raise
        raise PrepareRefused(f"PREPARE TRANSACTION refused on the {side}: {reason}; the batch is "
                             f"retried", side) from e


def _commit_prepared(conn, gid):
    with conn.cursor() as cur:
        cur.execute(FINISH["COMMIT"], (gid,))


def prepare_and_commit(master_conn, slave_conn, batch, slave_last):
    """Finish a batch whose changes are applied (but not committed) on the slave. slave_last is the
    (query, params) of the slave transaction's last statement (its new position)."""
    slave_gid, master_gid = batch.gid("slave"), batch.gid("master")
    slave_prepared = False
    faults.point("before_slave_prepare")
    try:
        _prepare(slave_conn, "slave", slave_gid, *slave_last)
        slave_prepared = True
        faults.point("after_slave_prepare")
        _prepare(master_conn, "master", master_gid, master.CONFIRM,
                 (batch.slave, batch.end_snapshot, batch.batch_id, batch.applied, *batch.identity),
                 MASTER_RECORD_BEGIN)
    except BaseException:
        # The master never recorded the batch: undo both sides now (a refused PREPARE is retried
        # on these very connections) rather than at the next start (recovery would roll the
        # slave's side back too, by the same rule).
        rollback(slave_conn, slave_gid if slave_prepared else None)
        rollback(master_conn)
        raise
    faults.point("after_master_prepare")
    _commit_prepared(slave_conn, slave_gid)
    faults.point("after_slave_commit")
    _commit_prepared(master_conn, master_gid)


def prepared(conn, slave, token):
    """{batch_id: gid} of this slave's own prepared transactions in conn's database."""
    pattern = f"pyreplica:{slave}:".replace("_", r"\_").replace("%", r"\%") + "%"
    with conn.cursor() as cur:
        cur.execute(OUR_PREPARED, (pattern,))
        found = {}
        for gid, owner, ours in cur.fetchall():
            parsed = parse_gid(gid)
            if not parsed or parsed.slave != slave or parsed.identity != token:
                continue
            if ours:
                found[parsed.batch_id] = gid
            else:
                log.get().warning("%s is prepared by role %s, not this daemon's: left alone. If it is a batch of "
                                  "this slave's that the daemon prepared as %s, settle it as %s or a superuser "
                                  "(pyreplica recover MASTER SLAVE --name %s)", gid, owner, owner, owner, slave)
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


def in_doubt(conn, side):
    """pyreplica's prepared transactions in this database (normal for an instant mid-batch)."""
    with conn.cursor() as cur:
        cur.execute(IN_DOUBT)
        found = []
        for gid, prepared, age in cur.fetchall():
            parsed = parse_gid(gid)
            slave, batch_id = (parsed.slave, parsed.batch_id) if parsed else (None, None)
            found.append({"side": side, "gid": gid, "slave": slave, "batch_id": batch_id,
                          "prepared": prepared.isoformat(), "age_seconds": round(age, 1)})
        return found
