"""A progress line to stderr every few seconds while something long runs (e.g. hashing a big table).

Nothing is printed for work that finishes within the first interval, so quick runs stay quiet.
"""
import contextlib
import sys
import threading
import time


@contextlib.contextmanager
def every(seconds, describe, stream=None):
    """While the block runs, print describe(elapsed_seconds) every `seconds` seconds."""
    stream = stream or sys.stderr
    done = threading.Event()
    started = time.monotonic()

    def tick():
        while not done.wait(seconds):
            print(describe(time.monotonic() - started), file=stream, flush=True)

    thread = threading.Thread(target=tick, name="pyreplica-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
