"""Network partitions and half-open connections (issue 11 item 13, docs/design.md §6).

The daemon runs with PEER_TIMEOUT = 6 behind a proxy to each server (tests/netfail.py): a blackholed
server is noticed and logged within a bounded time, retried, and replication resumes after the heal
with nothing left prepared; a connection whose daemon side vanished releases the slave's lock within
seconds, so a restarted daemon is not refused.
"""
import os
import sys
import tempfile
import threading
import time

import psycopg2
import pytest

from netfail import Netns, Proxy, can_vanish, netns_available
from replication import ROOT, Daemon, create_on_both, prepared_count, wait_identical, wait_until

PEER_TIMEOUT = 6
KEEPALIVE = 2
TABLE = "CREATE TABLE t (id serial PRIMARY KEY, v text)"


@pytest.fixture(scope="module")
def net():
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    with Netns() as namespace:
        yield namespace


@pytest.fixture
def conf_file():
    paths = []

    def write(master_dsn, slave_dsn, **extra):
        fd, path = tempfile.mkstemp(prefix="pyreplica-netfail-", suffix=".conf")
        keys = {"DSN0": master_dsn, "DSN1": slave_dsn, "PEER_TIMEOUT": PEER_TIMEOUT, "RETRY_MAX": 2, **extra}
        with os.fdopen(fd, "w") as f:
            f.write("[MAIN]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
        paths.append(path)
        return path
    yield write
    for path in paths:
        os.unlink(path)


class ConfDaemon(Daemon):
    """`pyreplica run -c CONF`, optionally inside the network namespace."""

    def __init__(self, master, slave, conf, netns=None, **kw):
        super().__init__(master, slave, **kw)
        self.args = ["-c", conf, "--keepalive", str(KEEPALIVE), "--name", "s1"]
        self.netns = netns

    def start(self):
        import subprocess
        argv = [sys.executable, "-m", "pyreplica.cli", "run", *self.args]
        self.proc = subprocess.Popen(self.netns.command(argv) if self.netns else argv, cwd=ROOT, env=self.env,
                                     stdout=self.logfile, stderr=subprocess.STDOUT)
        return self


class Writer(threading.Thread):
    """Inserts a row every 20 ms on the master (directly, not through a proxy) until stopped."""

    def __init__(self, db):
        super().__init__(daemon=True)
        self.db, self.stopping, self.rows, self.error = db, threading.Event(), 0, None

    def run(self):
        try:
            conn = self.db.connect()
            with conn.cursor() as cur:
                while not self.stopping.wait(0.02):
                    cur.execute("INSERT INTO t (v) VALUES ('w')")
                    self.rows += 1
            conn.close()
        except psycopg2.Error as e:
            self.error = e

    def stop(self):
        self.stopping.set()
        self.join(10)


def lines_since(daemon, mark, text):
    return [line for line in daemon.output[mark:].splitlines() if text in line]


@pytest.mark.parametrize("side", ["master", "slave"])
def test_a_blackholed_server_is_noticed_logged_and_replication_resumes_after_the_heal(master, slave, side, net,
                                                                                     conf_file):
    create_on_both(master, slave, TABLE, ["t"])
    proxies = {"master": Proxy(net.addresses[0], master.cluster.port),
               "slave": Proxy(net.addresses[1], slave.cluster.port)}
    conf = conf_file(proxies["master"].dsn(master.name), proxies["slave"].dsn(slave.name))
    writer = Writer(master)
    with ConfDaemon(master, slave, conf, net) as daemon:
        daemon.wait_for_output("Waiting for 'NOTIFY'")
        writer.start()
        wait_until(lambda: slave.scalar("SELECT count(*) FROM t") > 20, 20, message="replication under load")
        mark, cut_at = len(daemon.output), time.monotonic()
        net.blackhole(proxies[side].host)
        proxies[side].blackholed = True
        # noticed within the keepalive wait + PEER_TIMEOUT (+ slack for 2 loaded cores), not 15 minutes
        wait_until(lambda: lines_since(daemon, mark, "lost connection"), KEEPALIVE + PEER_TIMEOUT + 10,
                   message=f"a line saying the connection was lost:\n{daemon.output[mark:]}")
        noticed = time.monotonic() - cut_at
        time.sleep(PEER_TIMEOUT)         # the daemon retries meanwhile (and cannot connect)
        assert daemon.proc.poll() is None, daemon.output
        net.heal(proxies[side].host)
        proxies[side].blackholed = False
        writer.stop()
        assert writer.rows > 100
        try:
            wait_identical(master, slave, ["t"], timeout=40)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{daemon.output[mark:]}") from None
        daemon.wait_for_output("Replication resumed")
        assert prepared_count(master) == prepared_count(slave) == 0
        assert daemon.stop() == 0
    for proxy in proxies.values():
        proxy.close()
    output = daemon.final_output[mark:]
    assert "Traceback" not in output, output
    assert noticed < KEEPALIVE + PEER_TIMEOUT + 10
    # logged once per outage: the lost connection, then at most a line or two for the failed reconnects
    assert len(lines_since(daemon, mark, "lost connection")) == 1, output
    assert len(lines_since(daemon, mark, "cannot connect")) <= 2, output
