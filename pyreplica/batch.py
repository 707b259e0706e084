"""Choosing what to replay (DESIGN §4): batches between two master snapshots.

A batch holds the events whose transaction is visible in the new snapshot and not in the previous
one, in id order. Events of transactions still open are not visible yet and come in a later batch;
those of rolled-back transactions never become visible. xid8 comparisons are wraparound-safe.
"""
from collections import namedtuple
from dataclasses import dataclass

Event = namedtuple("Event", "id txid relname op sql username")

# Runs first in the batch's REPEATABLE READ transaction on the master, so the transaction's own
# snapshot, which the event query reads with, is this very snapshot.
CURRENT_SNAPSHOT = "SELECT pg_current_snapshot()::text"

# %(prev)s / %(cur)s are snapshots; the txid range lets the txid index do the work.
BATCH_EVENTS = """
SELECT id, txid::text, relname, op::text, sql, username::text
  FROM public.replica_log
 WHERE txid >= pg_snapshot_xmin(%(prev)s::pg_snapshot)
   AND txid <  pg_snapshot_xmax(%(cur)s::pg_snapshot)
   AND pg_visible_in_snapshot(txid, %(cur)s::pg_snapshot)
   AND NOT pg_visible_in_snapshot(txid, %(prev)s::pg_snapshot)
   AND (%(skip_user)s::text IS NULL OR username::text <> %(skip_user)s::text)
 ORDER BY id
"""

FETCH_ROWS = 2000  # rows per network fetch from the master's server-side cursor


@dataclass
class Batch:
    slave: str          # the slave's name on the master
    batch_id: int       # previous batch's id + 1
    prev: str           # snapshot the slave has applied up to
    cur: str            # snapshot this batch brings it to
    events: int = 0     # events applied (after filters)

    def gid(self, side):
        """Global transaction id of this batch on one side: names pyreplica, the slave and the batch."""
        return f"pyreplica:{self.slave}:{self.batch_id}:{side}"


def gid_prefix(slave):
    return f"pyreplica:{slave}:"


def parse_gid(gid):
    """(slave, batch_id, side) of one of our gids, or None for anybody else's."""
    parts = gid.split(":")
    if len(parts) != 4 or parts[0] != "pyreplica" or parts[3] not in ("master", "slave"):
        return None
    try:
        return parts[1], int(parts[2]), parts[3]
    except ValueError:
        return None


def take_snapshot(master_cur):
    master_cur.execute(CURRENT_SNAPSHOT)
    return master_cur.fetchone()[0]


def stream_events(master_conn, batch, skip_user=None, max_events=5000, max_bytes=8 << 20):
    """Yield the batch's events in id order, in lists bounded by count and bytes.

    Reads through a server-side cursor, so memory stays flat however large the batch is.
    """
    with master_conn.cursor(name=f"pyreplica_batch_{batch.batch_id}") as cur:
        cur.itersize = FETCH_ROWS
        cur.execute(BATCH_EVENTS, {"prev": batch.prev, "cur": batch.cur, "skip_user": skip_user or None})
        chunk, size = [], 0
        for row in cur:
            event = Event(*row)
            chunk.append(event)
            size += len(event.sql)
            if len(chunk) >= max_events or size >= max_bytes:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk


class ReadAhead:
    """Iterate a generator in a background thread, at most `depth` items ahead.

    Lets the master's cursor fetch the next chunk while the slave applies this one (psycopg2
    releases the GIL while it waits on the network). Memory stays bounded by depth chunks. Use as a
    context manager: on exit the thread is stopped and joined, so the master connection is free
    again before anyone rolls it back.
    """
    _DONE = object()

    def __init__(self, generator, depth=2):
        import queue
        import threading
        self.generator = generator
        self.queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="pyreplica-read-ahead", daemon=True)

    def _put(self, item):
        import queue
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self):
        try:
            for item in self.generator:
                if not self._put((item, None)):
                    break
        except BaseException as error:      # handed to the consumer, raised there
            self._put((None, error))
            return
        finally:
            self.generator.close()
        self._put((self._DONE, None))

    def __enter__(self):
        self.thread.start()
        return self

    def __iter__(self):
        while True:
            item, error = self.queue.get()
            if error is not None:
                raise error
            if item is self._DONE:
                return
            yield item

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join()
