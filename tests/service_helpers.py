"""The service as a real detached process in a temp dir, for test_service and test_mail."""
import os
import pwd
import shutil
import signal
import site
import subprocess
import sys
import tempfile

import pytest

from replication import ROOT, wait_until

SERVICE_USER = "pyreplica"


def service_user():
    """The `pyreplica` OS user (created when missing, as the README says), or None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SERVICE_USER], check=True)
        return pwd.getpwnam(SERVICE_USER)


def python_env():
    """PYTHONPATH that finds pyreplica and its dependencies whatever interpreter runs them."""
    paths = [ROOT, *site.getsitepackages()]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")


def usable_python(user):
    """An interpreter the service user may run: ours, else the system's of the same version (ours may
    live under root's 0700 home, e.g. pyenv). The service refuses to start otherwise (tested below)."""
    candidates = [sys.executable, f"/usr/bin/python3.{sys.version_info.minor}"]
    for python in candidates:
        if user is None:
            return python
        try:
            probe = subprocess.run([python, "-c", "import psycopg2, daemon, pyreplica.service"], env=python_env(),
                                   user=user.pw_uid, group=user.pw_gid, extra_groups=[], capture_output=True,
                                   cwd="/")
        except OSError:         # not even executable by that user
            continue
        if probe.returncode == 0:
            return python
    pytest.skip(f"no Python interpreter that user {user.pw_name} may run with psycopg2 and python-daemon")


def conf_text(main, smtp=None):
    text = "[MAIN]\n" + "".join(f"{k} = {v}\n" for k, v in main.items())
    if smtp:
        text += "[SMTP]\n" + "".join(f"{k} = {v}\n" for k, v in smtp.items())
    return text


class Service:
    """A service instance in a temp dir: conf dir, pid file (in a dir it must create), log, init.d link."""

    def __init__(self):
        self.user = service_user()
        self.python = usable_python(self.user)
        self.dir = tempfile.mkdtemp(prefix="pyreplica-service-")
        os.chmod(self.dir, 0o755)
        self.conf_dir = os.path.join(self.dir, "conf.d")
        os.mkdir(self.conf_dir)
        self.pidfile = os.path.join(self.dir, "run", "pyreplica.pid")
        self.logfile = os.path.join(self.dir, "pyreplica.log")
        os.mkdir(os.path.join(self.dir, "init.d"))
        self.initd = os.path.join(self.dir, "init.d", "pyreplica")
        os.symlink(os.path.join(ROOT, "pyreplica.sh"), self.initd)

    def env(self):
        return dict(python_env(), PYREPLICA=f"{self.python} -m pyreplica.cli", PYREPLICA_CONF_DIR=self.conf_dir,
                    PYREPLICA_PIDFILE=self.pidfile, PYREPLICA_LOGFILE=self.logfile, PYREPLICA_USER=SERVICE_USER)

    def init(self, action, cwd="/"):
        """/etc/init.d/pyreplica ACTION, through the symlink: (exit code, output)."""
        result = subprocess.run([self.initd, action], env=self.env(), capture_output=True, text=True, timeout=90,
                                cwd=cwd)
        return result.returncode, result.stdout + result.stderr

    def command(self, *args):
        result = subprocess.run([self.python, "-m", "pyreplica.cli", "service", *args], env=python_env(),
                                capture_output=True, text=True, timeout=60, cwd="/")
        return result.returncode, result.stdout, result.stderr

    def as_user(self, *command):
        """Run a command as the service user, the attacker of the tests that plant files."""
        subprocess.run(command, user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[], check=True,
                       cwd="/")

    def user_dir(self, name):
        """A directory of the temp dir that the service user owns (as a pid or log directory may be)."""
        path = os.path.join(self.dir, name)
        os.mkdir(path, 0o755)
        os.chown(path, self.user.pw_uid, self.user.pw_gid)
        return path

    def write_conf(self, name, master, slave, smtp=None, **extra):
        keys = {"NAME": name, "SLAVE_FIELD": name, "DSN0": master.dsn, "DSN1": slave.dsn, "KEEPALIVE": 5,
                "LOGFILE": self.logfile, **extra}
        path = os.path.join(self.conf_dir, f"{name}.conf")
        with open(path, "w") as f:
            f.write(conf_text(keys, smtp))
        return path

    @property
    def pid(self):
        with open(self.pidfile) as f:
            return int(f.read())

    @property
    def log(self):
        with open(self.logfile) as f:
            return f.read()

    def wait_log(self, text, timeout=30):
        wait_until(lambda: text in self.log, timeout, message=f"{text!r} in the service log:\n{self.log[-3000:]}")

    def processes(self):
        """Pids of every process, service or worker, started for this temp dir."""
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if self.dir.encode() in f.read():
                        found.append(int(entry))
            except (OSError, ValueError):
                continue
        return found

    def worker_pid(self, name):
        conf = os.path.join(self.conf_dir, f"{name}.conf").encode()
        for pid in self.processes():
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[-2:-1] == [conf]:
                    return pid
        return None

    def cleanup(self):
        for pid in self.processes():        # only what this test started, should it have failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def service():
    svc = Service()
    yield svc
    svc.cleanup()
