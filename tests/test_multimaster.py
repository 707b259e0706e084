"""Lazy multi-master (seeds' install guide, docs/design.md §6): two databases, each master and slave of the other.

Applications write as `postgres` on either side; the two daemons (A -> B and B -> A) connect as the
replication role `repl` with SKIP_USER = repl. Every change reaches the other side exactly once and
nothing ping-pongs: each side's log holds only what was written there.
"""
import time

import pytest

from replication import Daemon, applied_on_slave, prepared_count, wait_identical

DDL = "CREATE TABLE t (id int PRIMARY KEY, v text, origin text)"
REPLICATION_ROLE = """
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'repl') THEN
        CREATE ROLE repl SUPERUSER LOGIN;
    END IF;
END $$
"""


class As:
    """A database as the replication role sees it (what the Daemon helper needs: a dsn)."""

    def __init__(self, db, user):
        self.dsn = db.cluster.dsn(db.name, user=user)


@pytest.fixture
def pair(master, slave):
    """Databases A and B (on two clusters), both installed as masters, t captured on both."""
    a, b = master, slave
    b.install_master()
    for db in (a, b):
        db.execute(REPLICATION_ROLE)
        db.execute(DDL)
        assert db.scalar("SELECT py_log_create_tg('t')").startswith("created trigger")
    return a, b


def daemons(a, b, skip_user="repl"):
    extra = ["--skip-user", skip_user] if skip_user else []
    return (Daemon(As(a, "repl"), As(b, "repl"), *extra, name="b", keepalive=1),
            Daemon(As(b, "repl"), As(a, "repl"), *extra, name="a", keepalive=1))


def logged_ever(db):
    """Events ever logged here (the sequence is not reset by pruning of the log)."""
    return db.scalar("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM pyreplica.replica_log_id_seq")


def write_both_sides(a, b, timeout=60):
    """22 changes originate on each side: 20 inserts (odd ids on A, even on B), then one update
    and one delete of a row that came from the other side."""
    for i in range(10):
        a.execute("INSERT INTO t VALUES (%s, 'a', 'A'), (%s, 'a', 'A')", (4 * i + 1, 4 * i + 3))
        b.execute("INSERT INTO t VALUES (%s, 'b', 'B'), (%s, 'b', 'B')", (4 * i + 2, 4 * i + 4))
    wait_identical(a, b, ["t"], timeout)
    a.execute("UPDATE t SET v = 'changed on A' WHERE id = 2")
    b.execute("UPDATE t SET v = 'changed on B' WHERE id = 1")
    a.execute("DELETE FROM t WHERE id = 4")
    b.execute("DELETE FROM t WHERE id = 3")
    wait_identical(a, b, ["t"])


def assert_exactly_once(a, b, a_to_b, b_to_a):
    time.sleep(2.5)     # two more keepalive rounds: a ping-pong would show by now
    assert a.execute("SELECT count(*) FROM t") == [(38,)]
    assert a.execute("SELECT id, v FROM t WHERE id IN (1, 2) ORDER BY id") == [(1, "changed on B"), (2, "changed on A")]
    wait_identical(a, b, ["t"], timeout=1)
    assert applied_on_slave(b, "b") == 22, a_to_b.output       # A's 22 changes, applied on B once
    assert applied_on_slave(a, "a") == 22, b_to_a.output
    assert a.scalar("SELECT applied FROM pyreplica.replica_slaves WHERE name = 'b'") == 22
    assert b.scalar("SELECT applied FROM pyreplica.replica_slaves WHERE name = 'a'") == 22
    for daemon in (a_to_b, b_to_a):
        assert daemon.stop() == 0
        assert "conflict" not in daemon.output and "error" not in daemon.output.lower(), daemon.output
    assert prepared_count(a) == prepared_count(b) == 0


def test_changes_on_either_side_reach_the_other_exactly_once(pair):
    a, b = pair
    a_to_b, b_to_a = daemons(a, b)
    with a_to_b, b_to_a:
        write_both_sides(a, b)
        assert_exactly_once(a, b, a_to_b, b_to_a)
    # replayed rows are not captured (the daemons apply as replica role): each log is local only
    for db in (a, b):
        assert logged_ever(db) == 22
        assert db.execute("SELECT DISTINCT username::text FROM replica_log") in ([("postgres",)], [])


def always_capture(db):
    """Capture replayed rows too, as a cascading setup does (docs/design.md §6): only SKIP_USER prevents loops."""
    for (name,) in db.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 't'::regclass "
                              "AND pyreplica.py_log_is_capture_fn(tgfoid)"):
        db.execute(f'ALTER TABLE t ENABLE ALWAYS TRIGGER "{name}"')


def test_skip_user_alone_prevents_ping_pong_when_replayed_rows_are_captured(pair):
    a, b = pair
    for db in pair:
        always_capture(db)
    a_to_b, b_to_a = daemons(a, b)
    with a_to_b, b_to_a:
        write_both_sides(a, b, timeout=15)
        assert_exactly_once(a, b, a_to_b, b_to_a)
    # each log now also holds what was replayed into it, written by repl, which the daemons skip
    for db in (a, b):
        assert logged_ever(db) == 44
        assert db.scalar("SELECT count(*) FROM replica_log WHERE username <> 'repl'") <= 22


def test_without_skip_user_captured_replays_would_ping_pong(pair):
    """The control for the test above: the same setup without SKIP_USER sends A's row back to A."""
    a, b = pair
    for db in pair:
        always_capture(db)
    a_to_b, b_to_a = daemons(a, b, skip_user=None)
    with a_to_b, b_to_a:
        a.execute("INSERT INTO t VALUES (1, 'a', 'A')")
        b_to_a.wait_for_output("duplicate key value", timeout=15)
    assert a.execute("SELECT count(*) FROM t") == [(1,)]
