"""The service (docs/design.md §7) for real: detached, pid file, the pyreplica user, one worker per conf,
SIGHUP, SIGTERM, the init.d script through its /etc/init.d-style symlink, the systemd unit."""
import configparser
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from replication import ROOT, create_on_both, prepared_count, wait_identical, wait_until
from service_helpers import SERVICE_USER, conf_text, service  # noqa: F401 (fixture)

TABLE = "CREATE TABLE t (id int PRIMARY KEY, v text)"


def owner_uid(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))


# -- the tests ----------------------------------------------------------------------------------
def test_service_replicates_per_conf_reloads_restarts_and_stops_cleanly(service, master, slave, slave2, master2,
                                                                      slave3):
    slave2.execute(TABLE)
    create_on_both(master, slave, TABLE, ["t"])
    create_on_both(master2, slave3, TABLE, ["t"])
    master2.execute("INSERT INTO t VALUES (1, 'written before c.conf existed')")
    worker_pidfile = os.path.join(service.dir, "run", "a.pid")
    service.write_conf("a", master, slave, PIDFILE=worker_pidfile)
    service.write_conf("b", master, slave2)

    rc, out = service.init("start")
    assert rc == 0, out + service.log
    pid = service.pid
    assert service.init("status") == (0, f"pyreplica is running (pid {pid})\n")
    if service.user:
        assert owner_uid(pid) == service.user.pw_uid, "the service did not drop to the pyreplica user"
    # two new slaves of one master: write once both are registered (a slave seen for the first time
    # starts at the oldest event still in the log, and the first one's confirmations prune it)
    wait_until(lambda: master.scalar("SELECT count(*) FROM pyreplica.replica_slaves") == 2, message="a and b registered")
    master.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g")
    wait_identical(master, slave, ["t"])
    wait_identical(master, slave2, ["t"])

    # a second start is refused while the first runs; the init script's start is a no-op
    rc, _, err = service.command("--conf-dir", service.conf_dir, "--pidfile", service.pidfile,
                                 "--logfile", service.logfile, "--user", SERVICE_USER)
    assert (rc, err) == (1, f"pyreplica: already running (pid {pid}, pid file {service.pidfile})\n")

    # SIGHUP after adding a conf: it starts replicating; removing one stops its worker
    service.write_conf("c", master2, slave3)
    os.unlink(os.path.join(service.conf_dir, "b.conf"))
    assert service.init("reload")[0] == 0
    service.wait_log("Worker b stopped")
    master.execute("UPDATE t SET v = 'after reload' WHERE id <= 10")
    master2.execute("INSERT INTO t VALUES (2, 'after reload')")
    wait_identical(master2, slave3, ["t"])
    wait_identical(master, slave, ["t"])
    assert slave2.scalar("SELECT count(*) FROM t WHERE v = 'after reload'") == 0

    # a worker that dies is restarted (with backoff) and the others never notice
    with open(worker_pidfile) as f:
        assert int(f.read()) == service.worker_pid("a")
    os.kill(service.worker_pid("a"), signal.SIGKILL)
    service.wait_log("Worker a exited with signal SIGKILL; restarting it in 1 s")
    master.execute("DELETE FROM t WHERE id > 90")
    master2.execute("UPDATE t SET v = 'while a restarts'")
    wait_identical(master, slave, ["t"])
    wait_identical(master2, slave3, ["t"])

    # SIGTERM (init.d stop): every worker stops, nothing is left behind
    assert service.init("stop")[0] == 0
    assert service.processes() == []
    assert not os.path.exists(service.pidfile) and not os.path.exists(worker_pidfile)
    assert service.init("status") == (3, "pyreplica is not running\n")
    for db in (master, slave, slave2, master2, slave3):
        assert prepared_count(db) == 0, db
    lines = service.log.splitlines()
    assert lines[-1].endswith(" Service stopped")
    # each worker logs in the guide's format under its NAME; b stopped at the reload, a and c now
    stopped = sorted(line.split()[0] for line in lines if line.endswith(" Stopped"))
    assert stopped == ["a", "b", "c"]
    assert any(line.startswith("c ") and line.endswith("Opening origin (master) connection") for line in lines)


def test_stale_pid_file_is_replaced_and_status_codes(service):
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.makedirs(os.path.dirname(service.pidfile))
    if service.user:
        os.chown(os.path.dirname(service.pidfile), service.user.pw_uid, service.user.pw_gid)
    with open(service.pidfile, "w") as f:
        f.write(f"{dead.pid}\n")
    assert service.init("status") == (1, f"pyreplica is not running, but its pid file {service.pidfile} remains\n")
    rc, out = service.init("start")
    assert rc == 0, out
    assert service.pid != dead.pid and service.init("status")[0] == 0
    assert "No *.conf in" in service.log
    assert service.init("stop")[0] == 0
    assert service.init("status")[0] == 3 and service.processes() == []


