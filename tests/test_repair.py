"""`pyreplica repair` (docs/design.md §8): one diverged slave table made equal to the master's at one
consistent point, against real master and slave servers, with a daemon running and a writer writing."""
import contextlib
import json
import re
import threading
import time

from pyreplica import compare, config as configuration, repair
from replication import Daemon, contents, create_on_both, run_cli, wait_identical, wait_until

DDL = """
CREATE TABLE t (id int PRIMARY KEY, v text, b bytea, n numeric, twice int GENERATED ALWAYS AS (id * 2) STORED);
CREATE TABLE pair (k1 int, k2 text, v text, PRIMARY KEY (k1, k2));
CREATE TABLE other (id int PRIMARY KEY, v text);
"""
TABLES = ["t", "pair", "other"]


def replicated(master, slave, name="s1"):
    """Tables with rows on both sides, replicated by a daemon that is then stopped."""
    create_on_both(master, slave, DDL, TABLES)
    master.execute("INSERT INTO t (id, v, b, n) SELECT g, 'v' || g, decode(md5(g::text), 'hex'), g / 7.0 "
                   "FROM generate_series(1, 100) g")
    master.execute(r"UPDATE t SET v = E'o''brien \\ \"q\"', b = '\x0027005c' WHERE id = 5")
    master.execute("INSERT INTO pair SELECT g % 10, 'k' || g, 'p' || g FROM generate_series(1, 50) g")
    master.execute("INSERT INTO pair VALUES (3, 'it''s', 'quoted key')")
    master.execute("INSERT INTO other SELECT g, 'o' || g FROM generate_series(1, 20) g")
    with Daemon(master, slave, name=name) as daemon:
        wait_identical(master, slave, TABLES)
        assert daemon.stop() == 0


def diverge(slave):
    """Extra, missing and different rows on the slave (as a careless hand edit leaves them)."""
    slave.execute("""
        INSERT INTO t (id, v) VALUES (1000, 'slave only');
        DELETE FROM t WHERE id = 9;
        UPDATE t SET v = 'plain' WHERE id = 5;
        UPDATE t SET b = NULL WHERE id = 6;
        UPDATE t SET v = NULL, n = NULL WHERE id = 7;
        UPDATE t SET v = 'it''s "other"', b = '\\x00ff' WHERE id = 8;
        DELETE FROM pair WHERE k1 = 3 AND k2 = 'it''s';
        INSERT INTO pair VALUES (99, 'slave''s', NULL);
        UPDATE pair SET v = NULL WHERE k1 = 1 AND k2 = 'k11';
    """)


T_DIFFERENCES = ["(1000) only on the slave", "(5) differs", "(6) differs", "(7) differs", "(8) differs"]
PAIR_DIFFERENCES = ["(1,k11) differs", "(3,it's) only on the master", "(99,slave's) only on the slave"]


def repair_json(master, slave, table, *args):
    code, out, err = run_cli("repair", master.dsn, slave.dsn, table, "--name", "s1", "--json", *args)
    assert "Traceback" not in err, err
    return code, (json.loads(out) if out else None), err


def counts(report):
    return report["inserted"], report["updated"], report["deleted"]


def compare_code(master, slave):
    code, out, err = run_cli("compare", master.dsn, slave.dsn, "--name", "s1")
    return code, out + err


