"""Secrets (issue 9 item 6): no password from any DSN form in a log line, mail, status/compare output or
error text; clone gives pg_dump/psql their password through a 0600 passfile, never on their command line;
clone finds the client programs without a server installed."""
import json
import os
import stat
import subprocess
import sys

import pytest

from pyreplica import clone as clone_module
from pyreplica.cluster import free_port
from pyreplica.db import ReplicaError, connect, safe_dsn, safe_text
from replication import ROOT, create_on_both, run_cli, wait_until

ROLE = "pyreplica_pw"          # the test clusters' pg_hba asks this role for a scram password over TCP
RIGHT = "Right p@ss:w0rd"      # a space, '@' and ':' so that every form must quote or percent-encode it
WRONG = "Wr0ng-Secret"


# -- safe_dsn / safe_text, no server needed ------------------------------------------------------

@pytest.mark.parametrize("dsn, shown", [
    ("host=h password=secret dbname=d", "host=h password=*** dbname=d"),
    ("host=h password = secret dbname=d", "host=h password = *** dbname=d"),
    ("host=h password='a b' dbname=d", "host=h password=*** dbname=d"),
    (r"password='it\'s' user=u", "password=*** user=u"),
    ("dbname=d password=secret", "dbname=d password=***"),
    ("host=h password=se cret dbname=d", "host=h password=*** dbname=d"),      # malformed: both halves hidden
    ("dbname=d password='unterminated quote", "dbname=d password=***"),
    ("host=h sslpassword=keypass", "host=h sslpassword=***"),
    ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
    ("postgres://user:secret@host:5432/db", "postgres://user:***@host:5432/db"),
    ("postgresql://user:s%40cr%3At@h1,h2/db?sslmode=require", "postgresql://user:***@h1,h2/db?sslmode=require"),
    ("postgresql://user@host/db?password=secret&sslmode=require",
     "postgresql://user@host/db?password=***&sslmode=require"),
    ("postgresql://user:pa/ss@host/db", "postgresql://user:***@host/db"),       # malformed: '/' unencoded
    ("POSTGRESQL://user:secret@[::1/db", "POSTGRESQL://user:***@[::1/db"),
    ("postgresql://host:5432/db", "postgresql://host:5432/db"),
    ("host=h user=u dbname=d", "host=h user=u dbname=d"),
])
def test_safe_dsn_hides_every_password_form(dsn, shown):
    assert safe_dsn(dsn) == shown


@pytest.mark.parametrize("dsn, secret, message", [
    # libpq quotes the piece after a space in an unquoted value
    ("host=127.0.0.1 password=Half Other dbname=d", "Other",
     "bad master connection string 'host=127.0.0.1 password=*** dbname=d': invalid dsn: missing \"=\" after "
     "\"***\" in connection info string"),
    # ... an undecodable percent-encoded password as it was typed
    ("postgresql://u:Bad%zzPw@127.0.0.1/d", "Bad%zzPw",
     "bad master connection string 'postgresql://u:***@127.0.0.1/d': invalid dsn: invalid percent-encoded "
     "token: \"***\""),
    # ... and the whole URI
    ("postgresql://u:Wh0le@[::1/d", "Wh0le",
     "bad master connection string 'postgresql://u:***@[::1/d': invalid dsn: end of string reached when looking "
     "for matching \"]\" in IPv6 host address in URI: \"postgresql://u:***@[::1/d\""),
])
def test_libpq_error_texts_quoting_the_dsn_are_masked(dsn, secret, message):
    with pytest.raises(ReplicaError) as raised:
        connect(dsn, "master")
    assert str(raised.value) == message and secret not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__     # nor in a logged traceback


def test_safe_text_hides_whole_tokens_only():
    """A short password inside a longer word stays: hiding it there would tell what it is."""
    assert safe_text('password authentication failed for user "pyreplica_pw"', "user=pyreplica_pw password=pw") \
        == 'password authentication failed for user "pyreplica_pw"'


# -- the commands, on real servers -----------------------------------------------------------------

@pytest.fixture
def pw_role(master, slave):
    """The login role with a password on both clusters (superuser, as clone needs on the slave)."""
    for db in (master, slave):
        db.cluster.execute(f"DROP ROLE IF EXISTS {ROLE}")
        db.cluster.execute(f"CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD %s", (RIGHT,))
    yield ROLE
    for db in (master, slave):
        db.execute(f"REASSIGN OWNED BY {ROLE} TO postgres")      # what a clone restored as that role
        db.cluster.execute(f"DROP ROLE {ROLE}")


def encoded(password):
    from urllib.parse import quote
    return quote(password, safe="")


