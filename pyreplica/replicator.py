"""The daemon's loop (docs/design.md §6): open the sides, catch up, then LISTEN and replay batch by batch.

One Replicator replicates one master into one slave. Start-up lives in `sides`, the batch's steps
in `batch`, two-phase commit and recovery in `twophase`; this module keeps the loop and the retry
policy: lost connections are retried with backoff (logged once per outage); a statement that fails
on the slave stops replay at that batch, which is retried later and never skipped; SIGINT/SIGTERM
stop it between steps, leaving no prepared transaction behind.
"""
import gc
import signal
import threading
import time
from dataclasses import dataclass

import psycopg2

from . import apply, log, master, twophase, wakeup
from .batch import Batch, Stopping
from .db import ConnectionLost, ReplicaError, first_line, is_connection_error
from .filters import Pipeline
from .sides import Sides, SlaveBusy
from .twophase import PrepareRefused
from .wakeup import Wakeup

PRUNE_EVERY = 10.0        # seconds between prunes of the master's log
SUMMARY_EVERY = 10.0      # seconds between "Applied ..." lines at DEBUG_LEVEL 1
# Python's cycle collector scans its youngest generation after every 700 new container objects by
# default. A catch-up makes several tuples per event (row, event, statement, planned row), none of
# them in a cycle: at that rate the collector ran about 750 times per 200,000 events, about 10 % of
# the daemon's CPU, each time holding the GIL the reading and applying threads wait for
# (docs/design.md §10). Cycles are still collected, only later.
GC_THRESHOLDS = (50_000, 20, 100)


def relax_garbage_collector():
    gc.freeze()     # what start-up made lives as long as the process: no collection scans it again
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass
class Outage:
    started: float
    message: str