def test_repair_while_the_daemon_runs_and_a_writer_writes(master, slave):
    replicated(master, slave)
    diverge(slave)
    assert compare_code(master, slave)[0] == 1
    stop = threading.Event()

    def writer():
        # writes every table, but never a row the divergence touched (replaying onto a missing row
        # would stop the daemon: that is a conflict, not what repair is for)
        with contextlib.closing(master.connect()) as conn, conn.cursor() as cur:
            i = 5000
            while not stop.is_set():
                cur.execute("INSERT INTO t (id, v) VALUES (%s, 'w'); UPDATE t SET n = n + 1 WHERE id = %s; "
                            "UPDATE pair SET v = v || '.' WHERE k1 = 4; INSERT INTO other VALUES (%s, 'w')",
                            (i, 20 + i % 50, i))
                i += 1
                time.sleep(0.02)

    thread = threading.Thread(target=writer)
    with Daemon(master, slave, name="s1") as daemon:
        thread.start()
        try:
            wait_until(lambda: master.scalar("SELECT count(*) FROM t") > 130, message="writes")
            code, report, err = repair_json(master, slave, "t")
            assert code == 0, err
            assert (counts(report), report["differences"], report["dry_run"]) == ((1, 4, 1), T_DIFFERENCES, False)
            assert report["master_rows"] > 130 and report["slave_rows"] == report["master_rows"]
            code, out, err = run_cli("repair", master.dsn, slave.dsn, "public.pair", "--name", "s1")
            assert code == 0, err
            assert out.splitlines()[1:] == [f"  public.pair: {d}" for d in PAIR_DIFFERENCES] + [
                "Repaired public.pair: 1 inserted, 1 updated, 1 deleted"]
            # repaired at a point the daemon goes on from: nothing differs, nothing conflicts
            code, report, err = repair_json(master, slave, "t")
            assert code == 0 and counts(report) == (0, 0, 0), err
        finally:
            stop.set()
            thread.join()
        wait_identical(master, slave, TABLES)
        assert "conflict" not in daemon.output, daemon.output
    code, out = compare_code(master, slave)
    assert code == 0 and "All 3 table(s) identical" in out, out
    assert slave.execute("SELECT v, b, twice FROM t WHERE id IN (5, 8) ORDER BY id") == \
        master.execute("SELECT v, b, twice FROM t WHERE id IN (5, 8) ORDER BY id")
    assert slave.scalar("SELECT v FROM t WHERE id = 5") == 'o\'brien \\ "q"'


def test_the_daemon_waits_for_the_repair_of_its_table(master, slave, monkeypatch, capsys):
    """A row the master commits after the repair's point reaches the slave after the repair, never
    during it (the repair would take it for a slave-only row and delete it)."""
    replicated(master, slave)
    diverge(slave)
    original = repair.repair_rows

    def between_point_and_diff(*args):
        master.execute("INSERT INTO t (id, v) VALUES (7777, 'after the point')")
        wait_until(lambda: slave.scalar("SELECT count(*) FROM pg_locks WHERE relation = 'public.t'::regclass "
                                        "AND NOT granted"), message="the daemon waiting for the table")
        assert slave.scalar("SELECT count(*) FROM t WHERE id = 7777") == 0
        return original(*args)

    monkeypatch.setattr(repair, "repair_rows", between_point_and_diff)
    with Daemon(master, slave, name="s1") as daemon:
        assert repair.repair(configuration.from_args(master.dsn, slave.dsn), "s1", "t", as_json=True) == 0
        assert counts(json.loads(capsys.readouterr().out)) == (1, 4, 1)
        wait_identical(master, slave, ["t"])
        assert "conflict" not in daemon.output, daemon.output
    assert slave.scalar("SELECT v FROM t WHERE id = 7777") == "after the point"


def test_dry_run_changes_nothing_and_reports_what_repair_then_does(master, slave):
    replicated(master, slave)
    diverge(slave)
    before = {table: contents(slave, table) for table in TABLES}
    code, dry, err = repair_json(master, slave, "t", "--dry-run")
    assert code == 1, err       # differences found, like compare
    assert (counts(dry), dry["differences"], dry["dry_run"]) == ((1, 4, 1), T_DIFFERENCES, True)
    code, out, err = run_cli("repair", master.dsn, slave.dsn, "pair", "--name", "s1", "--dry-run")
    assert code == 1 and out.splitlines()[-1] == \
        "Dry run, nothing changed: public.pair would have 1 inserted, 1 updated, 1 deleted"
    assert {table: contents(slave, table) for table in TABLES} == before
    code, done, err = repair_json(master, slave, "t")
    assert code == 0, err
    assert (counts(done), done["differences"]) == (counts(dry), dry["differences"])
    assert contents(slave, "t") == contents(master, "t")
    code, out, err = run_cli("repair", master.dsn, slave.dsn, "t", "--name", "s1", "--dry-run")
    assert code == 0 and out.splitlines()[-1] == "public.t identical: nothing to repair"


