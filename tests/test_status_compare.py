"""`pyreplica status` and `pyreplica compare` (docs/design.md §8) against real master and slave servers."""
import contextlib
import io
import json
import threading
import time

import psycopg2
import pytest

from pyreplica import progress
from pyreplica.cluster import free_port
from replication import Daemon, create_on_both, run_cli, wait_identical, wait_until

DDL = """
CREATE TABLE t (id int PRIMARY KEY, v text, at timestamptz, f float8, b bytea, j jsonb, a int[]);
CREATE TABLE pair (k1 int, k2 text, n numeric, PRIMARY KEY (k1, k2));
"""
TABLES = ["t", "pair"]


def fill(master, start, count):
    master.execute("INSERT INTO t SELECT g, 'v' || g, now() - g * interval '1 hour', g / 7.0, "
                   "decode(md5(g::text), 'hex'), jsonb_build_object('g', g), ARRAY[g, -g] "
                   "FROM generate_series(%s, %s) g", (start, start + count - 1))
    master.execute("INSERT INTO pair SELECT g %% 10, 'k' || g, g * 1.5 FROM generate_series(%s, %s) g",
                   (start, start + count - 1))


def replicated(master, slave, name="s1"):
    """Master and slave with both tables, some rows, and a daemon that has replicated them, stopped."""
    create_on_both(master, slave, DDL, TABLES)
    fill(master, 1, 50)
    with Daemon(master, slave, name=name) as daemon:
        wait_identical(master, slave, TABLES)
        assert daemon.stop() == 0


def status_json(*args):
    code, out, err = run_cli("status", *args, "--json")
    assert code == 0, err
    return json.loads(out)


# -- status ---------------------------------------------------------------------------------------

def test_status_shows_position_lag_and_last_contact(master, slave):
    replicated(master, slave)
    report = status_json(master.dsn)
    (s1,) = report["slaves"]
    assert s1["name"] == "s1" and s1["events_behind"] == 0 and s1["seconds_behind"] == 0
    assert s1["applied"] == 100 and s1["batch_id"] >= 1
    # the daemon is stopped: what is written now is behind, and the oldest of it ages
    master.execute("UPDATE t SET v = 'late' WHERE id <= 3")
    master.execute("DELETE FROM pair WHERE k1 = 1")
    time.sleep(1.1)
    s1 = status_json(master.dsn)["slaves"][0]
    assert s1["events_behind"] == 3 + 5
    assert s1["seconds_behind"] >= 1
    assert s1["last_contact_seconds"] >= 1
    code, out, _ = run_cli("status", master.dsn)
    assert code == 0
    assert "EVENTS BEHIND" in out and "In-doubt prepared transactions: none" in out
    assert [line.split()[:4] for line in out.splitlines() if line.startswith("s1 ")] == [["s1", str(s1["batch_id"]), "100", "8"]]


def test_status_lists_in_doubt_prepared_transactions_on_both_sides(master, slave):
    replicated(master, slave)
    for db, side in ((master, "master"), (slave, "slave")):
        # as a daemon killed between PREPARE and COMMIT PREPARED leaves them; plus somebody else's,
        # which is not pyreplica's business
        for gid in (f"pyreplica:s1:99:{side}:0123456789ab:cafe0001", "someone-else"):
            db.execute("BEGIN; SELECT 1; PREPARE TRANSACTION %s", (gid,))
    report = status_json(master.dsn, slave.dsn)
    assert sorted((x["side"], x["gid"], x["slave"], x["batch_id"]) for x in report["in_doubt"]) == [
        ("master", "pyreplica:s1:99:master:0123456789ab:cafe0001", "s1", 99),
        ("slave", "pyreplica:s1:99:slave:0123456789ab:cafe0001", "s1", 99)]
    # without the slave's DSN, only the master's
    assert [x["side"] for x in status_json(master.dsn)["in_doubt"]] == ["master"]
    code, out, _ = run_cli("status", master.dsn, slave.dsn)
    assert code == 0 and "slave: pyreplica:s1:99:slave:" in out and "master: pyreplica:s1:99:master:" in out