class Replicator:
    def __init__(self, config, slave_name, mailer=None):
        self.config = config
        self.name = slave_name
        self.mailer = mailer
        self.log = log.get()
        self.pipeline = Pipeline(config.TABLES, config.FILTERS)
        self.stop_requested = False
        self.sides = None
        self.next_step = None       # a catch-up step begun while the previous one was applied
        self._read_ahead_failed = False
        self.wakeup = None
        self._last_prune, self._last_summary = 0.0, time.monotonic()
        self._summary = [0, 0]      # events, batches since the last summary line
        self._capture_off = []      # the master's tables whose capture is off, as last warned of
        self.backoff, self.outage = 1.0, None

    # -- signals --------------------------------------------------------------------------------
    def request_stop(self, *_):
        self.stop_requested = True

    def install_signal_handlers(self):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        self.wakeup = Wakeup()

    # -- the loop -------------------------------------------------------------------------------
    def run(self):
        """Replicate until stopped. Returns the exit code: 0 stopped cleanly, 1 a fatal error."""
        self.install_signal_handlers()
        relax_garbage_collector()
        connected_once = False
        while not self.stop_requested:
            try:
                if self.sides is None:
                    self.sides = Sides(self.config, self.name, self.pipeline, self.log)
                    self.sides.open()
                    if not connected_once:
                        self.mail("start")
                    connected_once = True
                self.replicate()
            except Stopping:
                break
            except (ConnectionLost, psycopg2.OperationalError, psycopg2.InterfaceError) as e:
                if not connected_once:
                    self.fatal(e)
                    return 1
                if not isinstance(e, ConnectionLost) and not is_connection_error(e):
                    raise
                self.report_outage(e)
                self.disconnect()
            except SlaveBusy as e:
                if not connected_once:      # at start: really another daemon, most likely
                    self.fatal(e)
                    self.disconnect()
                    return 1
                # after an outage the holder may be our own vanished connection: the slave drops
                # it within about PEER_TIMEOUT (sides.keepalive_settings), so wait for it
                self.report_outage(e)
                self.disconnect()
            except (apply.ApplyError, PrepareRefused) as e:
                # keep the connections: the batch is rolled back and retried as it is
                self.report_outage(e)
            except ReplicaError as e:
                self.fatal(e)
                self.disconnect()
                return 1
            except psycopg2.Error as e:   # e.g. the master refused to confirm: not retryable
                self.fatal(ReplicaError(first_line(e)))
                self.disconnect()
                return 1
            if not self.stop_requested:
                self.sleep(self.backoff)
                self.backoff = min(self.backoff * 2, self.config.RETRY_MAX)
        self.disconnect()
        self.log.info("Stopped")
        self.mail("stop")
        return 0

    def disconnect(self):
        self.next_step = None       # (its transaction ends with its connection)
        if self.sides is not None:
            self.sides.close()
        self.sides = None

    def replicate(self):
        quiet = looking = False
        # a prune now, when due (at start), rather than after the first batch: no catch-up step is
        # read ahead while one is due (begin_next_step), so the first step's would be lost
        self.housekeeping()
        while not self.stop_requested:
            done = self.replay_next_batch(only_events=looking)
            self.outage_over()
            self.housekeeping()
            if self.stop_requested:
                return
            if done is not None and (done.more or done.applied):
                # a catch-up step, or more may have been committed while this batch ran (writers
                # do not NOTIFY while we are awake): the next batch at once, if it holds events
                quiet = looking = True
                continue
            looking = False
            notified = self.wait_for_notify(quiet)
            if not notified:
                self.housekeeping(force=True)
            quiet = notified

    # -- one batch ------------------------------------------------------------------------------
    def replay_next_batch(self, only_events=False):
        """Replay what the master committed since the last batch. Returns the Batch, or None."""
        sides = self.sides
        batch = self.take_next_step()
        if batch is None:
            batch = Batch.begin(sides, sides.position, self.config.CATCHUP_EVENTS, only_events)
        if batch is None:
            return None
        try:
            batch.apply(sides, self.pipeline, self.config, stopping=lambda: self.stop_requested,
                        progress=self.show_progress, read_all=self.begin_next_step)
            batch.finish(sides, self.pipeline)
        except BaseException:
            self.drop_next_step()
            raise
        for event in batch.skipped:     # committed: now the skip has happened (skip-event)
            self.mail("warning", f"Skipped event {event.id} ({apply.describe(event)}) as told by skip-event: "
                                 f"batch {batch.batch_id} committed without it")
        if batch.applied and sides.cascading:
            self.notify_slave_listeners()
        sides.position = (batch.end_snapshot, batch.batch_id)
        self._summary[0] += batch.applied
        self._summary[1] += 1
        self.log.debug("Batch %s committed: %s events", batch.batch_id, batch.applied)
        return batch

    def begin_next_step(self, batch):
        """Once a catch-up step's events are read, while its last chunks are planned and applied:
        begin the next step on the other reader connection and read its first rows, so the slave
        waits less between steps (docs/design.md §10). Runs in the batch's reading thread. Best
        effort: when this fails, the next step begins as usual, after this one."""
        if not batch.more or self.stop_requested or self.prune_due():
            return      # (a step read ahead holds the log's partitions: no prune could empty one)
        reader = None
        try:
            reader = self.sides.other_reader(batch.reader)
            step = Batch.begin(self.sides, (batch.end_snapshot, batch.batch_id), self.config.CATCHUP_EVENTS,
                               only_events=True, reader=reader)
            if step is not None:
                step.open_cursor(self.config.SKIP_USER)
        except Exception as e:      # (in the read-ahead thread: nothing may escape, nothing stay open)
            # e.g. a connection limit that leaves no room for the spare reader: said once a life
            (self.log.debug if self._read_ahead_failed else self.log.warning)(
                "Could not read the next catch-up step ahead (the catch-up goes on, one step after "
                "the other): %s", first_line(e))
            self._read_ahead_failed = True
            if reader is not None:
                twophase.rollback(reader)
            if reader is not None and reader is self.sides.spare:
                self.sides.drop_spare()
            return
        self.next_step = step

    def take_next_step(self):
        """The step begin_next_step read ahead, when it starts where the slave is now."""
        step, self.next_step = self.next_step, None
        if step is not None and (step.start_snapshot, step.batch_id - 1) != tuple(self.sides.position):
            twophase.rollback(step.reader)
            return None
        return step

    def drop_next_step(self):
        step, self.next_step = self.next_step, None
        if step is not None:
            twophase.rollback(step.reader)

    def show_progress(self, batch):
        """A line every SUMMARY_EVERY seconds while a big batch (a catch-up) is being applied."""
        now = time.monotonic()
        if now - self._last_summary >= SUMMARY_EVERY:
            self._last_summary = now
            self.log.info("Catching up: %s events of batch %s applied so far (not yet committed)",
                          batch.applied, batch.batch_id)

    def notify_slave_listeners(self):
        """Tell the slave's own daemons (a cascade) that replayed rows were captured there."""
        with self.sides.slave.cursor() as cur:      # (an autocommit connection: sent at once)
            cur.execute(f"NOTIFY {master.CHANNEL}")

    # -- housekeeping ---------------------------------------------------------------------------
    def prune_due(self):
        return time.monotonic() - self._last_prune >= PRUNE_EVERY

    def housekeeping(self, force=False):
        now = time.monotonic()
        if force or self.prune_due():
            self._last_prune = now
            self.prune_log()
            self.watch_capture()
        if self._summary[0] and (force or now - self._last_summary >= SUMMARY_EVERY):
            self._last_summary = now
            self.log.info("Applied %s events in %s batches", *self._summary)
            self._summary = [0, 0]

    def prune_log(self):
        """Remove what every slave has applied. A failure here is logged and tried again later:
        housekeeping never stops replication."""
        try:
            with self.sides.listener.cursor() as cur:
                master.touch(cur, self.name)
                master.prune(cur)
        except psycopg2.Error as e:
            if is_connection_error(e):
                raise
            self.log.warning("Pruning the master's log failed (tried again in %.0f s): %s", PRUNE_EVERY,
                             first_line(e))

    def watch_capture(self):
        """Warn once of each captured table whose capture triggers stopped firing on the master (a
        DISABLE TRIGGER for a bulk load, forgotten): its writes reach no slave, and nothing else tells."""
        try:
            off = master.capture_off(self.sides.listener)
        except psycopg2.Error as e:
            if is_connection_error(e):
                raise
            self.log.warning("Checking the master's capture triggers failed: %s", first_line(e))
            return
        for table in off:
            if table not in self._capture_off:
                message = master.capture_off_message(table)
                self.log.warning("%s", message)
                self.mail("warning", message)
        self._capture_off = off

    # -- waiting --------------------------------------------------------------------------------
    def wait_for_notify(self, quiet):
        """Block until a NOTIFY, the keepalive timeout or a stop signal: True when woken for work.
        No polling of the master: the daemon sleeps holding the wake-up lock, taken before a last
        look for events, so that every writer committing after that look NOTIFYs (docs/design.md §3)."""
        (self.log.debug if quiet else self.log.info)("Waiting for 'NOTIFY'")
        deadline = time.monotonic() + self.config.KEEPALIVE if self.config.KEEPALIVE else None
        while not self.stop_requested:
            found, locked = self.lock_and_look()
            if found:
                return True
            if locked:
                return self.sleep_holding_lock(deadline)
            # another daemon sleeps with the lock, or a transaction (open or prepared) holds it
            # shared: we looked, try again
            if deadline is not None and time.monotonic() >= deadline:
                return self.keepalive_timeout()
        return False

    def lock_and_look(self):
        """Take the wake-up lock (or give up after LOCK_WAIT), then look for work: (found, locked).
        Holds the lock only when it returns (False, True)."""
        listener = self.sides.listener
        listener.poll()
        listener.notifies.clear()           # their writers committed: the look below sees them
        locked = wakeup.take_lock(listener)
        found = wakeup.pending(listener, self.sides.position[0])
        # psycopg2 moves notifications that came with a reply into .notifies, where select() does
        # not see them: look there after the last query (poll() takes in what else is buffered)
        listener.poll()
        if found or listener.notifies:
            listener.notifies.clear()
            if locked:
                wakeup.release_lock(listener)
            return True, False
        return False, locked

    def sleep_holding_lock(self, deadline):
        listener = self.sides.listener
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if listener in self.wakeup.wait(timeout, also=[listener]):
                listener.poll()
                listener.notifies.clear()
                return True
        finally:
            # awake, the lock is free: writers stop paying for NOTIFY (on a lost connection the
            # server has released it with the session)
            if not listener.closed:
                wakeup.release_lock(listener)
        return self.keepalive_timeout()

    def keepalive_timeout(self):
        if not self.stop_requested:
            self.log.info("Timeout('keepalive')!")
        return False

    def sleep(self, seconds):
        deadline = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < deadline:
            self.wakeup.wait(min(0.5, max(0.0, deadline - time.monotonic())))

    # -- errors ---------------------------------------------------------------------------------
    def outage_over(self):
        if self.outage is not None:
            self.log.warning("Replication resumed after %.0f s", time.monotonic() - self.outage.started)
        self.outage, self.backoff = None, 1.0

    def report_outage(self, error):
        """Log (and mail) an error once per outage; later repeats go to the debug log."""
        message = self.describe(error)
        if self.outage is None or self.outage.message != message:
            self.log.error("%s", message, exc_info=self.config.DEBUG_LEVEL >= 3)
            if isinstance(error, apply.ApplyError) and error.conflict:
                self.mail("warning", message)
            elif self.outage is None:
                self.mail("error", message)
            self.outage = Outage(time.monotonic() if self.outage is None else self.outage.started, message)
        else:
            self.log.debug("still failing: %s", message)

    def describe(self, error):
        if isinstance(error, ReplicaError):
            side = f"{error.side}: " if error.side and not str(error).startswith(("cannot connect", "bad ")) else ""
            text = f"{side}{error}"
            event = getattr(error, "event", None)
            # the statement carries row values: only from DEBUG_LEVEL 2 (every statement) on
            if event is not None and self.config.DEBUG_LEVEL >= 2:
                text += f"\n  statement: {event.sql[:500]}"
            return text
        return f"lost connection: {first_line(error)}"

    def fatal(self, error):
        self.log.error("%s", self.describe(error), exc_info=self.config.DEBUG_LEVEL >= 3)
        self.mail("error", self.describe(error))

    def mail(self, kind, body=""):
        if self.mailer is not None and kind:
            self.mailer.send(kind, body)