def test_repair_of_many_rows_in_batches(master, slave, monkeypatch, capsys):
    """Thousands of differences (more than one batch each way): same result, progress lines meanwhile."""
    replicated(master, slave)
    master.execute("INSERT INTO t (id, v) SELECT g, 'many' FROM generate_series(200, 2700) g")
    with Daemon(master, slave, name="s1") as daemon:
        wait_identical(master, slave, ["t"])
        assert daemon.stop() == 0
    slave.execute("DELETE FROM t WHERE id BETWEEN 200 AND 1500; UPDATE t SET v = 'x' WHERE id > 1500; "
                  "INSERT INTO t (id) SELECT g FROM generate_series(10000, 11200) g")
    monkeypatch.setattr(compare, "PROGRESS_EVERY", 0.01)     # "every few seconds" for a big table
    config = configuration.from_args(master.dsn, slave.dsn)
    assert repair.repair(config, "s1", "t", as_json=True) == 0
    out, err = capsys.readouterr()
    assert counts(json.loads(out)) == (1301, 1200, 1201)
    assert contents(slave, "t") == contents(master, "t")
    progress_lines = err.splitlines()
    assert progress_lines and all(re.fullmatch(r"repair: public\.t: \d+ master rows compared, \d+ differences, "
                                               r"\d+ s", line) for line in progress_lines), err


def test_repair_waits_for_the_table_events_only(master, slave):
    replicated(master, slave)
    diverge(slave)
    master.execute("UPDATE other SET v = 'behind' WHERE id <= 3")
    # events pending for another table: the repaired table is at one point all the same
    code, report, err = repair_json(master, slave, "pair", "--wait", "1")
    assert code == 0 and counts(report) == (1, 1, 1), err
    master.execute("UPDATE t SET v = 'not yet replicated' WHERE id IN (1, 2)")
    code, out, err = run_cli("repair", master.dsn, slave.dsn, "t", "--name", "s1", "--wait", "1")
    assert (code, out) == (1, "")
    assert err.strip() == ("pyreplica: slave s1 has 2 events for public.t not applied yet, cannot repair at "
                           "one point (is `pyreplica run` running for it? waited 1 s; see --wait)")
    with Daemon(master, slave, name="s1"):
        code, report, err = repair_json(master, slave, "t")
    assert code == 0 and counts(report) == (1, 4, 1), err
    assert contents(slave, "t") == contents(master, "t")


def test_repair_says_when_the_slave_table_stays_locked(master, slave):
    replicated(master, slave)
    with contextlib.closing(slave.connect(autocommit=False)) as conn, conn.cursor() as cur:
        cur.execute("LOCK TABLE t IN ROW EXCLUSIVE MODE")     # as a batch prepared and never committed
        code, out, err = run_cli("repair", master.dsn, slave.dsn, "t", "--name", "s1", "--wait", "1.5")
    assert (code, out) == (1, "")
    assert err.strip() == ("pyreplica: the slave's table public.t stayed locked for 1.5 s, cannot repair it "
                           "(a batch prepared and never committed? `pyreplica status` lists them, "
                           "`pyreplica recover` settles them; see --wait)")


def refusal(master, slave, *args):
    code, out, err = run_cli("repair", master.dsn, slave.dsn, *args)
    assert out == "" and "Traceback" not in err, err
    return code, err.strip()


def test_refusals(master, slave):
    replicated(master, slave)
    master.execute("CREATE TABLE plain (id int PRIMARY KEY)")
    assert refusal(master, slave, "plain", "--name", "s1") == (
        1, "pyreplica: table plain is not replicated by this master: repair works on captured tables "
           "(`pyreplica compare` lists them)")
    assert refusal(master, slave, "t", "--name", "nobody") == (
        1, "pyreplica: the slave has no position for nobody: it never replicated from this master "
           "(wrong --name? start `pyreplica run` first)")
    slave.execute("ALTER TABLE t ADD COLUMN extra int, DROP COLUMN n")
    assert refusal(master, slave, "t", "--name", "s1") == (
        1, "pyreplica: cannot repair public.t: columns differ: slave lacks n; slave has extra extra "
           "(make the slave's columns the master's first)")
    slave.execute("ALTER TABLE pair DROP CONSTRAINT pair_pkey")
    assert refusal(master, slave, "pair", "--name", "s1") == (
        1, "pyreplica: cannot repair public.pair: the slave's primary key is none, the master's (k1, k2)")
    slave.execute("DROP TABLE other")
    assert refusal(master, slave, "public.other", "--name", "s1") == (
        1, "pyreplica: cannot repair public.other: it is missing on the slave (create it there first)")
    # nothing was touched by any of them
    assert slave.scalar("SELECT count(*) FROM pair") == 51