def test_status_alerts_on_a_capture_trigger_disabled_on_the_master(master, slave):
    # a DBA disables the triggers for a bulk load and forgets them: every slave silently misses
    # those writes, and the only place that can tell is the master's catalog
    replicated(master, slave)
    master.execute("ALTER TABLE pair DISABLE TRIGGER ALL")
    master.execute("ALTER TABLE t ENABLE REPLICA TRIGGER t_replica_tg_u")
    code, out, err = run_cli("status", master.dsn)
    assert code == 3, err
    alerts = [line for line in out.splitlines() if line.startswith("ALERT: ")]
    assert alerts == [
        "ALERT: The capture of public.pair is off (trigger(s) pair_replica_tg, pair_replica_tg_d, pair_replica_tg_t, "
        "pair_replica_tg_u disabled): its writes on the master reach no slave. Enable them (ALTER TABLE public.pair "
        "ENABLE TRIGGER ...), then `pyreplica compare` each slave and `pyreplica repair` what differs",
        "ALERT: The capture of public.t is off (trigger(s) t_replica_tg_u enabled for replica sessions only): its "
        "writes on the master reach no slave. Enable them (ALTER TABLE public.t ENABLE TRIGGER ...), then "
        "`pyreplica compare` each slave and `pyreplica repair` what differs"]
    assert json.loads(run_cli("status", master.dsn, "--json")[1])["capture_off"] == [
        {"table": "public.pair", "triggers": ["pair_replica_tg", "pair_replica_tg_d", "pair_replica_tg_t",
                                              "pair_replica_tg_u"], "state": "disabled"},
        {"table": "public.t", "triggers": ["t_replica_tg_u"], "state": "enabled for replica sessions only"}]
    master.execute("ALTER TABLE pair ENABLE TRIGGER ALL; ALTER TABLE t ENABLE TRIGGER t_replica_tg_u")
    assert status_json(master.dsn)["capture_off"] == []


def test_the_daemon_warns_once_of_a_capture_trigger_disabled_on_the_master(master, slave):
    replicated(master, slave)
    master.execute("ALTER TABLE pair DISABLE TRIGGER pair_replica_tg_u")
    warning = ("The capture of public.pair is off (trigger(s) pair_replica_tg_u disabled): its writes on the master "
               "reach no slave.")
    with Daemon(master, slave, name="s1") as daemon:
        daemon.wait_for_output(warning)
        master.execute("INSERT INTO t (id) VALUES (1000)")     # replication goes on
        wait_identical(master, slave, ["t"])
        assert daemon.output.count(warning) == 1, daemon.output
        assert daemon.stop() == 0


def test_status_cannot_connect_is_one_line_exit_1():
    code, out, err = run_cli("status", f"host=127.0.0.1 port={free_port()} dbname=nowhere connect_timeout=3")
    assert code == 1
    assert "cannot connect to the master" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_status_of_a_database_without_pyreplica_says_so(bare_master):
    code, _, err = run_cli("status", bare_master.dsn)
    assert code == 1 and "master-install.sql" in err and "Traceback" not in err


# -- compare --------------------------------------------------------------------------------------

def compare_json(master, slave, *args):
    code, out, err = run_cli("compare", master.dsn, slave.dsn, "--name", "s1", "--json", *args)
    assert "Traceback" not in err, err
    return code, (json.loads(out) if out else None), err


def test_compare_identical_tables_exit_0_whatever_the_slave_timezone(master, slave):
    replicated(master, slave)
    # a timestamptz or a float prints differently under other settings: compare must not care
    slave.execute(f"ALTER DATABASE {slave.name} SET \"TimeZone\" = 'Asia/Tokyo'")
    master.execute(f"ALTER DATABASE {master.name} SET extra_float_digits = 0")
    code, report, err = compare_json(master, slave)
    assert code == 0, err
    assert report["identical"] is True
    assert [(t["table"], t["master_rows"], t["slave_rows"], t["identical"]) for t in report["tables"]] == [
        ("public.pair", 50, 50, True), ("public.t", 50, 50, True)]
    assert all(t["master_hash"] == t["slave_hash"] for t in report["tables"])
    code, out, _ = run_cli("compare", master.dsn, slave.dsn, "--name", "s1")
    assert code == 0 and "All 2 table(s) identical" in out


def test_compare_names_the_differing_tables_and_rows(master, slave):
    replicated(master, slave)
    slave.execute("UPDATE t SET f = 0.5 WHERE id = 7; DELETE FROM t WHERE id = 9; "
                  "INSERT INTO t (id, v) VALUES (1000, 'slave only')")
    code, report, _ = compare_json(master, slave)
    assert code == 1
    tables = {t["table"]: t for t in report["tables"]}
    assert tables["public.pair"]["identical"] is True
    t = tables["public.t"]
    assert (t["identical"], t["master_rows"], t["slave_rows"]) == (False, 50, 50)
    assert t["differences"] == ["(1000) only on the slave", "(7) differs", "(9) only on the master"]
    code, out, _ = run_cli("compare", master.dsn, slave.dsn, "--name", "s1")
    assert code == 1
    assert "1 of 2 table(s) differ: public.t" in out and "public.t: (9) only on the master" in out


def test_compare_reports_a_table_missing_or_different_on_the_slave(master, slave):
    replicated(master, slave)
    slave.execute("DROP TABLE pair; ALTER TABLE t ADD COLUMN extra int")
    code, report, _ = compare_json(master, slave)
    assert code == 1
    assert {t["table"]: t["differences"] for t in report["tables"]} == {
        "public.pair": ["missing on the slave"], "public.t": ["columns differ: slave has extra extra"]}


