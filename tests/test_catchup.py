"""Bounded catch-up (docs/design.md §4): ticks, the snapshot containment they are chosen by, and a
daemon killed during a catch-up that still converges in committed steps, on real clusters."""
import random
import threading
import time

import pytest

from replication import conf_daemon, create_on_both, wait_identical, wait_until

COVERS = "SELECT pyreplica.snapshot_covers(%s::pg_snapshot, %s::pg_snapshot)"


def covers(db, later, earlier):
    return db.scalar(COVERS, (later, earlier))


def snapshot(db):
    return db.scalar("SELECT pg_current_snapshot()::text")


class Session:
    """One master connection with a transaction of its own (not autocommit)."""

    def __init__(self, db):
        self.conn = db.connect(autocommit=False)
        self.xid = None

    def run(self, sql, params=None):
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else None

    def write(self, sql="INSERT INTO u (v) VALUES (1)"):    # u: no capture trigger, so no tick
        self.run(sql)
        self.xid = int(self.run("SELECT pg_current_xact_id()::text")[0][0])
        return self.xid

    def tick(self):
        assert self.run("SELECT pyreplica.tick('0')")[0][0] is True

    def snapshot(self):
        return self.run("SELECT pg_current_snapshot()::text")[0][0]

    def commit(self):
        self.conn.commit()

    def rollback(self):
        self.conn.rollback()

    def close(self):
        self.conn.close()


@pytest.fixture
def table(master):
    master.execute("CREATE TABLE t (id serial PRIMARY KEY, v int); CREATE TABLE u (id serial PRIMARY KEY, v int)")
    assert master.scalar("SELECT py_log_create_tg('t')") == "created trigger on t (id)"
    return master


@pytest.fixture
def sessions(table):
    opened = []

    def open_session():
        opened.append(Session(table))
        return opened[-1]
    yield open_session
    for s in opened:
        s.close()


def visible(db, xid, snap):
    return db.scalar("SELECT pg_visible_in_snapshot(%s::text::xid8, %s::pg_snapshot)", (str(xid), snap))


def ticks(db):
    return [r[0] for r in db.execute("SELECT snapshot::text FROM pyreplica.ticks ORDER BY snapshot_xmax, last_id")]


# -- snapshot containment ----------------------------------------------------------------------
def test_covers_follows_time_and_not_back(table, sessions):
    before = snapshot(table)
    table.execute("INSERT INTO t (v) VALUES (1)")
    after = snapshot(table)
    assert covers(table, after, before) and covers(table, before, before)
    assert not covers(table, before, after)


def test_covers_with_a_long_running_open_transaction(table, sessions):
    long = sessions()
    long.write()                               # open for the whole test, holding xmin back
    s1 = snapshot(table)
    table.execute("INSERT INTO t (v) VALUES (2)")
    s2 = snapshot(table)
    assert covers(table, s2, s1) and not covers(table, s1, s2)
    long.commit()
    s3 = snapshot(table)
    assert covers(table, s3, s1) and covers(table, s3, s2) and not covers(table, s2, s3)


def test_covers_sees_a_commit_inside_the_running_list(table, sessions):
    # Same xmin and xmax, different running lists: only the running list tells them apart.
    a, b = sessions(), sessions()
    a.write()
    b.write()
    table.execute("INSERT INTO t (v) VALUES (3)")   # a later xid completes: a and b are below xmax
    s1 = snapshot(table)
    b.commit()
    s2 = snapshot(table)
    xmin_xmax = "SELECT pg_snapshot_xmin(%s::pg_snapshot) = pg_snapshot_xmin(%s::pg_snapshot) " \
                "AND pg_snapshot_xmax(%s::pg_snapshot) = pg_snapshot_xmax(%s::pg_snapshot)"
    assert table.scalar(xmin_xmax, (s1, s2, s1, s2))
    assert covers(table, s2, s1)
    assert not covers(table, s1, s2)           # b is visible in s2, running in s1
    a.commit()