def test_bad_conf_refuses_to_start(service, master, slave):
    path = service.write_conf("bad", master, slave, DEBUG_LEVEL=9)
    rc, out, err = service.command("--conf-dir", service.conf_dir, "--pidfile", service.pidfile,
                                   "--logfile", service.logfile, "--user", SERVICE_USER)
    assert (rc, err) == (2, f"pyreplica: {path}: bad value '9' for DEBUG_LEVEL in [MAIN]: expected 0, 1, 2 or 3\n")
    assert service.init("start")[0] == 6          # LSB: program is not configured
    assert service.processes() == [] and not os.path.exists(service.pidfile)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_missing_service_user_is_named_with_the_command_that_creates_it(service):
    rc, out, err = service.command("--conf-dir", service.conf_dir, "--pidfile", service.pidfile,
                                   "--user", "pyreplica_no_such_user")
    assert (rc, err) == (1, "pyreplica: the OS user 'pyreplica_no_such_user' does not exist: create it with "
                            "`useradd --system --no-create-home pyreplica_no_such_user` (or choose one with --user)\n")


def test_systemd_unit():
    with open(os.path.join(ROOT, "pyreplica@.service")) as f:
        text = f.read()
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read_string(text)
    svc = unit["Service"]
    assert svc["ExecStart"].endswith("pyreplica run -c /etc/pyreplica/%i.conf")
    assert (svc["User"], svc["Restart"], svc["KillSignal"], svc["Type"]) == ("pyreplica", "on-failure", "SIGTERM",
                                                                             "simple")
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze") is None:
        return
    with tempfile.TemporaryDirectory() as d:
        # verify an instance; the command must exist, so point it at this checkout's when not installed
        command = svc["ExecStart"].split()[0]
        if not os.path.exists(command):   # the checkout's, else the one next to the interpreter running us
            local = os.path.join(ROOT, ".venv", "bin", "pyreplica")
            if not os.path.exists(local):
                local = os.path.join(os.path.dirname(sys.executable), "pyreplica")
            text = text.replace(command, local)
        instance = os.path.join(d, "pyreplica@somedb.service")
        with open(instance, "w") as f:
            f.write(text)
        result = subprocess.run(["systemd-analyze", "verify", instance], capture_output=True, text=True, cwd=d)
        assert result.returncode == 0, result.stderr


def test_failing_worker_is_retried_with_backoff_and_log_follows_logrotate(service, bare_master, slave):
    """Exit code 1 (here: master-install.sql not run yet) is logged and retried, 1 s then 2 s...; once
    the administrator fixes it the worker replicates. logrotate's rename + create + reload is followed."""
    create_on_both(bare_master, slave, TABLE)
    service.write_conf("late", bare_master, slave)
    assert service.init("start")[0] == 0
    service.wait_log("Worker late exited with exit code 1 (a fatal error (server, install or config problem, see "
                     "its log)); restarting it in 2 s")
    assert "has no pyreplica log: run `psql" in service.log
    bare_master.install_master()
    assert bare_master.scalar("SELECT py_log_create_tg('t')").startswith("created trigger")
    bare_master.execute("INSERT INTO t VALUES (1, 'once installed')")
    wait_identical(bare_master, slave, ["t"])

    # logrotate: rename, create the new file for the service user, reload
    os.rename(service.logfile, service.logfile + ".1")
    with open(service.logfile, "w"):
        pass
    if service.user:
        os.chown(service.logfile, service.user.pw_uid, service.user.pw_gid)
    assert service.init("reload")[0] == 0
    service.wait_log("SIGHUP: reopened the log")
    bare_master.execute("INSERT INTO t VALUES (2, 'after logrotate')")
    wait_identical(bare_master, slave, ["t"])
    assert service.init("stop")[0] == 0
    lines = service.log.splitlines()      # the new file: both the service and the worker reopened it
    assert any(line.startswith("late ") and line.endswith(" Stopped") for line in lines)
    assert lines[-1].endswith(" Service stopped")
    assert prepared_count(bare_master) == prepared_count(slave) == 0


# -- as an attacker: the pyreplica user (who owns the pid directory, maybe a log directory) against root --
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the attacks are on root's start of the service")
DUMMY_DSNS = {"DSN0": "host=127.0.0.1 port=1 dbname=m", "DSN1": "host=127.0.0.1 port=1 dbname=s"}


def root_file(path, text="root's own\n"):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def untouched(path, text="root's own\n"):
    st = os.lstat(path)
    with open(path) as f:
        return (st.st_uid, oct(st.st_mode & 0o777), f.read()) == (0, "0o644", text)