def test_compare_refuses_when_the_slave_is_behind(master, slave):
    replicated(master, slave)
    master.execute("UPDATE t SET v = 'not yet replicated' WHERE id <= 4")
    code, out, err = run_cli("compare", master.dsn, slave.dsn, "--name", "s1", "--wait", "1")
    assert code == 1 and out == ""
    assert "slave s1 is behind by 4 events, cannot compare at one point" in err
    # once the daemon runs, it waits for it and finds them identical
    with Daemon(master, slave, name="s1"):
        code, out, err = run_cli("compare", master.dsn, slave.dsn, "--name", "s1")
    assert code == 0, err + out


def test_compare_unknown_slave_name(master, slave):
    replicated(master, slave)
    code, _, err = run_cli("compare", master.dsn, slave.dsn, "--name", "nobody")
    assert code == 1 and "no position for nobody" in err and "Traceback" not in err


def test_compare_at_one_point_while_writers_keep_writing(master, slave):
    """Under a constant write load, master and slave are compared at the same point: no false difference."""
    replicated(master, slave)
    stop = threading.Event()

    def writer():
        with contextlib.closing(master.connect()) as conn, conn.cursor() as cur:
            i = 1000
            while not stop.is_set():
                cur.execute("INSERT INTO t (id, v) VALUES (%s, 'w'); UPDATE pair SET n = n + 1 WHERE k1 = %s",
                            (i, i % 10))
                i += 1
                # a point exists only when the daemon catches up between two commits: every 20 ms
                # leaves it room on a loaded 2-core machine (a batch takes a few ms)
                time.sleep(0.02)

    thread = threading.Thread(target=writer)
    with Daemon(master, slave, name="s1"):
        thread.start()
        try:
            wait_until(lambda: master.scalar("SELECT count(*) FROM t") > 120, message="writes")
            for _ in range(3):
                code, report, err = compare_json(master, slave)
                assert code == 0, (err, report)
                assert report["tables"][1]["master_rows"] > 50
        finally:
            stop.set()
            thread.join()


def test_progress_lines_only_for_long_work():
    """compare prints "still hashing" lines every few seconds for a big table, nothing for a small one."""
    out = io.StringIO()
    with progress.every(0.2, lambda elapsed: f"still hashing after {elapsed:.1f} s", stream=out):
        pass
    assert out.getvalue() == ""
    with progress.every(0.2, lambda elapsed: f"still hashing after {elapsed:.1f} s", stream=out):
        time.sleep(0.7)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("still hashing after 0.2")


def test_status_name_narrows_to_one_slave(master, slave):
    replicated(master, slave, name="s1")
    master.execute("SELECT pyreplica.register_slave('other')")
    assert [s["name"] for s in status_json(master.dsn)["slaves"]] == ["other", "s1"]
    assert [s["name"] for s in status_json(master.dsn, "--name", "s1")["slaves"]] == ["s1"]
    code, out, err = run_cli("status", master.dsn, "--name", "nobody")
    assert (code, err.strip()) == (1, "pyreplica: no slave named nobody is registered on the master")


# -- compare across lc_monetary and database encodings --------------------------------------------

def test_compare_identical_when_the_servers_lc_monetary_differ(master, slave):
    try:
        slave.execute("SET lc_monetary = 'de_DE.UTF-8'")
    except psycopg2.Error:
        pytest.skip("the de_DE.UTF-8 locale is not installed (localedef -i de_DE -f UTF-8 de_DE.UTF-8)")
    create_on_both(master, slave, "CREATE TABLE cash (id int PRIMARY KEY, m money)", ["cash"])
    master.execute("INSERT INTO cash SELECT g, g * 1234.56 FROM generate_series(1, 20) g")
    with Daemon(master, slave, name="s1") as daemon:
        wait_identical(master, slave, ["cash"])
        assert daemon.stop() == 0
    slave.execute(f"ALTER DATABASE {slave.name} SET lc_monetary = 'de_DE.UTF-8'")
    assert slave.scalar("SELECT 1234.56::money::text") != master.scalar("SELECT 1234.56::money::text")
    code, report, err = compare_json(master, slave)
    assert code == 0 and report["identical"] is True, (err, report)


def test_compare_identical_between_a_latin1_master_and_a_utf8_slave(master_cluster, slave):
    name = f"latin1_{slave.name}"
    master_cluster.psql("postgres", "-c", f"CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0 LOCALE 'C'")
    from conftest import Database
    master = Database(master_cluster, name)
    try:
        master.install_master()
        create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, v text)", ["t"])
        master.execute("INSERT INTO t VALUES (1, 'café'), (2, 'Straße ÿ'), (3, 'plain')")
        with Daemon(master, slave, name="s1") as daemon:
            # (not wait_identical: its md5 of the rows' text differs between the two encodings)
            wait_until(lambda: slave.scalar("SELECT count(*) FROM t") == 3, message="3 rows on the slave")
            assert daemon.stop() == 0
        assert slave.execute("SELECT v FROM t ORDER BY id") == [("café",), ("Straße ÿ",), ("plain",)]
        code, report, err = compare_json(master, slave)
        assert code == 0 and report["identical"] is True, (err, report)
    finally:
        master_cluster.dropdb(name)