def bad_dsns(db):
    """Every way a DSN with a password can fail, and the secret each one holds."""
    port, name = db.cluster.port, db.name
    return [
        (f"host=127.0.0.1 port={port} dbname={name} user={ROLE} password='{WRONG} x'", WRONG),
        (f"host=127.0.0.1 port={port} dbname={name} user={ROLE} password = {WRONG}", WRONG),
        (f"postgresql://{ROLE}:{encoded(WRONG + '@:')}@127.0.0.1:{port}/{name}", WRONG),
        (f"postgres://{ROLE}@127.0.0.1:{port}/{name}?password={WRONG}", WRONG),
        (f"postgresql://{ROLE}:{WRONG}@127.0.0.1:{free_port()}/{name}", WRONG),                # unreachable
        (f"postgresql://{ROLE}:{WRONG}@[::1/{name}", WRONG),                                   # malformed URI
        (f"postgresql://{ROLE}:{WRONG}%zz@127.0.0.1:{port}/{name}", WRONG),                    # bad %-encoding
        (f"host=127.0.0.1 port={port} password={WRONG} Other dbname={name}", "Other"),         # malformed
    ]


def assert_hidden(rc, out, err, dsn, secret, side="master"):
    text = out + err
    assert rc == 1, text
    assert "Traceback" not in text
    for form in {secret, encoded(secret), WRONG, RIGHT, encoded(RIGHT)}:
        assert form not in text, f"{form!r} shown for {dsn!r}:\n{text}"
    # the one error line names the side and shows the DSN masked
    assert (f"the {side} ({safe_dsn(dsn)}): " in err
            or f"bad {side} connection string {safe_dsn(dsn)!r}: " in err), err


@pytest.mark.parametrize("command", [["run", "--name", "sec"], ["status"], ["status", "--json"],
                                     ["compare", "--name", "sec", "--wait", "1"], ["clone", "--name", "sec"]])
def test_no_password_in_any_command_output(master, slave, pw_role, command):
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY)", ["t"])
    for dsn, secret in bad_dsns(master):
        rc, out, err = run_cli(command[0], dsn, slave.dsn, *command[1:])
        assert_hidden(rc, out, err, dsn, secret)


@pytest.mark.parametrize("command", [["run", "--name", "sec"], ["compare", "--name", "sec", "--wait", "1"]])
def test_no_password_of_the_slave_dsn_either(master, slave, pw_role, command):
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY)", ["t"])
    for dsn, secret in bad_dsns(slave):
        rc, out, err = run_cli(command[0], master.dsn, dsn, *command[1:])
        assert_hidden(rc, out, err, dsn, secret, side="slave")


def test_status_json_with_a_password_dsn_shows_no_password(master, pw_role):
    dsn = f"postgresql://{ROLE}:{encoded(RIGHT)}@127.0.0.1:{master.cluster.port}/{master.name}"
    rc, out, err = run_cli("status", dsn, "--json")
    assert (rc, err) == (0, "")
    assert json.loads(out)["master"] == master.name
    assert RIGHT not in out and encoded(RIGHT) not in out


def test_error_mail_and_log_file_hold_no_password(tmp_path, master, slave, pw_role):
    """`run -c CONF` with a wrong URI password: the error line and the error mail mask it."""
    from test_mail import smtp_server
    inbox, controller = smtp_server()
    dsn = f"postgresql://{ROLE}:{encoded(WRONG)}@127.0.0.1:{master.cluster.port}/{master.name}"
    conf = tmp_path / "sec.conf"
    conf.write_text(f"[MAIN]\nNAME = sec\nDSN0 = {dsn}\nDSN1 = {slave.dsn}\n[SMTP]\n"
                    f"SERVER = 127.0.0.1:{controller.port}\nTO_ADDRS = dba@example.com\n")
    conf.chmod(0o600)
    try:
        rc, out, err = run_cli("run", "-c", str(conf))
        inbox.wait_for("pyreplica sec ERROR")
    finally:
        controller.stop()
    assert_hidden(rc, out, err, dsn, WRONG)
    body = inbox.mails[0].body
    assert f"cannot connect to the master ({safe_dsn(dsn)})" in body
    assert WRONG not in body and encoded(WRONG) not in body


# -- clone: credentials never on a client program's command line ----------------------------------

def children(pid):
    """{child pid: program name} of the running children of `pid`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat_line = f.read()
        except OSError:
            continue
        comm = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")]
        if int(stat_line[stat_line.rindex(")") + 2:].split()[1]) == pid:
            found[int(entry)] = comm
    return found


def process_view(pid):
    """What another local user may see of a process (its argv), and its environment."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode()
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = f.read().decode(errors="replace")
    return argv, environ


def wait_for_child(proc, program):
    def found():
        assert proc.poll() is None, f"clone ended early: {proc.communicate()}"
        return next((pid for pid, comm in children(proc.pid).items() if comm == program), None)
    return wait_until(found, 60, interval=0.05, message=f"{program} started by clone")


def check_secret_out_of(pid, password):
    argv, environ = process_view(pid)
    assert password not in argv and encoded(password) not in argv, argv
    assert password not in environ and "PGPASSWORD" not in environ
    passfile = argv.split("passfile=", 1)[1].split()[0].rstrip("\0").strip("'")
    assert stat.S_IMODE(os.stat(passfile).st_mode) == 0o600
    return passfile


