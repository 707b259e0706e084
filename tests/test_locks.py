"""Locks and prepared transactions that others hold (issue 11 items 10, 11; issue 9 item 9).

Several daemons pruning one master never deadlock; a daemon dead with a batch prepared on the
master stops neither writers nor a re-install nor drop-slave for long, and `status` alerts; another
role's prepared transactions (a guessed gid, a full max_prepared_transactions) never stop a daemon.
"""
import threading
import time

import psycopg2
import pytest
from psycopg2 import sql

import pyreplica

from replication import Daemon, prepared_count, run_cli, wait_identical, wait_until

TABLE = "CREATE TABLE t (id serial PRIMARY KEY, v text)"


def setup_tables(master, *slaves):
    master.execute(TABLE)
    assert master.scalar("SELECT py_log_create_tg('t')").startswith("created trigger")
    for slave in slaves:
        slave.execute(TABLE)


class Loop(threading.Thread):
    """Runs `statement` on its own connection to `db` in a loop until stopped; counts and keeps errors."""

    def __init__(self, db, statement, pause=0.01):
        super().__init__(daemon=True)
        self.db, self.statement, self.pause = db, statement, pause
        self.stopping, self.done, self.errors = threading.Event(), 0, []

    def run(self):
        conn = self.db.connect()
        try:
            with conn.cursor() as cur:
                while not self.stopping.wait(self.pause):
                    try:
                        cur.execute(self.statement)
                        self.done += 1
                    except psycopg2.Error as e:
                        self.errors.append(str(e).strip())
        finally:
            conn.close()

    def stop(self):
        self.stopping.set()
        self.join(10)
        return self


def assert_clean(*daemons):
    for daemon in daemons:
        output = daemon.final_output
        assert "Traceback" not in output and "deadlock" not in output, output
        assert daemon.proc.returncode == 0, output


# -- issue 11 item 10 ---------------------------------------------------------------------------------
def test_daemons_and_prunes_of_several_slaves_never_deadlock(master, slave, slave2, slave3):
    slaves = (slave, slave2, slave3)
    setup_tables(master, *slaves)
    daemons = [Daemon(master, s, name=f"p{i}", keepalive=1).start() for i, s in enumerate(slaves)]
    try:
        for daemon in daemons:
            daemon.wait_for_output("Waiting for 'NOTIFY'")
        writers = [Loop(master, "INSERT INTO t (v) SELECT 'w' FROM generate_series(1, 20)") for _ in range(2)]
        pruners = [Loop(master, "SELECT pyreplica.prune()", pause=0.005) for _ in range(3)]
        for thread in writers + pruners:
            thread.start()
        time.sleep(15)
        for thread in writers + pruners:
            thread.stop()
        for thread in writers + pruners:
            assert thread.errors == [], thread.errors[:3]
        assert sum(p.done for p in pruners) > 100 and sum(w.done for w in writers) > 50
        for s in slaves:
            wait_identical(master, s, ["t"], timeout=40)
        assert_log_empties(master, slaves)
        for daemon in daemons:
            assert daemon.proc.poll() is None, daemon.output
            assert daemon.stop() == 0
    finally:
        for daemon in daemons:
            daemon.__exit__()
    assert_clean(*daemons)


def assert_log_empties(master, slaves, attempts=5):
    """Every slave has applied everything: prune() empties the log.

    A slave's horizon is its position's xmin, which another daemon's transaction in flight when that
    position's snapshot was taken (a confirm, a keepalive) holds back: prune() then keeps the last
    events until that slave's next batch. And a daemon reading the log makes prune()'s NOWAIT lock
    give way. Both are correct, so: one more write, applied everywhere, then prune, a few times."""
    for _ in range(attempts):
        master.execute("INSERT INTO t (v) VALUES ('last')")
        for s in slaves:
            wait_identical(master, s, ["t"], timeout=40)
        master.execute("SELECT pyreplica.prune()")
        if master.scalar("SELECT count(*) FROM replica_log") == 0:
            return
    assert master.scalar("SELECT count(*) FROM replica_log") == 0