def test_covers_ignores_rolled_back_transactions(table, sessions):
    s1 = snapshot(table)
    gone = sessions()
    gone.write()
    gone.rollback()
    s2 = snapshot(table)
    assert covers(table, s2, s1) and not covers(table, s1, s2)
    assert table.scalar("SELECT count(*) FROM pyreplica.unapplied(%s::pg_snapshot)", (s1,)) == 0


def test_covers_a_registration_style_snapshot(table):
    # log_start's synthetic snapshot "m:m:" is contained only in snapshots whose xmin reached m
    table.execute("INSERT INTO t (v) VALUES (4)")
    start = table.scalar("SELECT pyreplica.log_start()::text")
    assert covers(table, snapshot(table), start)
    assert not covers(table, "3:3:", start)


# -- ticks -------------------------------------------------------------------------------------
def test_a_tick_inside_a_writing_transaction_leaves_that_transaction_running(table, sessions):
    writer, other = sessions(), sessions()
    mine = writer.write()
    other.write()
    other.commit()                             # a later xid completes: mine is below xmax
    writer.write("INSERT INTO t (v) VALUES (1)")   # the capture trigger ticks
    writer.commit()
    (tick,) = ticks(table)
    assert not visible(table, mine, tick)      # without the fix: visible before `other`, wrong
    assert visible(table, other.xid, tick)


def test_ticks_of_concurrent_sessions_are_cuts_in_commit_order(table, sessions):
    """Several sessions write, tick, commit and roll back interleaved, one transaction stays open
    across most of it: every tick sees exactly the transactions committed before it was taken."""
    rng = random.Random(11)
    long = sessions()
    long.write()
    pool = [sessions() for _ in range(5)]
    committed = []                                   # xids in commit order
    pending = {s: [] for s in pool}                  # ticks of open transactions: what had committed
    recorded = []                                    # the same, for ticks whose transaction committed
    for step in range(300):
        s = rng.choice(pool)
        if s.xid is None:
            s.write()
            continue
        action = rng.random()
        if action < 0.4:
            s.tick()
            pending[s].append(tuple(committed))
        elif action < 0.85:
            s.commit()
            committed.append(s.xid)
            recorded += pending[s]
        else:
            s.rollback()
        if action >= 0.4:
            pending[s], s.xid = [], None
        if step == 250:
            long.commit()
            committed.append(long.xid)
    for s in pool:
        if s.xid is not None:
            s.commit()
            committed.append(s.xid)
            recorded += pending[s]
    # what each tick sees of the committed transactions, in commit order
    rows = table.execute("""SELECT t.snapshot::text,
                                   array(SELECT x FROM unnest(%s::text[]) WITH ORDINALITY AS c(x, n)
                                          WHERE pg_visible_in_snapshot(x::xid8, t.snapshot) ORDER BY n)
                              FROM pyreplica.ticks t""", ([str(x) for x in committed],))
    assert len(rows) == len(recorded) > 30
    cuts = [tuple(int(x) for x in cut) for _, cut in rows]
    for (tick, _), cut in zip(rows, cuts):
        assert cut == tuple(committed[:len(cut)]), f"tick {tick} is not a prefix of the commit order"
    assert sorted(cuts) == sorted(recorded)
    # ticks are totally ordered by containment
    assert table.scalar("""SELECT count(*) FROM pyreplica.ticks a, pyreplica.ticks b
                            WHERE NOT pyreplica.snapshot_covers(a.snapshot, b.snapshot)
                              AND NOT pyreplica.snapshot_covers(b.snapshot, a.snapshot)""") == 0


def test_the_capture_trigger_ticks_at_most_once_a_second_and_a_rollback_leaves_none(table):
    conn = table.connect()
    try:
        with conn.cursor() as cur:
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                cur.execute("INSERT INTO t (v) VALUES (5)")
    finally:
        conn.close()
    assert 2 <= len(ticks(table)) <= 4
    table.execute("DELETE FROM pyreplica.ticks")
    conn = table.connect(autocommit=False)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t (v) VALUES (6)")
    conn.rollback()
    conn.close()
    assert ticks(table) == []