def test_clone_gives_passwords_to_pg_dump_and_psql_in_a_passfile(master, slave, pw_role):
    """pg_dump and psql are held on locks while their argv and environment are read from /proc."""
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, v text)", ["t"])
    slave.execute("DROP TABLE t")
    master.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g")
    master_dsn = f"postgresql://{ROLE}:{encoded(RIGHT)}@127.0.0.1:{master.cluster.port}/{master.name}"
    slave_dsn = (f"host=127.0.0.1 port={slave.cluster.port} dbname={slave.name} user={ROLE} "
                 f"password='{RIGHT}'")
    master_lock, slave_lock = master.connect(autocommit=False), slave.connect(autocommit=False)
    master_lock.cursor().execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")      # pg_dump waits for it
    slave_lock.cursor().execute("CREATE TABLE t (x int)")       # psql's CREATE TABLE t waits for this one
    proc = subprocess.Popen([sys.executable, "-m", "pyreplica.cli", "clone", master_dsn, slave_dsn, "--name", "sec"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        passfiles = [check_secret_out_of(wait_for_child(proc, "pg_dump"), RIGHT)]
        master_lock.rollback()
        passfiles.append(check_secret_out_of(wait_for_child(proc, "psql"), RIGHT))
        slave_lock.rollback()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        master_lock.close()
        slave_lock.close()
    assert proc.returncode == 0, err
    assert RIGHT not in out + err and encoded(RIGHT) not in out + err
    assert slave.execute("SELECT count(*) FROM t") == [(100,)]
    assert passfiles[0] != passfiles[1] and not any(os.path.exists(p) for p in passfiles)    # removed


# -- clone finds the client programs -----------------------------------------------------------------

def program(directory, name, text="#!/bin/sh\nexit 0\n"):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def no_server(tmp_path, monkeypatch):
    """A host whose PostgreSQL lives where the test says: CLIENT_ROOT and PATH under tmp_path."""
    monkeypatch.setattr(clone_module, "CLIENT_ROOT", str(tmp_path / "lib"))
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    return tmp_path


def test_tool_takes_the_newest_version_that_has_the_program(no_server):
    program(no_server / "lib/9.6/bin", "pg_dump")
    expected = program(no_server / "lib/13/bin", "pg_dump")
    os.makedirs(no_server / "lib/16/bin")         # a server-only or half-removed version
    os.makedirs(no_server / "lib/not-a-version/bin")
    program(no_server / "path", "pg_dump")
    assert clone_module.tool("pg_dump") == expected


def test_tool_then_asks_pg_config(no_server):
    expected = program(no_server / "opt/pg/bin", "psql")
    program(no_server / "path", "pg_config", f"#!/bin/sh\necho {no_server / 'opt/pg/bin'}\n")
    program(no_server / "path", "psql")
    assert clone_module.tool("psql") == expected


def test_tool_then_looks_on_path(no_server):
    program(no_server / "path", "pg_config", f"#!/bin/sh\necho {no_server / 'nowhere'}\n")
    expected = program(no_server / "path", "pg_restore")
    assert clone_module.tool("pg_restore") == expected


def test_tool_missing_names_the_package(no_server):
    with pytest.raises(ReplicaError) as raised:
        clone_module.tool("pg_dump")
    assert str(raised.value) == (
        f"pg_dump not found (in {no_server / 'lib'}/*/bin, pg_config --bindir or PATH): install the PostgreSQL "
        f"client programs of the master's major version NN or newer (Debian/Ubuntu: apt-get install "
        f"postgresql-client-NN, or postgresql-client)")


def test_clone_without_client_programs_is_one_line_exit_1(master, slave, tmp_path):
    """The clone command itself, on a PATH without them (and no Debian layout): no traceback."""
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY)", ["t"])
    slave.execute("DROP TABLE t")
    shim = tmp_path / "shim.py"          # runs the CLI with CLIENT_ROOT pointed at an empty directory
    shim.write_text("import sys; import pyreplica.clone as c; c.CLIENT_ROOT = sys.argv.pop(1)\n"
                    "from pyreplica.cli import main; sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PATH=str(tmp_path), PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, str(shim), str(tmp_path), "clone", master.dsn, slave.dsn, "--name",
                             "sec"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert (result.returncode, result.stderr.splitlines()[-1]) == (1, (
        f"pyreplica: pg_dump not found (in {tmp_path}/*/bin, pg_config --bindir or PATH): install the PostgreSQL "
        f"client programs of the master's major version NN or newer (Debian/Ubuntu: apt-get install "
        f"postgresql-client-NN, or postgresql-client)"))
    assert master.scalar("SELECT count(*) FROM pyreplica.replica_slaves WHERE name = 'sec'") == 0     # unregistered again
