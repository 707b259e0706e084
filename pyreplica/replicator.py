"""The daemon's loop (DESIGN §6): connect, recover, catch up, then LISTEN and replay batch by batch.

One Replicator replicates one master into one slave. Lost connections are retried with backoff
(logged once per outage); a statement that fails on the slave stops replay at that batch, which
is retried later and never skipped; SIGINT/SIGTERM stop it between steps, leaving no prepared
transaction behind.
"""
import os
import select
import signal
import threading
import time

import psycopg2
import psycopg2.extensions

from . import apply, batch as batches, log, twophase
from .db import ConnectionLost, ReplicaError, close_quietly, connect, fetch_one, first_line, is_connection_error
from .filters import Pipeline

MASTER_INSTALLED = "SELECT to_regclass('public.replica_log') IS NOT NULL AND to_regproc('public.replica_confirm') IS NOT NULL"
REGISTER = "SELECT public.replica_register_slave(%s)::text"
REGISTERED = "SELECT batch_id FROM public.replica_slaves WHERE name = %s"
PRUNE = "SELECT public.replica_prune(%s)"
TOUCH = "UPDATE public.replica_slaves SET last_contact = now() WHERE name = %s"
NOTIFY_SLAVE = "NOTIFY replicas"
# One daemon per slave: a second one would apply the same batches again.
SLAVE_LOCK = "SELECT pg_try_advisory_lock(hashtext('pyreplica slave ' || %s))"

# Tables the master captures, with the columns a logged statement may name.
CAPTURED_TABLES = """
SELECT format('%I.%I', n.nspname, c.relname),
       array_agg(a.attname::text ORDER BY a.attnum)
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
 WHERE c.oid IN (SELECT tgrelid FROM pg_trigger WHERE tgfoid = 'public.py_log_replica()'::regprocedure)
 GROUP BY 1
"""
SLAVE_COLUMNS = """
SELECT array_agg(a.attname::text) FROM pg_attribute a
 WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
"""

PRUNE_EVERY = 10.0        # seconds between prunes of the master's log
PRUNE_ROWS = 5000         # rows per prune transaction: short locks, no long DELETE
SUMMARY_EVERY = 10.0      # seconds between "Applied ..." lines at DEBUG_LEVEL 1


class Stopping(Exception):
    """SIGINT/SIGTERM arrived while a batch was being applied: abandon it."""