@needs_root
def test_root_never_follows_a_link_planted_in_a_log_or_pid_path(service):
    logs = service.user_dir("logs")                 # a log directory the service user may write
    rootonly = os.path.join(service.dir, "rootonly")
    os.mkdir(rootonly, 0o755)
    victim = root_file(os.path.join(service.dir, "victim"))
    # the service's own log -> an existing root file; a worker's LOGFILE -> a file root would create
    service.logfile = os.path.join(logs, "pyreplica.log")
    service.as_user("ln", "-s", victim, service.logfile)
    worker_log = os.path.join(logs, "worker.log")
    service.as_user("ln", "-s", os.path.join(rootonly, "new"), worker_log)
    with open(os.path.join(service.conf_dir, "w.conf"), "w") as f:
        f.write(conf_text(dict(DUMMY_DSNS, LOGFILE=worker_log)))

    assert service.init("start") == (1, f"pyreplica: user {SERVICE_USER} cannot write the log file {service.logfile}: "
                                        f"it is a symbolic link to {victim} (Permission denied); remove the link, or "
                                        f"set the log file to a path of your choosing\n")
    assert untouched(victim)
    os.unlink(service.logfile)
    assert service.init("start") == (1, f"pyreplica: user {SERVICE_USER} cannot write the log file {worker_log}: "
                                        f"it is a symbolic link to {rootonly}/new (Permission denied); remove the "
                                        f"link, or set the log file to a path of your choosing\n")
    assert os.listdir(rootonly) == [], "root created a file through the planted link"
    # root made the service's own log afresh, for the user, since it was gone
    assert os.lstat(service.logfile).st_uid == service.user.pw_uid

    # a directory on the way swapped for a link to a root directory: root creates nothing there
    os.unlink(worker_log)
    service.as_user("ln", "-s", rootonly, os.path.join(logs, "sub"))
    with open(os.path.join(service.conf_dir, "w.conf"), "w") as f:
        f.write(conf_text(dict(DUMMY_DSNS, LOGFILE=os.path.join(logs, "sub", "w.log"))))
    rc, out = service.init("start")
    assert (rc, out) == (1, f"pyreplica: user {SERVICE_USER} cannot create the log file {logs}/sub/w.log: Permission "
                            f"denied (create it for that user in a directory only root can write, e.g. `install -o "
                            f"{SERVICE_USER} -m 0640 /dev/null {logs}/sub/w.log`)\n")
    assert os.listdir(rootonly) == []

    # the pid directory: a link to a root directory is neither created through nor chowned
    os.unlink(os.path.join(service.conf_dir, "w.conf"))
    service.pidfile = os.path.join(logs, "run", "pyreplica.pid")
    service.as_user("ln", "-s", rootonly, os.path.join(logs, "run"))
    rc, out = service.init("start")
    assert (rc, out) == (1, f"pyreplica: user {SERVICE_USER} cannot write pid files in {logs}/run: use --pidfile "
                            f"/run/pyreplica/pyreplica.pid (created for it) or chown {SERVICE_USER} {logs}/run\n")
    st = os.stat(rootonly)
    assert (st.st_uid, os.listdir(rootonly)) == (0, [])
    assert service.processes() == []


@needs_root
def test_a_pid_file_naming_another_process_is_never_signalled(service):
    os.makedirs(os.path.dirname(service.pidfile))
    os.chown(os.path.dirname(service.pidfile), service.user.pw_uid, service.user.pw_gid)
    # a root process that even looks a bit like a service: "pyreplica", "service", another pid file
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "pyreplica", "service",
                               "--pidfile", "/elsewhere/pyreplica.pid"])
    try:
        service.as_user("sh", "-c", f"echo {victim.pid} > {service.pidfile}")
        said = (f"pyreplica is not running: its pid file {service.pidfile} names pid {victim.pid}, which is not the "
                f"pyreplica service (not signalled)\n")
        assert service.init("stop") == (0, said)
        assert service.init("reload") == (7, said)
        assert service.init("restart")[0] == 0       # the pid file is taken over, the process left alone
        assert service.pid != victim.pid and service.init("status")[0] == 0
        assert service.init("stop")[0] == 0 and service.processes() == []
        assert victim.poll() is None, "a process named by the pid file was signalled"
    finally:
        victim.kill()
        victim.wait()


@needs_root
def test_init_script_imports_nothing_from_the_working_directory(service):
    cwd = service.user_dir("attacker")
    marker = os.path.join(service.dir, "imported")
    payload = f"open({marker!r}, 'a').write(__name__ + '\\n')\n"
    for module in ("pyreplica/__init__.py", "pyreplica/cli.py", "psycopg2/__init__.py", "daemon.py"):
        os.makedirs(os.path.join(cwd, os.path.dirname(module)), exist_ok=True)
        with open(os.path.join(cwd, module), "w") as f:
            f.write(payload)
    rc, out = service.init("start", cwd=cwd)
    assert rc == 0, out + service.log
    assert service.init("stop", cwd=cwd)[0] == 0
    assert not os.path.exists(marker), "planted modules ran: " + open(marker).read()
