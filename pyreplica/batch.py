"""A batch and its life (docs/design.md §4-§5): begin -> apply -> finish (prepare, commit), or abandon.

A batch holds the events whose transaction is visible in the new master snapshot and not in the
previous one, in id order. Events of transactions still open are not visible yet and come in a
later batch; those of rolled-back transactions never become visible. xid8 comparisons are
wraparound-safe. The new snapshot is the master's current one, or, when a backlog is larger than
`max_events`, a tick (a snapshot the master recorded earlier, pyreplica.batch_end): a catch-up then
commits in bounded steps, each a consistent cut in commit order, and `more` says another follows.

    step       what it does                                        if the daemon dies here, the next start
    begin      master BEGIN, take the end snapshot                 finds nothing prepared: nothing to do
    apply      slave BEGIN, stream -> filter -> apply chunks       finds nothing prepared: the slave's
                                                                   transaction is gone, replayed again
    finish     the slave's new position, then                      settles what is prepared (twophase.decide)
               twophase.prepare_and_commit
    abandon    roll both sides back (nothing prepared yet)
"""
import functools
import queue
import threading
from collections import namedtuple
from dataclasses import dataclass, field

from psycopg2 import sql

from . import apply, log, master, sequences, twophase

Event = namedtuple("Event", "id txid relname op sql username")
# An Event from a fetched row without the namedtuple's generated __new__ (an argument-parsing
# lambda): 0.35 against 0.22 µs an event, and a catch-up makes one per event (docs/design.md §10).
event_from_row = functools.partial(tuple.__new__, Event)

FETCH_ROWS = 2000  # rows per network fetch from the master's server-side cursor
FIRST_CHUNK_EVENTS = 500    # a batch's first list; each next one twice as long, up to BATCH_EVENTS


class Stopping(Exception):
    """SIGINT/SIGTERM arrived while a batch was being applied: abandon it."""


@dataclass
class Batch:
    slave: str                  # the slave's name on the master
    batch_id: int               # previous batch's id + 1
    start_snapshot: str         # master snapshot the slave has applied up to
    token: str                  # the slave's identity token, part of the gids
    identity: tuple = None      # the slave's (system identifier, database): its record on the master checks it
    end_snapshot: str = None    # master snapshot this batch brings it to
    more: bool = False          # a catch-up step: the master had committed more than this batch
    applied: int = 0            # events applied (after filters)
    sequences: dict = field(default_factory=dict)   # the master's sequence values, read at begin
    may_run_alone: bool = False # it holds a statement apply.run_alone may have to run first
    reader: object = field(default=None, repr=False)    # the master connection it reads and is recorded on
    first_rows: list = field(default=None, repr=False)  # its cursor's first FETCH, when read ahead (open_cursor)
    _gids: dict = field(default_factory=dict, repr=False)

    # -- the steps ------------------------------------------------------------------------------
    @classmethod
    def begin(cls, sides, position, max_events=None, only_events=False, reader=None):
        """Open the master's side and choose the end snapshot: the current one, or a tick when more
        than max_events events are pending (None: no bound). None when nothing was committed since,
        or, with only_events, when no event was: a batch without events still moves the position
        past other transactions (what add-table and switchover wait for), but costs a two-phase
        commit, so it is for a daemon that was woken, not one looking for more after a batch.
        `reader`: the master connection to read with (default sides.reader), idle."""
        start_snapshot, last_batch = position
        reader = reader or sides.reader
        batch = cls(sides.name, last_batch + 1, start_snapshot, sides.token, sides.identity, reader=reader)
        try:
            with reader.cursor() as cur:
                # first statement of the REPEATABLE READ transaction: the event query reads with
                # this very snapshot, which contains any tick chosen as the end
                current, batch.end_snapshot, batch.sequences, has_events, batch.may_run_alone = \
                    master.batch_start(cur, start_snapshot, max_events, twophase.BEGIN["master"])
                batch.more = batch.end_snapshot != current
        except BaseException:
            twophase.rollback(reader)
            raise
        if batch.end_snapshot == batch.start_snapshot or (only_events and not has_events):
            twophase.rollback(reader)
            return None
        return batch

    def open_cursor(self, skip_user=None):
        """DECLARE the batch's event cursor and FETCH its first rows (stream_events' first round
        trip; a step read ahead does it early, so that its first chunk is ready when it starts)."""
        with self.reader.cursor() as cur:
            cur.execute(*cursor_statements(self, skip_user)[0])
            self.first_rows = cur.fetchall()

    def apply(self, sides, pipeline, settings, stopping=lambda: False, progress=lambda b: None,
              read_all=lambda b: None):
        """Replay the batch's events into the slave's open transaction, and its new position.

        First, in their own committed transactions, the administrator's statements that must not
        share the batch's (apply.run_alone, docs/design.md §6). Events skip-event named are left
        out and marked skipped in the batch's transaction (self.skipped, for the caller's mail), and
        so are those of the tables add-table or remove-table hold out of the stream (§13).
        Last, when it applied any event, the slave's sequences are brought up to the master's values
        read at begin (sequences.catch_up). read_all(self) runs once the batch's events are all read,
        in the thread that read them, while the last chunks are still planned and applied (a
        catch-up step reads the next one ahead then); the batch waits for it before it ends."""
        self.skipped = []
        try:
            if self.may_run_alone:
                apply.before_batch(sides.slave, self.reader, self,
                                   lambda rows: pipeline([Event(*row) for row in rows]), settings.SKIP_USER)
            with sides.slave.cursor() as cur:
                skips, held = apply.batch_state(cur, self.slave, twophase.BEGIN["slave"])
                events = stream_events(self, settings.SKIP_USER, settings.BATCH_EVENTS, settings.BATCH_BYTES)
                with (ReadAhead(events, lambda: read_all(self)) as chunks,
                      apply.Applier(sides.slave, settings.DEBUG_LEVEL) as applier):
                    for chunk in chunks:
                        if stopping():
                            raise Stopping()
                        chunk = apply.leave_out_held(chunk, held)
                        chunk, skipped = apply.take_skips(cur, chunk, skips, self.batch_id, self.slave)
                        self.skipped += skipped
                        chunk = pipeline(chunk)
                        if settings.DEBUG_LEVEL >= 2:
                            for event in chunk:
                                log.get().debug("Executing: %s", event.sql)
                        if chunk:
                            # a batch read ahead has more chunks: apply this one while planning the next
                            applier.apply(chunk, background=chunks.threaded)
                            self.applied += len(chunk)
                            progress(self)
                if self.applied:        # (no row written, none a sequence must stay ahead of)
                    sequences.catch_up(cur, self.sequences, sides.sequences)
        except BaseException:
            self.abandon(sides)
            raise

    def finish(self, sides, pipeline):
        """Write the slave's new position, PREPARE both sides, then COMMIT PREPARED both (twophase's
        order)."""
        twophase.prepare_and_commit(self.reader, sides.slave, self, apply.position_statement(self, pipeline.tables))

    def abandon(self, sides):
        """Roll back the batch in flight (nothing of it is prepared yet)."""
        for conn in (sides.slave, self.reader):
            if conn is not None:
                twophase.rollback(conn)

    def gid(self, side):
        """This batch's transaction name on one side (twophase's format), the same on every call."""
        if side not in self._gids:
            self._gids[side] = twophase.make_gid(self.slave, self.batch_id, side, self.token)
        return self._gids[side]


