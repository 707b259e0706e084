"""The bank-transfer invariant (issue 11): many clients move money between accounts while the daemon
is killed (SIGKILL) every few seconds and restarted; a checker reads the slave every 50 ms. The
slave must never show a half-applied transaction (the total is constant), and must end equal."""
import random
import threading
import time

import psycopg2

from replication import Daemon, create_on_both, prepared_count, wait_identical

ACCOUNTS = 50
TOTAL = ACCOUNTS * 1000


def transfers(master, stop, counter):
    conn = master.connect(autocommit=False)
    rng = random.Random()
    try:
        while not stop.is_set():
            a, b = rng.sample(range(1, ACCOUNTS + 1), 2)
            amount = rng.randint(1, 100)
            try:
                with conn.cursor() as cur:
                    cur.execute("UPDATE account SET balance = balance - %s WHERE id = %s", (amount, a))
                    cur.execute("UPDATE account SET balance = balance + %s WHERE id = %s", (amount, b))
                conn.commit()
                counter[0] += 1
            except psycopg2.errors.DeadlockDetected:
                conn.rollback()
    finally:
        conn.close()


def checker(slave, stop, seen):
    conn = slave.connect()
    try:
        while not stop.is_set():
            with conn.cursor() as cur:
                cur.execute("SELECT sum(balance), count(*) FROM account")
                seen.append(cur.fetchone())
            time.sleep(0.05)
    finally:
        conn.close()


def test_transfers_never_half_applied_under_repeated_kill_9(master, slave):
    create_on_both(master, slave, "CREATE TABLE account (id int PRIMARY KEY, balance bigint NOT NULL)", ["account"])
    master.execute("INSERT INTO account SELECT g, 1000 FROM generate_series(1, %s) g", (ACCOUNTS,))
    stop, counter, seen = threading.Event(), [0], []
    threads = [threading.Thread(target=transfers, args=(master, stop, counter)) for _ in range(4)]
    threads.append(threading.Thread(target=checker, args=(slave, stop, seen)))
    for t in threads:
        t.start()
    kills = 0
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            daemon = Daemon(master, slave, name="bank", keepalive=1).start()
            time.sleep(random.uniform(1.0, 3.0))
            daemon.kill()
            kills += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    with Daemon(master, slave, name="bank", keepalive=1) as daemon:
        wait_identical(master, slave, ["account"], timeout=120)
        assert daemon.stop() == 0
    assert prepared_count(master) == prepared_count(slave) == 0
    assert kills >= 5 and counter[0] > 100
    assert len(seen) > 100
    bad = [row for row in seen if row[1] == ACCOUNTS and row[0] != TOTAL]
    assert bad == [], f"the slave showed a half-applied transfer: {bad[:5]}"
    assert master.scalar("SELECT sum(balance) FROM account") == TOTAL
