"""Waking a sleeping loop on a signal: the self-pipe that both the daemon's loop and the service's
supervisor wait on (signal.set_wakeup_fd writes a byte to it whenever a signal arrives)."""
import os
import select
import signal
import threading

import psycopg2.errors


class Wakeup:
    def __init__(self):
        self.fd = None
        if threading.current_thread() is threading.main_thread():
            read_fd, write_fd = os.pipe()
            os.set_blocking(read_fd, False)
            os.set_blocking(write_fd, False)
            signal.set_wakeup_fd(write_fd)
            self.fd = read_fd

    def wait(self, timeout, also=()):
        """Sleep until a signal arrives, one of `also` (file-like or fds) is readable, or timeout
        (None: forever). Returns the ready objects of `also`."""
        watched = list(also) + ([self.fd] if self.fd is not None else [])
        try:
            ready, _, _ = select.select(watched, [], [], timeout)
        except InterruptedError:
            return []
        # select hands back the very objects it was given: `is` tells our pipe from the others
        if any(r is self.fd for r in ready):
            self.drain()
        return [r for r in ready if r is not self.fd]

    def drain(self):
        try:
            while os.read(self.fd, 512):
                pass
        except (BlockingIOError, OSError):
            pass


# -- the master's wake-up lock (docs/design.md §3) -----------------------------------------------
# A daemon sleeps holding this advisory lock exclusively (session level, on its LISTEN connection);
# the capture trigger takes it shared for its transaction and NOTIFYs only when it cannot. The two
# keys are pyreplica's own (two-int form, "pyre" and 1); the trigger names the same pair.
LOCK_KEYS = (1887007333, 1)
# How long one attempt to take it may wait (another daemon asleep holds it, or a transaction that
# wrote is still open, or prepared, and holds it shared): then the daemon looks for events and tries
# again. While it waits, writers NOTIFY but the daemon reads that only after the wait: this bounds
# the delay an open writing transaction adds to the others' events.
LOCK_WAIT = "200ms"
TAKE_LOCK = "SET LOCAL lock_timeout = %s; SELECT pg_catalog.pg_advisory_lock(%s, %s)"
RELEASE_LOCK = "SELECT pg_catalog.pg_advisory_unlock(%s, %s)"
# Committed events a slave at this snapshot has not applied (a fresh statement: a fresh snapshot).
PENDING = "SELECT EXISTS (SELECT FROM pyreplica.unapplied(%s::pg_snapshot))"


def take_lock(conn):
    """Take the wake-up lock on `conn` (autocommit): True, or False if LOCK_WAIT passed first."""
    try:
        with conn.cursor() as cur:
            # one implicit transaction: SET LOCAL bounds this wait only; the lock is the session's
            cur.execute(TAKE_LOCK, (LOCK_WAIT, *LOCK_KEYS))
        return True
    except psycopg2.errors.LockNotAvailable:
        return False


def release_lock(conn):
    with conn.cursor() as cur:
        cur.execute(RELEASE_LOCK, LOCK_KEYS)


def pending(conn, snapshot):
    """Has the master committed events a slave at `snapshot` has still to apply?"""
    with conn.cursor() as cur:
        cur.execute(PENDING, (snapshot,))
        return cur.fetchone()[0]
