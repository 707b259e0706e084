"""The service's supervisor (docs/design.md §7): one isolated worker process per CONF_DIR/*.conf.

Each worker is its own Python process (`python -m pyreplica.service worker CONF`) running
Replicator(...).run(), so one crashing, leaking or hanging cannot harm the others. A worker that
exits is restarted with backoff; SIGHUP re-reads the directory (new confs start, removed ones
stop, changed ones restart); SIGTERM stops every worker with SIGTERM — each finishes or abandons
its batch without leaving a prepared transaction — and then the service exits.
"""
import ctypes
import logging.handlers
import os
import signal
import subprocess
import sys
import time

from . import config as configuration, log
from .wakeup import Wakeup
from .config import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, conf_paths, load_worker
from .mail import Mailer
from .replicator import Replicator

BACKOFF_MAX = 60.0       # longest wait before restarting a worker that keeps failing
HEALTHY_AFTER = 60.0     # a worker that ran this long starts its backoff afresh
STOP_TIMEOUT = 30.0      # SIGTERM -> SIGKILL for a worker that does not stop
EXIT_MEANING = {EXIT_OK: "a clean stop", EXIT_FAIL: "a fatal error (server, install or config problem, see its log)",
                EXIT_CONFIG: "a bad config"}
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Worker:
    def __init__(self, conf):
        self.conf = conf
        self.name = os.path.basename(conf)[:-len(".conf")]
        self.proc = None
        self.stamp = stamp(conf)
        self.failures = 0
        self.started = self.next_start = 0.0
        self.held = None        # the config error that keeps it from starting until the file changes
        self.logfile = None