# -- the end of a batch ------------------------------------------------------------------------
def chain(db, start, max_events):
    """Step from `start` as the daemon does: [(end, events of the step)] until the current snapshot."""
    steps = []
    conn = db.connect(autocommit=False)
    try:
        while True:
            conn.set_session(isolation_level="REPEATABLE READ")
            with conn.cursor() as cur:
                cur.execute("SELECT c::text, pyreplica.batch_end(%s::pg_snapshot, c, %s)::text "
                            "FROM (SELECT pg_current_snapshot() AS c) n", (start, max_events))
                current, end = cur.fetchone()
                cur.execute("SELECT id FROM pyreplica.unapplied(%s::pg_snapshot) l "
                            "WHERE pg_visible_in_snapshot(l.txid, %s::pg_snapshot) ORDER BY id", (start, end))
                steps.append((end, [r[0] for r in cur.fetchall()]))
            conn.rollback()
            if end == current:
                return steps
            assert covers(db, end, start) and end != start
            start = end
    finally:
        conn.close()


def test_a_small_backlog_is_one_batch_to_the_current_snapshot(table):
    start = snapshot(table)
    table.execute("INSERT INTO t (v) SELECT g FROM generate_series(1, 100) g")
    table.execute("SELECT pyreplica.tick('0')")
    steps = chain(table, start, 100)
    assert len(steps) == 1 and len(steps[0][1]) == 100


def test_a_backlog_is_stepped_through_ticks_each_bounded_and_none_lost(table, sessions):
    start = snapshot(table)
    long = sessions()
    long.write("INSERT INTO t (v) SELECT g FROM generate_series(1, 50) g")   # commits near the end
    for i in range(40):
        table.execute("INSERT INTO t (v) SELECT g FROM generate_series(1, 100) g")
        table.execute("SELECT pyreplica.tick('0')")
        if i == 30:
            long.commit()
    gone = sessions()
    gone.write("INSERT INTO t (v) SELECT g FROM generate_series(1, 100) g")
    gone.rollback()
    steps = chain(table, start, 1000)
    ids = [i for _, events in steps for i in events]
    expected = [r[0] for r in table.execute("SELECT id FROM pyreplica.unapplied(%s::pg_snapshot) ORDER BY id",
                                            (start,))]
    assert sorted(ids) == expected and len(ids) == len(set(ids)) == 4050
    assert len(steps) >= 4
    assert all(len(events) <= 1000 + 100 + 50 for _, events in steps)   # bound + a tick's worth + the long one


def test_no_tick_contains_the_start_then_the_batch_goes_to_the_current_snapshot(table):
    table.execute("INSERT INTO t (v) SELECT g FROM generate_series(1, 300) g")
    table.execute("SELECT pyreplica.tick('0')")
    start = snapshot(table)                    # after every tick
    table.execute("INSERT INTO t (v) SELECT g FROM generate_series(1, 300) g")
    steps = chain(table, start, 10)
    assert len(steps) == 1 and len(steps[0][1]) == 300


def test_prune_removes_ticks_no_slave_can_step_to(table):
    table.execute("SELECT pyreplica.register_slave('s1'), pyreplica.register_slave('s2')")
    table.execute("INSERT INTO u (v) VALUES (1)")
    table.execute("SELECT pyreplica.tick('0')")
    table.execute("INSERT INTO u (v) VALUES (2)")
    between = snapshot(table)
    table.execute("INSERT INTO u (v) VALUES (3)")
    table.execute("SELECT pyreplica.tick('0')")
    first, second = ticks(table)
    table.execute("SELECT pyreplica.prune()")
    assert ticks(table) == [first, second]     # both slaves may still step to either
    table.execute("UPDATE pyreplica.replica_slaves SET confirmed = %s::pg_snapshot WHERE name = 's1'", (between,))
    table.execute("SELECT pyreplica.prune()")
    assert ticks(table) == [first, second]     # s2 still may
    table.execute("UPDATE pyreplica.replica_slaves SET confirmed = %s::pg_snapshot", (between,))
    table.execute("SELECT pyreplica.prune()")
    assert ticks(table) == [second]
    table.execute("UPDATE pyreplica.replica_slaves SET confirmed = pg_current_snapshot()")
    table.execute("SELECT pyreplica.prune()")
    assert ticks(table) == []


