"""Filters, transforms and per-slave TABLES (docs/design.md §7), with the daemon as a real process.

The filter module is written to a temporary directory put on the daemon's PYTHONPATH, as an
administrator would put theirs next to the config.
"""
import json
import os
import textwrap
import time

import pytest

from replication import Daemon, create_on_both, prepared_count, run_cli, wait_identical, wait_until

FILTER_MODULE = '''
"""Filters for the tests: each sees an event (id, txid, relname, op, sql, username)."""
import os
import re

EMAIL = re.compile(r"'[^'@]*@[^']*'")


def keep_history(event):
    """The slave keeps the rows the master deletes from public.t."""
    if event.relname == "public.t" and event.op == "D":
        return None
    return event


def mask_emails(event):
    """No e-mail address reaches the slave: the statement is rewritten."""
    if event.relname == "public.person":
        return EMAIL.sub("'hidden'", event.sql)
    return event


def flaky(event):
    """Broken while the flag file exists."""
    if os.path.exists(os.environ["FILTER_FLAG"]):
        raise RuntimeError(f"filter is broken (event on {event.relname})")
    return event
'''


@pytest.fixture
def filter_dir(tmp_path):
    (tmp_path / "test_pyreplica_filters.py").write_text(FILTER_MODULE)
    return tmp_path


def write_conf(path, master, slave, **main):
    lines = ["[MAIN]", f"DSN0 = {master.dsn}", f"DSN1 = {slave.dsn}", "SLAVE_FIELD = s1", "KEEPALIVE = 2",
             "RETRY_MAX = 1"] + [f"{key} = {value}" for key, value in main.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def daemon_with_conf(master, slave, conf, filter_dir, **env):
    daemon = Daemon(master, slave, env={"PYTHONPATH": str(filter_dir), **env})
    daemon.args = ["-c", conf]
    return daemon


def test_filters_drop_and_rewrite_events(master, slave, filter_dir):
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, v text); "
                                  "CREATE TABLE person (id int PRIMARY KEY, email text, note text)", ["t", "person"])
    conf = write_conf(filter_dir / "s1.conf", master, slave,
                      FILTERS="test_pyreplica_filters:keep_history, test_pyreplica_filters:mask_emails")
    master.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10) g; "
                   "INSERT INTO person VALUES (1, 'ann@example.com', 'first'), (2, NULL, 'no mail')")
    with daemon_with_conf(master, slave, conf, filter_dir) as daemon:
        master.execute("DELETE FROM t WHERE id > 5; UPDATE t SET v = 'changed' WHERE id = 1; "
                       "UPDATE person SET email = 'bob@example.org', note = 'moved' WHERE id = 2")
        master.execute("INSERT INTO t VALUES (11, 'last')")
        wait_until(lambda: slave.execute("SELECT count(*) FROM t WHERE id = 11") == [(1,)],
                   message="the last insert on the slave:\n" + daemon.output)
        assert daemon.stop() == 0
    # deletes dropped: the slave keeps the history, everything else arrived
    assert slave.execute("SELECT id, v FROM t ORDER BY id") == \
        [(1, "changed")] + [(i, f"v{i}") for i in range(2, 11)] + [(11, "last")]
    # statements rewritten: no address on the slave, the other columns intact
    assert slave.execute("SELECT id, email, note FROM person ORDER BY id") == \
        [(1, "hidden", "first"), (2, "hidden", "moved")]
    assert master.scalar("SELECT count(*) FROM person WHERE email LIKE '%%@%%'") == 2


def test_tables_restrict_a_slave_to_a_subset(master, slave, filter_dir):
    ddl = "CREATE TABLE {} (id int PRIMARY KEY, v text)"
    for table in ("a1", "a2", "b1"):
        master.execute(ddl.format(table))
        assert master.scalar("SELECT py_log_create_tg(%s)", (table,)).startswith("created trigger")
    for table in ("a1", "a2"):      # the slave need not even have the tables it does not take
        slave.execute(ddl.format(table))
    conf = write_conf(filter_dir / "s1.conf", master, slave, TABLES="public.a*")
    with daemon_with_conf(master, slave, conf, filter_dir) as daemon:
        for _ in range(3):
            master.execute("INSERT INTO a1 SELECT coalesce(max(id), 0) + 1, 'x' FROM a1; "
                           "INSERT INTO b1 SELECT coalesce(max(id), 0) + 1, 'not for this slave' FROM b1; "
                           "INSERT INTO a2 SELECT coalesce(max(id), 0) + 1, 'y' FROM a2")
        master.execute("UPDATE a2 SET v = 'z'; DELETE FROM b1 WHERE id = 1")
        wait_identical(master, slave, ["a1", "a2"])
        assert daemon.stop() == 0, daemon.output
    assert slave.scalar("SELECT to_regclass('b1') IS NULL")
    assert slave.execute("SELECT id, v FROM a2 ORDER BY id") == [(1, "z"), (2, "z"), (3, "z")]
    # compare narrows to the same tables, and finds them identical
    code, out, err = run_cli("compare", "-c", conf, "--json")
    assert code == 0, err
    assert [t["table"] for t in json.loads(out)["tables"]] == ["public.a1", "public.a2"]


def test_a_filter_that_raises_stops_replay_until_it_is_fixed(master, slave, filter_dir):
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, v text)", ["t"])
    flag = filter_dir / "broken"
    flag.write_text("")
    conf = write_conf(filter_dir / "s1.conf", master, slave, FILTERS="test_pyreplica_filters:flaky")
    with daemon_with_conf(master, slave, conf, filter_dir, FILTER_FLAG=str(flag)) as daemon:
        daemon.wait_for_output("Waiting for 'NOTIFY'")
        position = slave.execute("SELECT snapshot::text, batch_id FROM pyreplica.position")
        master.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
        event = master.scalar("SELECT min(id) FROM replica_log")
        daemon.wait_for_output(f"filter test_pyreplica_filters:flaky raised at event {event} (public.t)")
        time.sleep(3)       # several retries (RETRY_MAX = 1): still stopped there, still running
        assert daemon.proc.poll() is None
        assert "Traceback (most recent call last)" in daemon.output
        assert "RuntimeError: filter is broken (event on public.t)" in daemon.output
        assert daemon.output.count("raised at event") == 1, "logged once per outage"
        assert slave.execute("SELECT count(*) FROM t") == [(0,)]
        assert slave.execute("SELECT snapshot::text, batch_id FROM pyreplica.position") == position
        assert prepared_count(master) == prepared_count(slave) == 0
        os.unlink(flag)     # the administrator fixes the filter: replay resumes where it stopped
        wait_identical(master, slave, ["t"])
        daemon.wait_for_output("Replication resumed")
        assert daemon.stop() == 0


@pytest.mark.parametrize("spec, message", [
    ("no_such_module:f", "cannot import module no_such_module"),
    ("test_pyreplica_filters:nothing", "test_pyreplica_filters has no nothing"),
    ("test_pyreplica_filters", "expected module:function"),
])
def test_a_filter_that_cannot_be_loaded_stops_the_start(master, slave, filter_dir, spec, message):
    conf = write_conf(filter_dir / "s1.conf", master, slave, FILTERS=spec)
    code, _, err = run_cli("run", "-c", conf, env={"PYTHONPATH": str(filter_dir)})
    assert code == 2
    assert message in err and "FILTERS" in err and "Traceback" not in err
    assert textwrap.dedent(err).count("\n") == 1
