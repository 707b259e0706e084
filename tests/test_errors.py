"""Bad input: one clear line naming the side and what to do, exit 1 (2 for usage), no traceback."""
import re

import pytest

from conftest import start_cluster
from pyreplica.cluster import free_port
from replication import create_on_both, run_cli


def run_once(master_dsn, slave_dsn, *extra):
    rc, out, err = run_cli("run", master_dsn, slave_dsn, "--name", "e1", *extra)
    assert "Traceback" not in out + err, err
    return rc, [line for line in err.splitlines() if line.strip()]


# `NAME Thu Dec  3 18:53:16 2026 `: ctime pads a one-digit day with a space
LOG_PREFIX = re.compile(r"^\S+ \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} ")


def last_line(lines):
    """The log line's message, without the `NAME date` prefix."""
    return LOG_PREFIX.sub("", lines[-1], count=1)


def test_wrong_database_name(master, slave):
    rc, lines = run_once(master.cluster.dsn("no_such_db"), slave.dsn)
    assert rc == 1
    assert "cannot connect to the master (" in lines[-1]
    assert 'database "no_such_db" does not exist' in lines[-1]


def test_unreachable_slave(master):
    port = free_port()
    rc, lines = run_once(master.dsn, f"host=127.0.0.1 port={port} dbname=x user=postgres")
    assert rc == 1
    assert f"cannot connect to the slave (host=127.0.0.1 port={port} dbname=x user=postgres): " in lines[-1]
    assert "Connection refused" in lines[-1]


def test_wrong_password_is_not_printed(master, slave):
    master.execute("DROP ROLE IF EXISTS pyreplica_pw; CREATE ROLE pyreplica_pw LOGIN SUPERUSER PASSWORD 'right'")
    try:
        rc, lines = run_once(master.dsn + " user=pyreplica_pw password=wrong", slave.dsn)
    finally:
        master.execute("DROP ROLE pyreplica_pw")
    assert rc == 1
    assert "password=***" in lines[-1] and "wrong" not in lines[-1].replace("password=***", "")
    assert 'password authentication failed for user "pyreplica_pw"' in lines[-1]


def test_malformed_dsn(slave):
    rc, lines = run_once("dbname=x hostt=y", slave.dsn)
    assert rc == 1
    assert last_line(lines) == ("bad master connection string 'dbname=x hostt=y': "
                                'invalid dsn: invalid connection option "hostt"')


def test_master_without_master_install(bare_master, slave):
    rc, lines = run_once(bare_master.dsn, slave.dsn)
    assert rc == 1
    assert last_line(lines) == (f"master: the master database {bare_master.name} has no pyreplica log: run "
                                f"`psql {bare_master.name} -f master-install.sql` on it as a superuser")


def test_a_database_error_nothing_foresaw_is_one_line_and_exit_1(master, slave):
    # a damaged install (a function dropped by hand): no traceback, the server's message and SQLSTATE
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY)", ["t"])
    master.execute("DROP FUNCTION pyreplica.captured_tables()")
    rc, out, err = run_cli("clone", master.dsn, slave.dsn, "--name", "damaged")
    assert "Traceback" not in out + err, err
    assert (rc, err.splitlines()) == (1, [
        "pyreplica: clone stopped by a database error: function pyreplica.captured_tables() does not exist "
        "(SQLSTATE 42883)"])


def test_slave_missing_a_table(master, slave):
    master.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT py_log_create_tg('t')")
    rc, lines = run_once(master.dsn, slave.dsn)
    assert rc == 1
    assert last_line(lines) == ("slave: the slave has no table public.t, which the master replicates: create it "
                                "on the slave (pg_dump -s -t 'public.t' master | psql slave) or use pyreplica clone")


def test_slave_missing_a_column(master, slave):
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY)", ["t"])
    master.execute("ALTER TABLE t ADD COLUMN extra text")
    rc, lines = run_once(master.dsn, slave.dsn)
    assert rc == 1
    assert last_line(lines) == ("slave: the slave's table public.t lacks column(s) extra that the master has: "
                                "ALTER TABLE it on the slave to match the master")


def test_max_prepared_transactions_zero_is_refused(master):
    cluster = start_cluster("no2pc", max_prepared_transactions="0")
    try:
        rc, lines = run_once(master.dsn, cluster.dsn())
    finally:
        cluster.destroy()
    assert rc == 1
    assert last_line(lines) == ("slave: the slave has max_prepared_transactions = 0: pyreplica needs two-phase "
                                "commit; set max_prepared_transactions = 10 (at least the number of pyreplica "
                                "workers using it, or max_connections) in its postgresql.conf and restart it")


@pytest.mark.parametrize("args, message", [
    (["run"], "pyreplica: <command line>: missing DSN0 (the master's connection string) in [MAIN] and in the environment"),
    (["run", "dbname=a", "dbname=b", "--name", "bad name"],
     "pyreplica: slave name 'bad name' is not allowed: use 1-63 letters, digits, '_', '.' or '-' (--name)"),
])
def test_usage_errors_exit_2(args, message):
    rc, out, err = run_cli(*args, env={"DSN0": "", "DSN1": ""})
    assert (rc, err.strip()) == (2, message)


def test_unknown_command_exits_2():
    rc, out, err = run_cli("replicate")
    assert rc == 2 and "invalid choice: 'replicate'" in err


def test_a_second_daemon_for_the_same_slave_is_refused(master, slave):
    from replication import Daemon
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY)", ["t"])
    with Daemon(master, slave, name="e1") as first:
        first.wait_for_output("Waiting for 'NOTIFY'")
        rc, lines = run_once(master.dsn, slave.dsn)
    assert rc == 1
    assert last_line(lines) == ("slave: another pyreplica is already replicating into this slave as e1: "
                                "stop it first (one daemon per slave)")


def test_slave_dropped_on_the_master_while_running_stops_without_leaving_a_prepared_transaction(master, slave):
    from replication import Daemon, prepared_count, wait_identical
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY)", ["t"])
    with Daemon(master, slave, name="e1") as daemon:
        master.execute("INSERT INTO t VALUES (1)")
        wait_identical(master, slave, ["t"])
        master.execute("SELECT pyreplica.drop_slave('e1')")
        master.execute("INSERT INTO t VALUES (2)")
        assert daemon.proc.wait(30) == 1
        assert 'slave "e1" is not registered on this master (dropped with drop-slave?)' in daemon.output
    assert prepared_count(master) == prepared_count(slave) == 0
    assert slave.execute("SELECT id FROM t") == [(1,)]