def stream_events(batch, skip_user=None, max_events=5000, max_bytes=8 << 20):
    """Yield (events, last): the batch's events in id order, in lists bounded by count and bytes;
    last is True for a list read after the cursor ran dry (nothing follows it).

    Reads through a cursor on the batch's reader, FETCH_ROWS at a time, so memory stays flat however
    large the batch is. DECLARE and the first FETCH go in one round trip (Batch.open_cursor, unless
    the step was read ahead), and a FETCH that returns fewer rows ends it: a small batch costs one
    round trip. The cursor ends with the transaction.
    The first list is short (FIRST_CHUNK_EVENTS) and each next one twice as long, up to max_events:
    the slave, idle until the first list is planned, starts applying sooner (docs/design.md §10).
    """
    if batch.first_rows is None:        # (else read ahead)
        batch.open_cursor(skip_user)
    rows, batch.first_rows = batch.first_rows, None
    fetch = cursor_statements(batch, skip_user)[1]
    with batch.reader.cursor() as cur:
        chunk, size, limit = [], 0, min(max_events, FIRST_CHUNK_EVENTS)
        while True:
            for row in rows:
                event = event_from_row(row)
                chunk.append(event)
                size += len(event.sql)
                # never between the TRUNCATEs of one statement: they replay as one (apply.plan)
                if (len(chunk) >= limit or size >= max_bytes) and event.op != "T":
                    yield chunk, False
                    chunk, size, limit = [], 0, min(max_events, limit * 2)
            if len(rows) < FETCH_ROWS:
                break
            cur.execute(fetch)
            rows = cur.fetchall()
        if chunk:
            yield chunk, True


def cursor_statements(batch, skip_user=None):
    """((DECLARE the batch's cursor and FETCH its first rows, params), FETCH the next rows)."""
    name = sql.Identifier(f"pyreplica_batch_{batch.batch_id}")
    fetch = sql.SQL("FETCH FORWARD {} FROM {}").format(sql.Literal(FETCH_ROWS), name)
    declare = sql.SQL("DECLARE {} NO SCROLL CURSOR FOR {}; {}").format(name, sql.SQL(master.BATCH_EVENTS), fetch)
    return (declare, {"start": batch.start_snapshot, "end": batch.end_snapshot, "skip_user": skip_user or None}), fetch


class ReadAhead:
    """Iterate stream_events' lists, reading ahead in a background thread, at most `depth` ahead.

    Lets the master's cursor fetch the next chunk while the slave applies this one (psycopg2
    releases the GIL while it waits on the network). Memory stays bounded by depth chunks. The first
    list is read here: when it is the last one (most batches of a daemon that keeps up), no thread
    is started, whose start and hand-overs would cost a small batch more than the read. `after()`
    runs once every list is read, in the thread that read them. Use as a context manager: on exit
    the thread is stopped and joined, so the master connection is free again before anyone rolls
    it back.
    """
    _DONE = object()

    def __init__(self, generator, after=lambda: None, depth=2):
        self.generator, self.after = generator, after
        self.queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="pyreplica-read-ahead", daemon=True)

    def _put(self, item):
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self):
        try:
            for chunk, _ in self.generator:
                if not self._put((chunk, None)):
                    break
        except BaseException as error:      # handed to the consumer, raised there
            self._put((None, error))
            return
        finally:
            self.generator.close()
        if self._put((self._DONE, None)):
            self.after()

    def __enter__(self):
        return self

    @property
    def threaded(self):
        """More than one list: they are being read ahead."""
        return self.thread.ident is not None

    def __iter__(self):
        first = next(self.generator, None)
        if first is None:
            return
        chunk, last = first
        if not last:
            self.thread.start()
        yield chunk
        if last:
            self.after()
            return
        while True:
            item, error = self.queue.get()
            if error is not None:
                raise error
            if item is self._DONE:
                return
            yield item

    def __exit__(self, *exc):
        self.stopping.set()
        if self.thread.ident is not None:       # started
            self.thread.join()
        else:
            self.generator.close()