# -- a daemon catching up ----------------------------------------------------------------------
ACCOUNTS = 2000
BANK_DDL = f"""
    CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
    INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, {ACCOUNTS}) g;
"""
TRANSFER = """UPDATE accounts a SET balance = a.balance + d.delta
                FROM unnest(%s::int[], %s::bigint[]) AS d(id, delta) WHERE a.id = d.id"""


def transfers(master, events, writers=4, pairs=10):
    """Bank transfers while no daemon runs: `writers` sessions, each transaction moving money
    between `pairs` pairs of accounts (2 * pairs events); the sum of balances never changes."""
    per_writer = events // (2 * pairs) // writers

    def write(seed):
        rng = random.Random(seed)
        conn = master.connect(autocommit=False)
        with conn.cursor() as cur:
            cur.execute("SET synchronous_commit = off")
            for _ in range(per_writer):
                ids = rng.sample(range(3, ACCOUNTS + 1), 2 * pairs)    # 1 and 2: the long transfer's
                amounts = [rng.randint(1, 50) for _ in range(pairs)]
                # rows locked in id order: no deadlock between writers
                cur.execute("SELECT FROM accounts WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (ids,))
                cur.execute(TRANSFER, (ids, amounts + [-a for a in amounts]))
                conn.commit()
        conn.close()
    failed = []

    def writer(seed):
        try:
            write(seed)
        except Exception as e:   # noqa: BLE001 - reported by the test below
            failed.append(e)
    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failed, failed
    return per_writer * writers * 2 * pairs


class Checker(threading.Thread):
    """Reads the slave every 50 ms: the sum of balances and the number of accounts never change."""

    def __init__(self, slave):
        super().__init__(daemon=True)
        self.slave, self.stopping, self.samples, self.wrong = slave, threading.Event(), 0, []

    def run(self):
        conn = self.slave.connect()
        with conn.cursor() as cur:
            while not self.stopping.is_set():
                cur.execute("SELECT sum(balance), count(*) FROM accounts")
                seen = cur.fetchone()
                if seen != (ACCOUNTS * 1000, ACCOUNTS):
                    self.wrong.append(seen)
                self.samples += 1
                time.sleep(0.05)
        conn.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.join()


def position(slave):
    if slave.scalar("SELECT to_regclass('pyreplica.position')") is None:
        return 0, 0     # the daemon has not created it yet
    rows = slave.execute("SELECT batch_id, applied FROM pyreplica.position")
    return tuple(rows[0]) if rows else (0, 0)


def test_catch_up_killed_every_few_seconds_commits_steps_and_converges(master, slave, tmp_path):
    create_on_both(master, slave, BANK_DDL, ["accounts"])
    # a transfer that stays open while the backlog is written (accounts 1 and 2, which the other
    # writers leave alone), holding every tick's xmin back
    long = master.connect(autocommit=False)
    with long.cursor() as cur:
        cur.execute(TRANSFER, ([1, 2], [7, -7]))
    t0 = time.monotonic()
    logged = transfers(master, 150_000)
    print(f"\nbacklog of {logged} events written in {time.monotonic() - t0:.1f} s")
    long.commit()
    long.close()
    logged += 2
    assert master.scalar("SELECT count(*) FROM pyreplica.ticks") >= 5
    lives, progress = 0, []
    started = time.monotonic()
    with Checker(slave) as checker:
        while True:
            daemon = conf_daemon(master, slave, tmp_path, CATCHUP_EVENTS=15_000).start()
            time.sleep(2)
            daemon.kill()
            lives += 1
            progress.append(position(slave))
            if progress[-1][1] == logged or time.monotonic() - started > 50:
                break
    print(f"caught up in {time.monotonic() - started:.1f} s, {lives} lives: {progress}")
    assert progress[-1][1] == logged, f"not converged after {lives} lives: {progress}"
    wait_identical(master, slave, ["accounts"], timeout=10)
    assert checker.samples > 50 and checker.wrong == [], checker.wrong[:5]
    applied = [p[1] for p in progress]
    # every life kept what it had committed: progress survived at least two kills mid-catch-up
    assert sum(1 for before, after in zip([0] + applied, applied) if after > before) >= 2, progress
    assert progress[-1][0] >= 5, progress   # committed in steps, not as one slave transaction
    assert max(b - a for a, b in zip([0] + applied, applied)) < logged


def test_live_replication_replays_a_small_transaction_at_once_after_a_catch_up(master, slave, tmp_path):
    create_on_both(master, slave, BANK_DDL, ["accounts"])
    logged = transfers(master, 100_000)
    with conf_daemon(master, slave, tmp_path, CATCHUP_EVENTS=10_000) as daemon:
        wait_until(lambda: position(slave)[1] == logged, timeout=40, message="the catch-up")
        steps = position(slave)[0]
        assert steps >= 3
        master.execute(TRANSFER, ([5, 6], [3, -3]))
        t0 = time.monotonic()
        wait_identical(master, slave, ["accounts"], timeout=10)
        took = time.monotonic() - t0
        assert position(slave) == (steps + 1, logged + 2)   # one batch, woken by NOTIFY
        assert daemon.stop() == 0
    print(f"\nlive transaction replayed in {took * 1000:.0f} ms after {steps} catch-up steps")


# -- the next step read ahead (replicator.begin_next_step) -------------------------------------
def stuck_in_a_transaction(master):
    """The daemon's master sessions that have sat in an open transaction for over a second (a
    snapshot held, which holds back vacuum and, here, would be a step read ahead and never ended)."""
    return master.scalar("""SELECT count(*) FROM pg_stat_activity
                             WHERE application_name = 'pyreplica' AND datname = current_database()
                               AND state LIKE 'idle in transaction%%'
                               AND state_change < clock_timestamp() - interval '1 second'""")


def test_a_step_that_fails_after_the_next_was_read_ahead_is_retried_from_where_the_slave_is(master, slave, tmp_path):
    create_on_both(master, slave, BANK_DDL + "CREATE TABLE marker (id int PRIMARY KEY);", ["accounts", "marker"])
    # three steps, cut by ticks taken here (each part is written in well under the second that keeps
    # the capture from ticking on its own). The second step ends with the marker row, which the
    # slave already has, so it fails at its very last event, after the third was read ahead
    master.execute("SELECT pyreplica.tick('0')")
    first = transfers(master, 1000, writers=1)
    master.execute("SELECT pyreplica.tick('0')")
    logged = first + transfers(master, 1000, writers=1)
    master.execute("INSERT INTO marker VALUES (1)")
    master.execute("SELECT pyreplica.tick('0')")
    logged += transfers(master, 1000, writers=1) + 1
    master.execute("SELECT pyreplica.tick('0')")
    slave.execute("INSERT INTO marker VALUES (1)")
    # (steps of at most about 900 events: each ends at the next tick)
    with conf_daemon(master, slave, tmp_path, CATCHUP_EVENTS=900, BATCH_EVENTS=100, RETRY_MAX=1) as daemon:
        daemon.wait_for_output("(INSERT on public.marker): duplicate key")
        time.sleep(3)       # retried every second meanwhile, each time reading the next step ahead
        assert daemon.output.count("Could not read the next catch-up step ahead") == 0, daemon.output
        readers = master.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pyreplica' "
                                "AND datname = current_database()")
        assert readers == 3, "the next step was read ahead, on a second reader connection"
        assert position(slave) == (1, first), "only the first step may be committed"
        assert stuck_in_a_transaction(master) == 0, "a step read ahead was left open"
        slave.execute("DELETE FROM marker")
        wait_until(lambda: position(slave)[1] == logged, timeout=30, message="the catch-up after the fix")
        wait_identical(master, slave, ["accounts", "marker"], timeout=10)
        assert position(slave)[0] >= 3, "committed in steps"
        assert daemon.stop() == 0
    for db in (master, slave):
        assert db.scalar("SELECT count(*) FROM pg_prepared_xacts") == 0
    assert stuck_in_a_transaction(master) == 0