def stamp(path):
    """What tells us a conf changed between two reloads."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def die_with_parent():
    """In the worker, before exec: SIGTERM when the service dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Supervisor:
    def __init__(self, conf_dir, service_log):
        self.conf_dir = conf_dir
        self.service_log = service_log
        self.workers = {}
        self.stopping = self.reloading = False
        self.wakeup = None

    # -- signals (handlers only set flags; the loop acts) -------------------------------------
    def request_stop(self, *_):
        self.stopping = True

    def request_reload(self, *_):
        self.reloading = True

    def install_wakeup(self):
        signal.signal(signal.SIGCHLD, lambda *_: None)   # a worker's exit wakes the loop
        self.wakeup = Wakeup()

    # -- the loop -------------------------------------------------------------------------------
    def run(self, ready=lambda: None):
        self.log = log.get()
        self.install_wakeup()
        self.log.info("Service started (pid %s), workers from %s/*.conf", os.getpid(), self.conf_dir)
        self.rescan()
        ready()
        while not self.stopping:
            if self.reloading:
                self.reloading = False
                self.service_log.reopen()
                self.log.info("SIGHUP: reopened the log, re-reading %s", self.conf_dir)
                self.rescan()
            self.reap()
            self.start_due()
            self.wait()
        self.log.info("SIGTERM: stopping %s worker(s)", sum(1 for w in self.workers.values() if w.proc))
        self.stop(list(self.workers.values()))
        self.log.info("Service stopped")
        return EXIT_OK

    def wait(self):
        due = [w.next_start for w in self.workers.values() if w.proc is None and w.held is None]
        timeout = max(0.0, min(due) - time.monotonic()) if due else 5.0
        self.wakeup.wait(min(timeout, 5.0))

    # -- the directory --------------------------------------------------------------------------
    def rescan(self):
        found = set(conf_paths(self.conf_dir))
        if not found:
            self.log.warning("No *.conf in %s: nothing to replicate (add one, then reload)", self.conf_dir)
        gone = [w for path, w in self.workers.items() if path not in found]
        changed = [w for path, w in self.workers.items() if path in found and w.stamp != stamp(path)]
        for w in gone:
            self.log.info("Worker %s: %s was removed, stopping it", w.name, w.conf)
        for w in changed:
            self.log.info("Worker %s: %s changed, restarting it", w.name, w.conf)
        self.stop(gone + changed)
        for w in gone + changed:
            del self.workers[w.conf]
        for path in sorted(found - set(self.workers)):
            self.workers[path] = Worker(path)

    # -- starting and restarting ----------------------------------------------------------------
    def start_due(self):
        now = time.monotonic()
        for w in self.workers.values():
            if w.proc is None and w.held is None and now >= w.next_start and not self.stopping:
                self.start(w)

    def start(self, w):
        try:
            config, _ = load_worker(w.conf)
        except configuration.ConfigError as e:
            w.held = str(e)
            self.log.error("Worker %s not started: %s (fix it, then reload)", w.name, e)
            return
        w.logfile = config.LOGFILE
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p))
        try:
            w.proc = subprocess.Popen([sys.executable, "-m", "pyreplica.service", "worker", w.conf],
                                      env=env, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
                                      cwd="/")   # `-m` imports from the working directory first
        except OSError as e:
            self.log.error("Worker %s could not be started: %s", w.name, e)
            self.schedule_restart(w)
            return
        w.started = time.monotonic()
        self.log.info("Worker %s started (pid %s) for %s, logging to %s", w.name, w.proc.pid, w.conf, w.logfile)

    def reap(self):
        for w in self.workers.values():
            if w.proc is None or w.proc.poll() is None:
                continue
            code = w.proc.returncode
            w.proc = None
            if time.monotonic() - w.started >= HEALTHY_AFTER:
                w.failures = 0
            delay = self.schedule_restart(w)
            self.log.error("Worker %s exited with %s; restarting it in %.0f s", w.name, describe_exit(code), delay)

    def schedule_restart(self, w):
        delay = min(2.0 ** w.failures, BACKOFF_MAX)
        w.failures += 1
        w.next_start = time.monotonic() + delay
        return delay

    # -- stopping -------------------------------------------------------------------------------
    def stop(self, workers):
        """SIGTERM to all at once (so they stop in parallel), then wait; SIGKILL after STOP_TIMEOUT."""
        running = [w for w in workers if w.proc is not None and w.proc.poll() is None]
        for w in running:
            w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in running:
            try:
                code = w.proc.wait(max(0.1, deadline - time.monotonic()))
                if code == 0:
                    self.log.info("Worker %s stopped", w.name)
                else:
                    self.log.warning("Worker %s stopped with %s", w.name, describe_exit(code))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
                self.log.error("Worker %s did not stop within %.0f s and was killed: its next start settles "
                               "any prepared transaction it left", w.name, STOP_TIMEOUT)
        for w in workers:
            w.proc = None


def describe_exit(code):
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code} ({EXIT_MEANING.get(code, 'an unexpected error')})"


# -- the worker process ----------------------------------------------------------------------------
def worker_main(conf):
    """One replication worker: the console run's Replicator, logging to the conf's LOGFILE."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)    # the supervisor's business; the log follows renames
    try:
        config, name = load_worker(conf)
    except configuration.ConfigError as e:
        print(f"pyreplica: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logger = log.setup(config.NAME or name, config.DEBUG_LEVEL,
                       handler=logging.handlers.WatchedFileHandler(config.LOGFILE))
    with WorkerPidFile(config.PIDFILE):
        try:
            return Replicator(config, name, Mailer.from_config(config, name)).run()
        except Exception:
            logger.exception("Worker for %s failed unexpectedly", conf)
            return EXIT_FAIL


class WorkerPidFile:
    """PIDFILE of one worker, when the conf names one: written at start, removed at exit."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        if self.path:
            with open(self.path, "w") as f:
                f.write(f"{os.getpid()}\n")

    def __exit__(self, *exc):
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"] or len(sys.argv) != 3:
        sys.exit("usage: python -m pyreplica.service worker CONF   (started by `pyreplica service`)")
    sys.exit(worker_main(sys.argv[2]))