def test_a_pruning_error_is_logged_and_retried_and_replication_goes_on(master, slave):
    setup_tables(master, slave)
    # a prune that fails, as a deadlock or a lock timeout would
    master.execute("""
        ALTER FUNCTION pyreplica.prune() RENAME TO prune_saved;
        CREATE FUNCTION pyreplica.prune() RETURNS bigint LANGUAGE plpgsql AS
            $$BEGIN RAISE EXCEPTION 'pruning broken by the test'; END$$;""")
    with Daemon(master, slave, name="e1", keepalive=1) as daemon:
        daemon.wait_for_output("Pruning the master's log failed (tried again in 10 s): "
                               "ERROR:  pruning broken by the test")
        master.execute("INSERT INTO t (v) VALUES ('still replicated')")
        wait_identical(master, slave, ["t"])
        master.execute("""
            DROP FUNCTION pyreplica.prune();
            ALTER FUNCTION pyreplica.prune_saved() RENAME TO prune;""")
        wait_until(lambda: master.scalar("SELECT count(*) FROM replica_log") == 0, 30, message="a later prune")
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.final_output, daemon.final_output


# -- issue 11 item 11 ---------------------------------------------------------------------------------
def crash_with_a_batch_prepared_on_the_master(master, slave, name="s1"):
    setup_tables(master, slave)
    master.execute("INSERT INTO t (v) SELECT 'v' FROM generate_series(1, 20)")
    crashing = Daemon(master, slave, name=name, fault="after_master_prepare").start()
    try:
        assert crashing.proc.wait(30) == -9, crashing.output
    finally:
        crashing.__exit__()
    assert prepared_count(master) == prepared_count(slave) == 1


def test_an_in_doubt_batch_stops_neither_writers_nor_reinstall_nor_drop_slave_for_long(master, slave):
    crash_with_a_batch_prepared_on_the_master(master, slave)
    writer = Loop(master, "INSERT INTO t (v) VALUES ('w')")
    writer.start()
    try:
        time.sleep(0.5)
        before, started = writer.done, time.monotonic()
        done = master.psql("-f", pyreplica.MASTER_INSTALL_SQL, check=False)
        rc, err = done.returncode, done.stderr
        took = time.monotonic() - started
        time.sleep(0.5)
        during = writer.done - before
    finally:
        writer.stop()
    assert writer.errors == []
    assert rc != 0 and took < 5, (rc, took, err)
    problem = [line for line in err.splitlines() if "ERROR" in line]
    assert len(problem) == 1, err
    assert "pyreplica: a batch is prepared (in doubt) on this master since" in problem[0], err
    assert "settle it first with `pyreplica recover MASTER SLAVE --name s1` or by starting its daemon" in problem[0], err
    assert during > 10, "writers stopped while master-install.sql ran"

    started = time.monotonic()
    rc, out, err = run_cli("drop-slave", "s1", master.dsn, timeout=30)
    assert time.monotonic() - started < 10
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, err
    assert "slave s1's registration is locked by one of its batches prepared (in doubt) on the master: settle " \
           "it first (pyreplica recover MASTER SLAVE --name s1, or start its daemon)" in lines[0], err


def test_status_alerts_on_a_batch_in_doubt_too_long(master, slave):
    crash_with_a_batch_prepared_on_the_master(master, slave)
    rc, out, err = run_cli("status", master.dsn, slave.dsn)
    assert rc == 0, out + err       # in doubt for a few seconds: normal mid-batch, no alert yet
    assert "ALERT" not in out
    time.sleep(2)
    rc, out, err = run_cli("status", master.dsn, slave.dsn, env={"PYREPLICA_TEST_IN_DOUBT_ALERT": "1"})
    assert rc == 3, out + err
    alerts = [line for line in out.splitlines() if line.startswith("ALERT: ")]
    assert len(alerts) == 2, out      # the batch is prepared on both sides
    assert all("holds back VACUUM of the whole" in a and "start the daemon for slave s1 or run "
               "`pyreplica recover MASTER SLAVE --name s1`" in a for a in alerts), out


