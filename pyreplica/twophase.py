"""Two-phase commit of a batch and recovery of in-doubt batches (DESIGN §5).

Order per batch: slave PREPARE (changes + new position), master PREPARE (the slave's confirmed
position), slave COMMIT PREPARED, master COMMIT PREPARED. So the master's record of a slave is
never ahead of the slave, and pruning never removes an event the slave has not applied.
"""
from . import faults, log
from .batch import gid_prefix, parse_gid

OUR_PREPARED = """
SELECT gid FROM pg_prepared_xacts
 WHERE database = current_database() AND gid LIKE %s
"""

CONFIRM = "SELECT public.replica_confirm(%(slave)s, %(cur)s, %(batch_id)s, %(events)s)"

SETTINGS_CHECK = "SELECT current_setting('max_prepared_transactions')::int"


def check_prepared_transactions(conn, side):
    """Refuse to start against a server that cannot prepare transactions."""
    from .db import ReplicaError, fetch_one
    if fetch_one(conn, SETTINGS_CHECK) == 0:
        raise ReplicaError(
            f"the {side} has max_prepared_transactions = 0: pyreplica needs two-phase commit; set "
            f"max_prepared_transactions = 10 (at least the number of pyreplica workers using it, "
            f"or max_connections) in its postgresql.conf and restart it", side)


def prepare_and_commit(master_conn, slave_conn, batch):
    """Finish a batch whose changes are applied (but not committed) on the slave."""
    faults.point("before_slave_prepare")
    slave_conn.tpc_prepare()
    faults.point("after_slave_prepare")
    try:
        with master_conn.cursor() as cur:
            cur.execute(CONFIRM, {"slave": batch.slave, "cur": batch.cur,
                                  "batch_id": batch.batch_id, "events": batch.events})
        master_conn.tpc_prepare()
    except BaseException:
        # The master never recorded the batch: undo the slave's side now rather than at the next
        # start (recovery would roll it back too, by the same rule).
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


def prepared(conn, slave):
    """{batch_id: gid} of this slave's prepared transactions in conn's database."""
    pattern = gid_prefix(slave).replace("_", r"\_").replace("%", r"\%") + "%"
    with conn.cursor() as cur:
        cur.execute(OUR_PREPARED, (pattern,))
        found = {}
        for (gid,) in cur.fetchall():
            parsed = parse_gid(gid)
            if parsed and parsed[0] == slave:
                found[parsed[1]] = gid
        return found


FINISH = {"COMMIT": "COMMIT PREPARED %s", "ROLLBACK": "ROLLBACK PREPARED %s"}


def _finish(conn, verb, gid):
    with conn.cursor() as cur:
        cur.execute(FINISH[verb], (gid,))


def recover(master_conn, slave_conn, slave, slave_batch_id):
    """Settle this slave's in-doubt batches; both connections in autocommit.

    slave prepared + master prepared -> commit both (the crash came after both prepared);
    slave prepared only             -> roll it back (the master never recorded it);
    master prepared only            -> the slave committed it: commit it on the master too,
                                       unless the slave's position shows it did not.
    Returns the number of transactions settled.
    """
    logger = log.get()
    on_slave = prepared(slave_conn, slave)
    on_master = prepared(master_conn, slave)
    settled = 0
    for batch_id in sorted(set(on_slave) | set(on_master)):
        s_gid, m_gid = on_slave.get(batch_id), on_master.get(batch_id)
        if s_gid and m_gid:
            logger.warning("Recovering batch %s: prepared on both sides, committing both", batch_id)
            _finish(slave_conn, "COMMIT", s_gid)
            _finish(master_conn, "COMMIT", m_gid)
        elif s_gid:
            logger.warning("Recovering batch %s: prepared on the slave only, rolling it back", batch_id)
            _finish(slave_conn, "ROLLBACK", s_gid)
        elif slave_batch_id is not None and slave_batch_id >= batch_id:
            logger.warning("Recovering batch %s: committed on the slave, committing it on the master", batch_id)
            _finish(master_conn, "COMMIT", m_gid)
        else:
            logger.warning("Recovering batch %s: the slave never committed it, rolling back on the master", batch_id)
            _finish(master_conn, "ROLLBACK", m_gid)
        settled += 1 + bool(s_gid and m_gid)
    return settled
