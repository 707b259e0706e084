"""Helpers for replication tests: the daemon as a real process, waiting, comparing."""
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(condition, timeout=30.0, interval=0.1, message="condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


class Daemon:
    """`pyreplica run MASTER SLAVE` as a real subprocess, its output in a file."""

    def __init__(self, master, slave, *args, name=None, fault=None, env=None, keepalive=5):
        self.master, self.slave = master, slave
        self.args = [master.dsn, slave.dsn, "--keepalive", str(keepalive), *args]
        if name:
            self.args += ["--name", name]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.env.pop("PYREPLICA_TEST_FAULT", None)
        if fault:
            self.env["PYREPLICA_TEST_FAULT"] = fault
        self.logfile = tempfile.NamedTemporaryFile(prefix="pyreplica-daemon-", suffix=".log", delete=False)
        self.proc = None
        self.final_output = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "pyreplica.cli", "run", *self.args], cwd=ROOT,
                                     env=self.env, stdout=self.logfile, stderr=subprocess.STDOUT)
        return self

    @property
    def output(self):
        if self.final_output is not None:
            return self.final_output
        with open(self.logfile.name) as f:
            return f.read()

    def wait_for_output(self, text, timeout=30):
        return wait_until(lambda: text in self.output, timeout, message=f"{text!r} in the daemon's output:\n"
                                                                        f"{self.output[-2000:]}")

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"daemon did not stop on {sig!r}:\n{self.output[-2000:]}")
        return self.proc.returncode if self.proc else None

    def kill(self):
        return self.stop(signal.SIGKILL)

    def peak_rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        with contextlib.suppress(Exception):
            self.stop()
        self.final_output = self.output
        os.unlink(self.logfile.name)


def conf_daemon(master, slave, tmp_path, **main_keys):
    """A Daemon started with -c: a config file of the DSNs, KEEPALIVE = 60 and main_keys in [MAIN]."""
    conf = tmp_path / "daemon.conf"
    keys = "".join(f"{key} = {value}\n" for key, value in main_keys.items())
    conf.write_text(f"[MAIN]\nDSN0 = {master.dsn}\nDSN1 = {slave.dsn}\nKEEPALIVE = 60\n{keys}")
    daemon = Daemon(master, slave)
    daemon.args = ["-c", str(conf)]
    return daemon


def run_cli(*args, env=None, timeout=60, cwd=ROOT):
    """Run the pyreplica command to completion: (returncode, stdout, stderr)."""
    full_env = dict(os.environ, **(env or {}))
    result = subprocess.run([sys.executable, "-m", "pyreplica.cli", *args], capture_output=True, text=True,
                            env=full_env, timeout=timeout, cwd=cwd)
    return result.returncode, result.stdout, result.stderr


def create_on_both(master, slave, ddl, tables=()):
    """Same schema on both sides; capture triggers on the master's `tables`."""
    master.execute(ddl)
    slave.execute(ddl)
    for table in tables:
        line = master.scalar("SELECT py_log_create_tg(%s)", (table,))
        assert line.startswith("created trigger"), line


def contents(db, table):
    return db.execute(f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')), count(*) FROM {table} t")[0]


def wait_identical(master, slave, tables, timeout=60):
    def same():
        return all(contents(master, t) == contents(slave, t) for t in tables)
    try:
        wait_until(same, timeout, interval=0.2, message="slave to equal master")
    except AssertionError:
        diffs = {t: (contents(master, t), contents(slave, t)) for t in tables}
        raise AssertionError(f"slave differs from master: {diffs}") from None


def prepared_count(db):
    return db.scalar("SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()")


def applied_on_slave(slave, name):
    rows = slave.execute("SELECT applied FROM pyreplica.position WHERE slave = %s", (name,))
    return rows[0][0] if rows else 0