def test_usage_errors_exit_2(master, slave):
    code, _, err = run_cli("repair", "--name", "s1")
    assert code == 2 and err.splitlines()[-1] == "pyreplica repair: error: the following arguments are required: TABLE"
    code, _, err = run_cli("repair", master.dsn, slave.dsn, "--name", "s1")
    assert (code, err.strip()) == (2, "pyreplica: give the TABLE to repair after the connection strings")
    code, _, err = run_cli("repair", "-c", "/nonexistent.conf", master.dsn, "t")
    assert (code, err.strip()) == (2, "pyreplica: give either -c CONF or the connection strings, not both")


def test_repair_of_a_quoted_name_in_its_schema(master, slave):
    ddl = 'CREATE SCHEMA "Odd S"; CREATE TABLE "Odd S"."Mixed T" ("Key" text PRIMARY KEY, "V a" int)'
    create_on_both(master, slave, ddl, ['"Odd S"."Mixed T"'])
    master.execute('INSERT INTO "Odd S"."Mixed T" SELECT \'k\' || g, g FROM generate_series(1, 10) g')
    with Daemon(master, slave, name="s1") as daemon:
        wait_identical(master, slave, ['"Odd S"."Mixed T"'])
        assert daemon.stop() == 0
    slave.execute('UPDATE "Odd S"."Mixed T" SET "V a" = -1 WHERE "Key" = \'k3\'')
    master.execute('UPDATE "Odd S"."Mixed T" SET "V a" = 0 WHERE "Key" = \'k4\'')   # pending: waited for
    with Daemon(master, slave, name="s1"):
        code, report, err = repair_json(master, slave, "Odd S.Mixed T")
    assert code == 0 and (counts(report), report["differences"]) == ((0, 1, 0), ["(k3) differs"]), err
    assert contents(slave, '"Odd S"."Mixed T"') == contents(master, '"Odd S"."Mixed T"')


def test_values_of_many_types_round_trip_whatever_the_slave_settings(master, slave):
    """The master's values reach the slave exactly, also where text output depends on settings."""
    ddl = ("CREATE TABLE typed (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at timestamptz, iv interval, "
           "j jsonb, a text[], f float8, m money, u uuid, d date, big numeric)")
    create_on_both(master, slave, ddl, ["typed"])
    master.execute("INSERT INTO typed (at, iv, j, a, f, m, u, d, big) SELECT now() - g * interval '7 hours', "
                   "g * interval '1 day 3 min', jsonb_build_object('k', g, 'q', 'it''s'), ARRAY['a b', NULL, '\"'], "
                   "1.0 / (g + 2), g * 1234.56, md5(g::text)::uuid, date '2024-02-29' + g, 10::numeric ^ 40 + g "
                   "FROM generate_series(1, 30) g")
    with Daemon(master, slave, name="s1") as daemon:
        wait_identical(master, slave, ["typed"])
        assert daemon.stop() == 0
    slave.execute(f"ALTER DATABASE {slave.name} SET \"TimeZone\" = 'Asia/Tokyo'")
    slave.execute(f"ALTER DATABASE {slave.name} SET \"IntervalStyle\" = 'sql_standard'")
    slave.execute("DELETE FROM typed WHERE id <= 10; UPDATE typed SET at = NULL, iv = '1 s', j = '[]', a = '{}', "
                  "f = 0, m = 0, u = NULL, d = NULL, big = 1 WHERE id > 20")
    code, report, err = repair_json(master, slave, "typed")
    assert code == 0 and counts(report) == (10, 10, 0), err
    # (read under the same settings: the slave's own ones print them differently)
    query = """SET "TimeZone" = 'UTC'; SET "IntervalStyle" = 'postgres'; SELECT t::text FROM typed t ORDER BY id"""
    assert slave.execute(query) == master.execute(query)
    assert compare_code(master, slave)[0] == 0
