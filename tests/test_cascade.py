"""Cascades with one setting (docs/design.md §12): A -> B -> C, B's capture triggers ENABLE ALWAYS by
`pyreplica.set_option('cascade', 'on')`, so the rows B's daemon replays are captured again for C."""
import threading

import psycopg2
import pytest

from replication import Daemon, wait_identical, wait_until

DDL = "CREATE TABLE t (id int PRIMARY KEY, v text)"
OWN = "CREATE TABLE b_own (id serial PRIMARY KEY, v text)"


def trigger_modes(db, table):
    return sorted(r[0] for r in db.execute(
        "SELECT tgenabled FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname LIKE '%%replica_tg%%'", (table,)))


@pytest.fixture
def chain(master, slave, slave2):
    a, b, c = master, slave, slave2
    b.install_master()
    for db in (a, b, c):
        db.execute(DDL)
    for db in (b, c):
        db.execute(OWN)
    assert a.scalar("SELECT py_log_create_tg('t')").startswith("created trigger")
    assert b.scalar("SELECT py_log_create_tg('t')").startswith("created trigger")
    assert trigger_modes(b, "t") == ["O"] * 4
    assert b.scalar("SELECT pyreplica.set_option('cascade', 'on')") == (
        "cascade = on (capture triggers of 1 table(s) capture replayed rows too: ENABLE ALWAYS)")
    assert trigger_modes(b, "t") == ["A"] * 4
    # a table captured after the setting, and a trigger re-created by ALTER TABLE, follow it
    assert b.scalar("SELECT py_log_create_tg('b_own')").startswith("created trigger")
    b.execute("ALTER TABLE b_own ADD COLUMN note text")
    c.execute("ALTER TABLE b_own ADD COLUMN note text")
    assert trigger_modes(b, "b_own") == ["A"] * 4
    return a, b, c


def test_chain_a_b_c_with_restarts_of_b_and_b_own_writes(chain):
    a, b, c = chain
    stop, written = threading.Event(), [0]

    def write_on_a():
        conn = a.connect()
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    written[0] += 1
                    cur.execute("INSERT INTO t VALUES (%s, 'a')", (written[0],))
                    if written[0] % 4 == 0:
                        cur.execute("UPDATE t SET v = 'updated' WHERE id = %s", (written[0] - 2,))
        finally:
            conn.close()

    writer = threading.Thread(target=write_on_a)
    b_to_c = Daemon(b, c, name="c", keepalive=1).start()
    try:
        writer.start()
        for round_ in range(3):                      # kill -9 A -> B's daemon mid-stream, three times
            with Daemon(a, b, name="b", keepalive=1) as a_to_b:
                wait_until(lambda: b.scalar("SELECT count(*) FROM t") > 50 * (round_ + 1), message="A -> B")
                b.execute("INSERT INTO b_own (v) VALUES ('b''s own write')")
                a_to_b.kill()
        stop.set()
        writer.join()
        with Daemon(a, b, name="b", keepalive=1):
            wait_identical(a, b, ["t"])
            wait_identical(b, c, ["t", "b_own"])
        assert c.scalar("SELECT count(*) FROM t") == written[0]
        assert c.scalar("SELECT count(*) FROM b_own") == 3
    finally:
        stop.set()
        b_to_c.stop()


def test_cascade_off_again_and_bad_values(chain):
    _, b, _ = chain
    assert b.scalar("SELECT pyreplica.set_option('cascade', 'off')").startswith("cascade = off (capture triggers of 2")
    assert trigger_modes(b, "t") == ["O"] * 4
    with pytest.raises(psycopg2.Error, match="pyreplica: setting cascade must be on or off, not \"maybe\""):
        b.execute("SELECT pyreplica.set_option('cascade', 'maybe')")
    with pytest.raises(psycopg2.Error, match="pyreplica: unknown setting \"cascades\""):
        b.execute("SELECT pyreplica.set_option('cascades', 'on')")