# -- issue 9 item 9 -----------------------------------------------------------------------------------
@pytest.fixture
def intruder(master, slave):
    """A login role that is not pyreplica's, on both clusters."""
    name = f"intruder_{master.name}"
    for db in (master, slave):
        db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    yield name
    for db in (master, slave):
        for (gid,) in db.execute("SELECT gid FROM pg_prepared_xacts WHERE owner = %s", (name,)):
            db.execute("ROLLBACK PREPARED %s", (gid,))
        db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def prepare_as(db, role, gid):
    conn = db.connect(autocommit=False, user=role)
    try:
        with conn.cursor() as cur:
            cur.execute("PREPARE TRANSACTION %s", (gid,))
        conn.commit()
    finally:
        conn.close()


def test_another_role_preparing_the_daemons_next_gids_cannot_stop_it(master, slave, intruder):
    from pyreplica.twophase import identity_token
    setup_tables(master, slave)
    identity = slave.execute("SELECT system_identifier::text, current_database()::text FROM pg_control_system()")[0]
    token = identity_token(identity)
    with Daemon(master, slave, name="s1") as daemon:
        master.execute("INSERT INTO t (v) VALUES ('first')")
        wait_identical(master, slave, ["t"])
        batch = slave.scalar("SELECT batch_id FROM pyreplica.position WHERE slave = 's1'")
        # every part of the next gids an attacker can know, for the next batches, on both sides
        for n in range(batch + 1, batch + 4):
            for side, db in (("master", master), ("slave", slave)):
                prepare_as(db, intruder, f"pyreplica:s1:{n}:{side}:{token}:00000000")
        for i in range(5):
            master.execute("INSERT INTO t (v) VALUES ('next')")
            wait_identical(master, slave, ["t"])
        assert daemon.stop() == 0
    # and at a restart the intruder's transactions are not taken for in-doubt batches
    master.execute("INSERT INTO t (v) VALUES ('after restart')")
    with Daemon(master, slave, name="s1") as restarted:
        wait_identical(master, slave, ["t"])
        assert restarted.stop() == 0
    for daemon_ in (daemon, restarted):
        assert "Traceback" not in daemon_.final_output and "Recovering" not in daemon_.final_output, \
            daemon_.final_output
    for db in (master, slave):
        assert db.scalar("SELECT count(*) FROM pg_prepared_xacts WHERE owner = %s", (intruder,)) == 3


@pytest.mark.parametrize("full", ["slave", "master"])
def test_a_full_max_prepared_transactions_is_one_line_and_a_retry(master, slave, full):
    setup_tables(master, slave)
    crowded = master if full == "master" else slave
    room = crowded.scalar("SELECT current_setting('max_prepared_transactions')::int - "
                          "(SELECT count(*) FROM pg_prepared_xacts)")
    with Daemon(master, slave, name="s1") as daemon:
        master.execute("INSERT INTO t (v) VALUES ('first')")
        wait_identical(master, slave, ["t"])
        fillers = [f"filler-{crowded.name}-{i}" for i in range(room)]
        try:
            for gid in fillers:
                conn = crowded.connect(autocommit=False)
                conn.cursor().execute("PREPARE TRANSACTION %s", (gid,))
                conn.commit()
                conn.close()
            mark = len(daemon.output)
            master.execute("INSERT INTO t (v) VALUES ('waits for a slot')")
            line = (f"{full}: PREPARE TRANSACTION refused on the {full}: max_prepared_transactions is full on "
                    f"that server; the batch is retried")
            daemon.wait_for_output(line)
            time.sleep(4)       # retried meanwhile: still one line
            assert daemon.output[mark:].count("max_prepared_transactions is full") == 1, daemon.output[mark:]
            assert daemon.proc.poll() is None, daemon.output
        finally:
            for gid in fillers:
                crowded.execute("ROLLBACK PREPARED %s", (gid,))
        wait_identical(master, slave, ["t"], timeout=30)
        daemon.wait_for_output("Replication resumed")
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.final_output, daemon.final_output
    assert prepared_count(master) == prepared_count(slave) == 0