class Replicator:
    def __init__(self, config, slave_name, mailer=None):
        self.config = config
        self.name = slave_name
        self.mailer = mailer
        self.log = log.get()
        self.pipeline = Pipeline(config.TABLES, config.FILTERS)
        self.stop_requested = False
        self.listener = self.worker = self.slave = None
        self.snapshot = self.batch_id = None
        self.applied = self.batches = 0
        self._last_prune, self._last_summary = 0.0, time.monotonic()
        self._summary = [0, 0]      # events, batches since the last summary line
        self._wakeup = None
        self.cascading = False      # the slave is itself a master: wake its own daemons after a batch

    # -- signals --------------------------------------------------------------------------------
    def request_stop(self, *_):
        self.stop_requested = True

    def install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd)
        self._wakeup = read_fd

    # -- connecting -----------------------------------------------------------------------------
    def connect(self):
        """Open both sides, check them, settle in-doubt batches, find the position."""
        self.log.info("Opening origin (master) connection")
        self.listener = connect(self.config.DSN0, "master")
        self.listener.autocommit = True
        if not fetch_one(self.listener, MASTER_INSTALLED):
            raise ReplicaError(f"the master database {self.listener.info.dbname} has no pyreplica log: run "
                               f"`psql {self.listener.info.dbname} -f master-install.sql` on it as a superuser", "master")
        twophase.check_prepared_transactions(self.listener, "master")
        self.worker = connect(self.config.DSN0, "master")
        self.worker.set_session(isolation_level="REPEATABLE READ", autocommit=False)

        self.log.info("Opening replica (slave) connection")
        self.slave = connect(self.config.DSN1, "slave")
        self.slave.autocommit = True
        twophase.check_prepared_transactions(self.slave, "slave")
        if not fetch_one(self.slave, SLAVE_LOCK, (self.name,)):
            raise ReplicaError(f"another pyreplica is already replicating into this slave as {self.name}: "
                               f"stop it first (one daemon per slave)", "slave")
        apply.install(self.slave)
        self.cascading = bool(fetch_one(self.slave, MASTER_INSTALLED))
        with self.slave.cursor() as cur:
            apply.start_session(cur)
        self.log.info("Encoding for this connections are %s %s", self.listener.encoding, self.slave.encoding)
        self.check_slave_tables()

        with self.listener.cursor() as cur:
            cur.execute("LISTEN replicas")
        position = apply.read_position(self.slave, self.name)
        twophase.recover(self.listener, self.slave, self.name, position[1] if position else None)
        self.find_position()
        self.slave.autocommit = False

    def check_slave_tables(self):
        """Every captured table (that this slave takes) must exist on the slave with its columns."""
        with self.listener.cursor() as cur:
            cur.execute(CAPTURED_TABLES)
            captured = cur.fetchall()
        with self.slave.cursor() as cur:
            for table, columns in captured:
                if not self.pipeline.wants(batches.Event(0, None, table, "I", "", "")):
                    continue
                cur.execute(SLAVE_COLUMNS, (table,))
                present = cur.fetchone()[0]
                if present is None:
                    raise ReplicaError(f"the slave has no table {table}, which the master replicates: create it on "
                                       f"the slave (pg_dump -s -t '{table}' master | psql slave) or use pyreplica clone",
                                       "slave")
                missing = [c for c in columns if c not in present]
                if missing:
                    raise ReplicaError(f"the slave's table {table} lacks column(s) {', '.join(missing)} that the "
                                       f"master has: ALTER TABLE it on the slave to match the master", "slave")

    def find_position(self):
        position = apply.read_position(self.slave, self.name)
        registered = fetch_one(self.listener, REGISTERED, (self.name,))
        if position is None:
            # A slave seen for the first time starts at the oldest event still in the log (§6).
            self.snapshot = fetch_one(self.listener, REGISTER, (self.name,))
            self.batch_id = 0
            self.log.info("New slave %s registered on the master, starting at the oldest logged event", self.name)
            return
        self.snapshot, self.batch_id = position
        if registered is None:
            raise ReplicaError(f"slave {self.name} has a position but is not registered on the master (dropped "
                               f"with drop-slave?): events it needs may be gone; rebuild it with pyreplica clone",
                               "master")
        if registered != self.batch_id:
            raise ReplicaError(f"slave {self.name} is at batch {self.batch_id} but the master has it at batch "
                               f"{registered}: was the slave restored from an older backup? Rebuild it with "
                               f"pyreplica clone", "slave")

    def disconnect(self):
        for conn in (self.worker, self.slave, self.listener):
            close_quietly(conn)
        self.listener = self.worker = self.slave = None

    # -- one batch ------------------------------------------------------------------------------
    def run_batch(self):
        """Replay what the master committed since the last batch. Returns the Batch, or None."""
        try:
            return self.try_batch(precise=False)
        except apply.ApplyError as e:
            if not e.merged:
                raise
        # a multi-row INSERT failed: replay the batch row by row to name the very event
        return self.try_batch(precise=True)

    def try_batch(self, precise):
        batch = batches.Batch(self.name, self.batch_id + 1, self.snapshot, None)
        self.worker.tpc_begin(batch.gid("master"))
        try:
            with self.worker.cursor() as cur:
                batch.cur = batches.take_snapshot(cur)
            if batch.cur == batch.prev:
                self.worker.tpc_rollback()
                return None
            self.slave.tpc_begin(batch.gid("slave"))
            with self.slave.cursor() as cur:
                self.apply_events(cur, batch, precise)
                apply.write_position(cur, batch)
        except BaseException:
            self.abandon()
            raise
        twophase.prepare_and_commit(self.worker, self.slave, batch)
        if batch.events and self.cascading:
            self.notify_slave_listeners()
        self.snapshot, self.batch_id = batch.cur, batch.batch_id
        self.applied += batch.events
        self.batches += 1
        self._summary[0] += batch.events
        self._summary[1] += 1
        self.log.debug("Batch %s committed: %s events", batch.batch_id, batch.events)
        return batch

    def apply_events(self, cur, batch, precise):
        debug_statements = self.config.DEBUG_LEVEL >= 2
        events = batches.stream_events(self.worker, batch, self.config.SKIP_USER,
                                       self.config.BATCH_EVENTS, self.config.BATCH_BYTES)
        with batches.ReadAhead(events) as chunks:
            for chunk in chunks:
                if self.stop_requested:
                    raise Stopping()
                chunk = self.pipeline(chunk)
                if not chunk:
                    continue
                if debug_statements:
                    for event in chunk:
                        self.log.debug("Executing: %s", event.sql)
                apply.apply_chunk(cur, chunk, precise)
                batch.events += len(chunk)
                self.show_progress(batch)

    def show_progress(self, batch):
        """A line every SUMMARY_EVERY seconds while a big batch (a catch-up) is being applied."""
        now = time.monotonic()
        if now - self._last_summary >= SUMMARY_EVERY:
            self._last_summary = now
            self.log.info("Catching up: %s events of batch %s applied so far (not yet committed)",
                          batch.events, batch.batch_id)

    def notify_slave_listeners(self):
        """Tell the slave's own daemons (a cascade) that replayed rows were captured there."""
        self.slave.autocommit = True
        try:
            with self.slave.cursor() as cur:
                cur.execute(NOTIFY_SLAVE)
        finally:
            self.slave.autocommit = False

    def abandon(self):
        """Roll back the batch in flight (nothing of it is prepared yet)."""
        for conn in (self.slave, self.worker):
            if conn is None or conn.closed:
                continue
            try:
                if conn.status != psycopg2.extensions.STATUS_READY:
                    conn.tpc_rollback()
            except psycopg2.Error:
                pass

    # -- housekeeping ---------------------------------------------------------------------------
    def housekeeping(self, force=False):
        now = time.monotonic()
        if force or now - self._last_prune >= PRUNE_EVERY:
            self._last_prune = now
            with self.listener.cursor() as cur:
                cur.execute(TOUCH, (self.name,))
                deleted = PRUNE_ROWS
                while deleted >= PRUNE_ROWS and not self.stop_requested:
                    cur.execute(PRUNE, (PRUNE_ROWS,))
                    deleted = cur.fetchone()[0]
        if self._summary[0] and (force or now - self._last_summary >= SUMMARY_EVERY):
            self._last_summary = now
            self.log.info("Applied %s events in %s batches", *self._summary)
            self._summary = [0, 0]

    # -- waiting --------------------------------------------------------------------------------
    def wait_for_notify(self, quiet):
        """Block until a NOTIFY, the keepalive timeout or a stop signal. No polling of the master."""
        (self.log.debug if quiet else self.log.info)("Waiting for 'NOTIFY'")
        timeout = self.config.KEEPALIVE or None
        watched = [self.listener] + ([self._wakeup] if self._wakeup is not None else [])
        ready, _, _ = select.select(watched, [], [], timeout)
        if self._wakeup in ready:
            os.read(self._wakeup, 512)
        if self.listener in ready:
            self.listener.poll()
            self.listener.notifies.clear()
            return True
        if not ready:
            self.log.info("Timeout('keepalive')!")
        return False

    # -- the loop -------------------------------------------------------------------------------
    def run(self):
        """Replicate until stopped. Returns the exit code: 0 stopped cleanly, 1 a fatal error."""
        self.install_signal_handlers()
        self.backoff, self.outage, connected_once = 1.0, None, False
        while not self.stop_requested:
            try:
                if self.listener is None:
                    self.connect()
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
            except apply.ApplyError as e:
                # keep the connections: the batch is rolled back and retried as it is
                self.report_outage(e)
            except ReplicaError as e:
                self.fatal(e)
                return 1
            except psycopg2.Error as e:   # e.g. the master refused to confirm: not retryable
                self.fatal(ReplicaError(first_line(e)))
                return 1
            if not self.stop_requested:
                self.sleep(self.backoff)
                self.backoff = min(self.backoff * 2, self.config.RETRY_MAX)
        self.disconnect()
        self.log.info("Stopped")
        self.mail("stop")
        return 0

    def replicate(self):
        quiet = False
        while not self.stop_requested:
            done = self.run_batch()
            self.progress_made()
            self.housekeeping()
            if self.stop_requested:
                return
            if done is not None and done.events:
                quiet = True
                # more may have been committed meanwhile: drain NOTIFYs and go again at once
                self.listener.poll()
                if self.listener.notifies:
                    self.listener.notifies.clear()
                    continue
            notified = self.wait_for_notify(quiet)
            if not notified:
                self.housekeeping(force=True)
            quiet = notified

    def progress_made(self):
        if self.outage is not None:
            self.log.warning("Replication resumed after %.0f s", time.monotonic() - self.outage[0])
        self.outage, self.backoff = None, 1.0

    def report_outage(self, error):
        """Log (and mail) an error once per outage; later repeats go to the debug log."""
        message = self.describe(error)
        if self.outage is None or self.outage[1] != message:
            self.log.error("%s", message, exc_info=self.config.DEBUG_LEVEL >= 3)
            if isinstance(error, apply.ApplyError) and error.conflict:
                self.mail("warning", message)
            elif self.outage is None:
                self.mail("error", message)
            self.outage = (time.monotonic() if self.outage is None else self.outage[0], message)
        else:
            self.log.debug("still failing: %s", message)

    def describe(self, error):
        if isinstance(error, ReplicaError):
            side = f"{error.side}: " if error.side and not str(error).startswith(("cannot connect", "bad ")) else ""
            text = f"{side}{error}"
            event = getattr(error, "event", None)
            if event is not None and self.config.DEBUG_LEVEL >= 1:
                text += f"\n  statement: {event.sql[:500]}"
            return text
        return f"lost connection: {first_line(error)}"

    def fatal(self, error):
        self.log.error("%s", self.describe(error), exc_info=self.config.DEBUG_LEVEL >= 3)
        self.mail("error", self.describe(error))

    def sleep(self, seconds):
        deadline = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < deadline:
            if self._wakeup is not None:
                ready, _, _ = select.select([self._wakeup], [], [], max(0.0, deadline - time.monotonic()))
                if ready:
                    os.read(self._wakeup, 512)
            else:
                time.sleep(min(0.2, deadline - time.monotonic()))

    def mail(self, kind, body=""):
        if self.mailer is not None and kind:
            self.mailer.send(kind, body)
