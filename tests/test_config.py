"""Configuration (docs/design.md §7): sample.conf from KEYS, the original keys, and refusals with exit code 2."""
import os
import subprocess
import sys

import pytest

from pyreplica import config
from replication import ROOT, Daemon, create_on_both, wait_identical

MAIN_KEYS = ("NAME, DSN0, DSN1, SLAVE_FIELD, SKIP_USER, KEEPALIVE, DEBUG_LEVEL, LOGFILE, PIDFILE, FILTERS, "
             "TABLES, BATCH_EVENTS, BATCH_BYTES, CATCHUP_EVENTS, PEER_TIMEOUT, RETRY_MAX")
GOOD_MAIN = "[MAIN]\nDSN0 = dbname=m host=127.0.0.1\nDSN1 = dbname=s host=127.0.0.1\n"


def run_without_dsn_env(*args):
    """The real command, with no DSN0/DSN1 inherited from the caller's environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("DSN0", "DSN1")}
    result = subprocess.run([sys.executable, "-m", "pyreplica.cli", *args], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=60)
    return result.returncode, result.stdout, result.stderr


def write(tmp_path, text, name="bad.conf", mode=0o640):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_sample_conf_is_generated_from_keys_and_loads():
    with open(os.path.join(ROOT, "sample.conf")) as f:
        shipped = f.read()
    assert shipped == config.sample_conf(), "sample.conf drifted from config.KEYS: regenerate it with " \
                                            "python -c 'import pyreplica.config as c; print(c.sample_conf(), end=\"\")' > sample.conf"
    loaded = config.load(os.path.join(ROOT, "sample.conf"), environ={})
    assert loaded.KEEPALIVE == 60 and loaded.DEBUG_LEVEL == 1 and loaded.LOGFILE == "/var/log/pyreplica.log"
    for key in config.KEYS:      # every key is documented, under its section
        assert f"{key.name} =" in shipped


def test_original_keys_keep_their_names_and_meaning(tmp_path):
    path = write(tmp_path, GOOD_MAIN + "NAME = somedb\nSKIP_USER = repl\nSLAVE_FIELD = s1\nkeepalive = true\n"
                 "DEBUG_LEVEL = 2\n[SMTP]\nSERVER = mail:2525\nUSERNAME = u\nPASSWORD = p\nFROM_ADDR = a@b\n"
                 "TO_ADDRS = x@y; z@w\nSTART_SUBJECT = up\nSTOP_SUBJECT = down\nERROR_SUBJECT = err\n"
                 "WARNING_SUBJECT = warn\n", "good.conf")
    c = config.load(path, environ={})
    assert (c.NAME, c.SKIP_USER, c.SLAVE_FIELD, c.KEEPALIVE, c.DEBUG_LEVEL) == ("somedb", "repl", "s1", 60, 2)
    assert c.get("SMTP", "TO_ADDRS") == ["x@y", "z@w"]
    assert c.get("SMTP", "SERVER") == "mail:2525" and c.get("SMTP", "WARNING_SUBJECT") == "warn"


@pytest.mark.parametrize("text, message", [
    (GOOD_MAIN + "KEEPALVE = 5\n", f"unknown key KEEPALVE in [MAIN] (allowed: {MAIN_KEYS})"),
    (GOOD_MAIN + "KEEPALIVE = soon\n", "bad value 'soon' for KEEPALIVE in [MAIN]: expected a number of seconds >= 0, "
                                       "or true (= 60)"),
    (GOOD_MAIN + "DEBUG_LEVEL = 7\n", "bad value '7' for DEBUG_LEVEL in [MAIN]: expected 0, 1, 2 or 3"),
    (GOOD_MAIN + "BATCH_EVENTS = 0\n", "bad value '0' for BATCH_EVENTS in [MAIN]: expected a whole number >= 1"),
    (GOOD_MAIN + "RETRY_MAX = never\n", "bad value 'never' for RETRY_MAX in [MAIN]: expected a number of seconds > 0"),
    (GOOD_MAIN + "SLAVE_FIELD = a b\n", "bad value 'a b' for SLAVE_FIELD in [MAIN]: expected 1-63 letters, digits, "
                                        "'_', '.' or '-'"),
    (GOOD_MAIN + "[SMTP]\nHOST = x\n", "unknown key HOST in [SMTP] (allowed: SERVER, USERNAME, PASSWORD, TLS_VERIFY, "
                                       "CA_FILE, FROM_ADDR, TO_ADDRS, START_SUBJECT, STOP_SUBJECT, ERROR_SUBJECT, "
                                       "WARNING_SUBJECT)"),
    (GOOD_MAIN + "[SMTP]\nTLS_VERIFY = maybe\n", "bad value 'maybe' for TLS_VERIFY in [SMTP]: expected true or false"),
    (GOOD_MAIN + "[MAILER]\nX = 1\n", "unknown section [MAILER] (allowed: [MAIN], [SMTP])"),
    ("[MAIN]\nDSN0 = dbname=m\n", "missing DSN1 (the slave's connection string) in [MAIN] and in the environment"),
])
def test_bad_config_refuses_to_start_naming_file_key_and_what_is_allowed(tmp_path, text, message):
    path = write(tmp_path, text)
    rc, out, err = run_without_dsn_env("run", "-c", path)
    assert (rc, err) == (2, f"pyreplica: {path}: {message}\n")


def test_unreadable_config_file_is_refused(tmp_path):
    path = str(tmp_path / "missing.conf")
    rc, out, err = run_without_dsn_env("run", "-c", path)
    assert (rc, err) == (2, f"pyreplica: {path}: cannot read config file: No such file or directory\n")


def test_dsns_from_the_environment(master, slave, tmp_path):
    """A conf without DSN0/DSN1 replicates with them taken from the environment, as the original did."""
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, v text)", ["t"])
    path = write(tmp_path, "[MAIN]\nNAME = envset\nSLAVE_FIELD = envslave\nKEEPALIVE = 5\n", "env.conf")
    master.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20) g")
    daemon = Daemon(master, slave, env={"DSN0": master.dsn, "DSN1": slave.dsn})
    daemon.args = ["-c", path]
    with daemon:
        wait_identical(master, slave, ["t"])
        assert daemon.stop() == 0
    assert "envset " in daemon.output
    assert master.scalar("SELECT count(*) FROM pyreplica.replica_slaves WHERE name = 'envslave'") == 1


WITH_PASSWORD = {
    "keyword DSN": "[MAIN]\nDSN0 = dbname=m host=127.0.0.1 password = 'a b'\nDSN1 = dbname=s\n",
    "URI DSN": "[MAIN]\nDSN0 = dbname=m\nDSN1 = postgresql://u:secret@127.0.0.1/s\n",
    "URI query": "[MAIN]\nDSN0 = postgres://u@127.0.0.1/m?password=secret\nDSN1 = dbname=s\n",
    "SMTP password": GOOD_MAIN + "[SMTP]\nSERVER = mail\nUSERNAME = u\nPASSWORD = secret\n",
}


@pytest.mark.parametrize("mode, fixed", [(0o666, "644"), (0o664, "644"), (0o620, "600"), (0o642, "640")])
def test_conf_writable_by_others_is_refused(tmp_path, mode, fixed):
    path = write(tmp_path, GOOD_MAIN, mode=mode)
    rc, out, err = run_without_dsn_env("run", "-c", path)
    assert (rc, err) == (2, f"pyreplica: {path}: refused: the file is writable by users other than its owner "
                            f"(mode {mode:04o}): chmod {fixed} {path}\n")
    os.chmod(path, int(fixed, 8))           # the chmod given fixes it
    assert config.load(path, environ={}).DSN0 == "dbname=m host=127.0.0.1"


@pytest.mark.parametrize("kind", WITH_PASSWORD)
def test_world_readable_conf_with_a_password_is_refused(tmp_path, kind):
    path = write(tmp_path, WITH_PASSWORD[kind], mode=0o644)
    rc, out, err = run_without_dsn_env("run", "-c", path)
    assert (rc, err) == (2, f"pyreplica: {path}: refused: the file is readable by every user and holds a password "
                            f"(mode 0644): chmod 640 {path}\n")
    assert "secret" not in out + err
    os.chmod(path, 0o640)    # group-readable stays allowed: the service's workers read it as group pyreplica
    assert config.load(path, environ={}).source == path


def test_world_readable_conf_without_a_password_and_writable_only_by_its_owner_loads(tmp_path):
    assert config.load(write(tmp_path, GOOD_MAIN, mode=0o644), environ={}).DSN1 == "dbname=s host=127.0.0.1"


def test_conf_mode_is_checked_on_the_file_a_symlink_names(tmp_path):
    target = write(tmp_path, WITH_PASSWORD["SMTP password"], name="real.conf", mode=0o604)
    link = tmp_path / "link.conf"
    link.symlink_to(target)
    with pytest.raises(config.ConfigError) as refused:
        config.load(str(link), environ={})
    assert str(refused.value) == (f"{link}: refused: the file is readable by every user and holds a password "
                                  f"(mode 0604): chmod 600 {link}")


def test_smtp_tls_keys_default_to_verifying(tmp_path):
    c = config.load(write(tmp_path, GOOD_MAIN), environ={})
    assert (c.get("SMTP", "TLS_VERIFY"), c.get("SMTP", "CA_FILE")) == (True, "")
    c = config.load(write(tmp_path, GOOD_MAIN + "[SMTP]\nTLS_VERIFY = false\nCA_FILE = /etc/ca.pem\n"), environ={})
    assert (c.get("SMTP", "TLS_VERIFY"), c.get("SMTP", "CA_FILE")) == (False, "/etc/ca.pem")
