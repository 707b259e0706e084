"""Network partitions and half-open connections (issue 11 item 13, docs/design.md §6).

The daemon runs with PEER_TIMEOUT = 6 behind a proxy to each server (tests/netfail.py): a blackholed
server is noticed and logged within a bounded time, retried, and replication resumes after the heal
with nothing left prepared; a connection whose daemon side vanished releases the slave's lock within
seconds, so a restarted daemon is not refused.
"""
import os
import subprocess
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


@pytest.fixture
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
        assert lines_since(daemon, mark, "Opening origin (master) connection"), daemon.output[mark:]
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


def daemon_backends(db):
    return {pid for (pid,) in db.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                         "AND application_name = 'pyreplica'")}


@pytest.fixture
def vanishing():
    if not can_vanish():
        pytest.skip("closing a socket silently needs TCP repair mode (CAP_NET_ADMIN)")


def proxied(master, slave, conf_file):
    proxies = Proxy("127.0.0.1", master.cluster.port), Proxy("127.0.0.1", slave.cluster.port)
    return proxies, conf_file(proxies[0].dsn(master.name), proxies[1].dsn(slave.name))


def test_a_killed_daemon_s_half_open_backend_releases_the_slave_within_seconds(master, slave, conf_file, vanishing):
    """kill -9 of the daemon, its connections' server side left open (its host is gone): the
    slave's backend goes away within seconds, so the restarted daemon is not refused."""
    create_on_both(master, slave, TABLE, ["t"])
    proxies, conf = proxied(master, slave, conf_file)
    with ConfDaemon(master, slave, conf) as daemon:
        daemon.wait_for_output("Waiting for 'NOTIFY'")
        old = daemon_backends(slave)
        assert len(old) == 1
        daemon.kill()
    killed_at = time.monotonic()
    master.execute("INSERT INTO t (v) SELECT 'after' FROM generate_series(1, 10)")
    # the server's default keepalive would keep it for 2 hours; ours drop it within PEER_TIMEOUT
    wait_until(lambda: not (daemon_backends(slave) & old), PEER_TIMEOUT + 10,
               message="the killed daemon's slave backend to go away")
    assert time.monotonic() - killed_at < PEER_TIMEOUT + 10
    with ConfDaemon(master, slave, conf) as restarted:
        wait_identical(master, slave, ["t"], timeout=30)
        assert restarted.stop() == 0
    assert "another pyreplica" not in restarted.final_output, restarted.final_output
    assert prepared_count(master) == prepared_count(slave) == 0
    for proxy in proxies:
        proxy.close()


@pytest.mark.parametrize("side", ["master", "slave"])
def test_a_connection_cut_on_the_daemon_s_side_only_is_retried_and_replication_resumes(master, slave, side,
                                                                                       conf_file, vanishing):
    """The daemon's side of its connections drops (a NAT or firewall forgot them) while the
    server's side stays open: the daemon reconnects; on the slave it waits for its own old backend
    (still holding the lock) to be dropped, then resumes, never exiting."""
    create_on_both(master, slave, TABLE, ["t"])
    proxies, conf = proxied(master, slave, conf_file)
    proxy = proxies[0] if side == "master" else proxies[1]
    server = master if side == "master" else slave
    with ConfDaemon(master, slave, conf) as daemon:
        daemon.wait_for_output("Waiting for 'NOTIFY'")
        master.execute("INSERT INTO t (v) VALUES ('before')")
        wait_identical(master, slave, ["t"])
        old, mark = daemon_backends(server), len(daemon.output)
        proxy.cut()
        master.execute("INSERT INTO t (v) SELECT 'after' FROM generate_series(1, 10)")
        wait_until(lambda: not (daemon_backends(server) & old), PEER_TIMEOUT + 10,
                   message="the vanished connection's backend to go away")
        wait_identical(master, slave, ["t"], timeout=30)
        assert daemon.proc.poll() is None, daemon.output
        assert lines_since(daemon, mark, "lost connection"), daemon.output[mark:]
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.final_output, daemon.final_output
    assert prepared_count(master) == prepared_count(slave) == 0
    for proxy in proxies:
        proxy.close()


def test_the_daemon_s_sessions_carry_the_peer_timeout_settings(master, slave, conf_file):
    """The settings the daemon derives from PEER_TIMEOUT take effect in its sessions on both servers
    (over TCP: on a Unix socket the keepalive settings read 0)."""
    from pyreplica import config as configuration, log
    from pyreplica.filters import Pipeline
    from pyreplica.master import SEARCH_PATH
    from pyreplica.sides import Sides
    config = configuration.load(conf_file(master.dsn, slave.dsn))
    sides = Sides(config, "s1", Pipeline([]), log.get())
    for dsn in (master.dsn, slave.dsn):
        conn = sides._connect(dsn, "slave", SEARCH_PATH)
        try:
            with conn.cursor() as cur:
                shown = {}
                for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count",
                             "tcp_user_timeout", "client_connection_check_interval"):
                    cur.execute(f"SELECT setting FROM pg_settings WHERE name = '{name}'")
                    shown[name] = cur.fetchone()[0]
            client = conn.get_dsn_parameters()
        finally:
            conn.close()
        assert shown == {"tcp_keepalives_idle": "2", "tcp_keepalives_interval": "1", "tcp_keepalives_count": "3",
                         "tcp_user_timeout": "6000", "client_connection_check_interval": "2000"}
        assert (client.get("keepalives"), client.get("keepalives_idle"), client.get("tcp_user_timeout")) == \
               ("1", "2", "6000"), client
