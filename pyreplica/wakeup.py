"""Waking a sleeping loop on a signal: the self-pipe that both the daemon's loop and the service's
supervisor wait on (signal.set_wakeup_fd writes a byte to it whenever a signal arrives)."""
import os
import select
import signal
import threading


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
