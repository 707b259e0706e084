"""Recovery after an operator settles in-doubt batches by hand (issue 11 item 8, docs/design.md §5):
every manual COMMIT/ROLLBACK PREPARED of every in-doubt state converges to equal data, or refuses
only when events the slave needs are really gone."""
import signal

import pytest

from replication import Daemon, create_on_both, prepared_count, run_cli, wait_identical

TABLE = "CREATE TABLE t (id int PRIMARY KEY, v text)"

# (where the daemon dies, what the operator then settles by hand)
SETTLEMENTS = [
    ("after_master_prepare", [("master", "COMMIT")]),
    ("after_master_prepare", [("master", "ROLLBACK")]),
    ("after_master_prepare", [("slave", "COMMIT")]),
    ("after_master_prepare", [("slave", "ROLLBACK")]),
    ("after_slave_prepare", [("slave", "COMMIT")]),
    ("after_slave_prepare", [("slave", "ROLLBACK")]),
    ("after_slave_commit", [("master", "COMMIT")]),
    ("after_slave_commit", [("master", "ROLLBACK")]),
    # the worst: the master's record committed, the slave's data rolled back
    ("after_master_prepare", [("master", "COMMIT"), ("slave", "ROLLBACK")]),
]


def settle_by_hand(db, verb):
    gids = [g for (g,) in db.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")]
    assert len(gids) == 1, gids
    db.execute(f"{verb} PREPARED %s", (gids[0],))


def crash_in_doubt(master, slave, point):
    create_on_both(master, slave, TABLE, ["t"])
    master.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 20) g")
    crashing = Daemon(master, slave, name="s1", fault=point).start()
    try:
        assert crashing.proc.wait(30) == -signal.SIGKILL, crashing.output
    finally:
        crashing.stop()


@pytest.mark.parametrize("point, actions", SETTLEMENTS, ids=lambda x: str(x))
def test_manual_settlement_converges(master, slave, point, actions):
    crash_in_doubt(master, slave, point)
    for side, verb in actions:
        settle_by_hand(master if side == "master" else slave, verb)
    master.execute("UPDATE t SET v = 'after' WHERE id <= 5")
    with Daemon(master, slave, name="s1") as daemon:
        wait_identical(master, slave, ["t"])
        assert daemon.stop() == 0
    assert prepared_count(master) == prepared_count(slave) == 0
    assert "Traceback" not in daemon.final_output


def test_recover_command_settles_without_replicating(master, slave):
    crash_in_doubt(master, slave, "after_master_prepare")
    assert prepared_count(master) == prepared_count(slave) == 1
    master.execute("INSERT INTO t VALUES (100, 'not replicated by recover')")
    rc, out, err = run_cli("recover", master.dsn, slave.dsn, "--name", "s1")
    assert rc == 0, err
    assert "slave s1: nothing in doubt; the slave and the master's record agree at batch 1" in out
    assert prepared_count(master) == prepared_count(slave) == 0
    assert slave.scalar("SELECT count(*) FROM t") == 20


def test_refuses_only_when_the_events_are_gone(master, slave, slave2):
    """The master's side committed and the slave's rolled back by hand, then the log pruned by
    another slave's daemon: the events batch 1 carried are gone; the daemon refuses, saying why."""
    slave2.execute(TABLE)
    crash_in_doubt(master, slave, "after_master_prepare")
    settle_by_hand(master, "COMMIT")
    settle_by_hand(slave, "ROLLBACK")
    master.execute("SELECT pyreplica.register_slave('other')")
    master.execute("UPDATE pyreplica.replica_slaves SET confirmed = pg_current_snapshot() WHERE name = 'other'")
    master.execute("SELECT pyreplica.prune()")
    assert master.scalar("SELECT count(*) FROM replica_log") == 0
    rc, out, err = run_cli("run", master.dsn, slave.dsn, "--name", "s1")
    assert rc == 1
    assert "slave s1 is at batch 0 but the master has it at batch 1 and has pruned events it needs" in err, err


def prune_through_another_slave(master):
    """Another slave, caught up, lets the log be pruned (as its daemon's housekeeping would)."""
    master.execute("SELECT pyreplica.register_slave('other')")
    master.execute("UPDATE pyreplica.replica_slaves SET confirmed = pg_current_snapshot() WHERE name = 'other'")
    return master.scalar("SELECT pyreplica.prune()")


def test_a_slave_dropped_then_registered_again_after_a_prune_is_refused(master, slave):
    """drop-slave, a prune, register again: the new record (batch 0) is behind the slave's batch, but
    the events between the slave's position and the registration are gone. Recording the slave's
    position there lost them without a word; now the daemon refuses and says to clone."""
    create_on_both(master, slave, TABLE, ["t"])
    master.execute("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 20) g")
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, ["t"])
    master.execute("INSERT INTO t SELECT g, 'b' FROM generate_series(21, 40) g")
    assert run_cli("drop-slave", "s1", master.dsn)[0] == 0
    assert prune_through_another_slave(master) > 0
    assert run_cli("register", "s1", master.dsn)[0] == 0
    rc, out, err = run_cli("run", master.dsn, slave.dsn, "--name", "s1")
    assert rc == 1
    assert "slave s1 is at batch 1 but the master has it at batch 0 and has pruned events it needs" in err, err
    assert slave.scalar("SELECT count(*) FROM t") == 20


def test_a_recreated_slave_database_is_refused_not_replayed_from_its_registration(master, slave):
    """The slave database dropped and created again (empty, same name and server: the same identity)
    while the master still records its batches: taking its registration as its position replayed
    only the events since, silently missing the rows copied before."""
    create_on_both(master, slave, TABLE, ["t"])
    master.execute("SELECT pyreplica.register_slave('lagging')")     # the log is never pruned
    master.execute("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 20) g")
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, ["t"])
    slave.cluster.dropdb(slave.name)
    slave.cluster.createdb(slave.name)
    slave.execute(TABLE)
    master.execute("INSERT INTO t VALUES (100, 'new')")
    rc, out, err = run_cli("run", master.dsn, slave.dsn, "--name", "s1")
    assert rc == 1
    assert ("the master records slave s1 at batch 1, but this slave database has no position for it "
            "(recreated, or restored without its pyreplica schema?)") in err, err
    assert slave.scalar("SELECT count(*) FROM t") == 0


def test_a_master_whose_transaction_ids_are_behind_the_slaves_position_is_refused(master, slave):
    """A master restored from a dump on another server starts its transaction ids anew: below the
    slave's position every new event looks applied, and nothing was ever replicated again."""
    create_on_both(master, slave, TABLE, ["t"])
    master.execute("INSERT INTO t VALUES (1, 'a')")
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, ["t"])
    # as the slave's position looks to a master whose transaction counter started again lower
    slave.execute("UPDATE pyreplica.position SET snapshot = '100000000:100000000:'")
    master.execute("INSERT INTO t VALUES (2, 'b')")
    rc, out, err = run_cli("run", master.dsn, slave.dsn, "--name", "s1")
    assert rc == 1
    assert "the master's transaction ids are behind slave s1's position: it is not the server" in err, err


def test_recover_under_an_unregistered_name_registers_nothing_and_names_the_slave_in_doubt(master, slave):
    """Without --name the name is the slave database's: recover used to register it as a new slave
    (its record then held the log for ever) and say "nothing in doubt", settling nothing."""
    crash_in_doubt(master, slave, "after_master_prepare")
    rc, out, err = run_cli("recover", master.dsn, slave.dsn)
    assert rc == 1
    assert (f"slave {slave.name} is not registered on the master: it has nothing to settle; batches in doubt on "
            f"the master are slave(s) s1's: pyreplica recover MASTER SLAVE --name s1") in err, err
    assert master.execute("SELECT name FROM pyreplica.replica_slaves") == [("s1",)]
    assert (prepared_count(master), prepared_count(slave)) == (1, 1)
    assert run_cli("recover", master.dsn, slave.dsn, "--name", "s1")[0] == 0
    assert (prepared_count(master), prepared_count(slave)) == (0, 0)


def test_a_batch_prepared_by_another_role_is_named_not_passed_over_in_silence(master, slave):
    """The daemon moved to a least-privilege role after a crash: the batch its superuser run left
    prepared on the master is not this role's to settle, and recover said "nothing in doubt"."""
    from psycopg2 import sql
    crash_in_doubt(master, slave, "after_master_prepare")
    role = "recover_plain"
    master.execute(sql.SQL("CREATE ROLE {0} LOGIN; GRANT pyreplica_daemon TO {0}").format(sql.Identifier(role)))
    try:
        rc, out, err = run_cli("recover", master.cluster.dsn(master.name, user=role), slave.dsn, "--name", "s1")
        gid = master.scalar("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
        assert f"{gid} is prepared by role postgres, not this daemon's: left alone" in err, err
        assert "settle it as postgres or a superuser (pyreplica recover MASTER SLAVE --name s1)" in err, err
    finally:
        for (gid,) in master.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"):
            master.execute("ROLLBACK PREPARED %s", (gid,))
        master.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(role)))


def test_status_alerts_when_the_slave_is_behind_the_masters_record(master, slave):
    """The master's side of a batch committed by hand and the slave's rolled back: the registry
    says batch 1, zero events behind; only the slave's own position tells the truth."""
    crash_in_doubt(master, slave, "after_master_prepare")
    settle_by_hand(master, "COMMIT")
    settle_by_hand(slave, "ROLLBACK")
    rc, out, err = run_cli("status", master.dsn, slave.dsn, "--name", "s1")
    assert rc == 3, out + err
    assert ("ALERT: slave s1 has committed batch 0 but the master records batch 1 for it (settled by hand?): "
            "start its daemon now") in out, out
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, ["t"])
    assert run_cli("status", master.dsn, slave.dsn, "--name", "s1")[0] == 0


def test_a_slave_started_under_another_name_is_told_its_name(master, slave):
    """Started without --name (the name is then the slave database's), a slave that replicates as s1
    was told to register the new name or clone, which would lose events or copy for nothing."""
    create_on_both(master, slave, TABLE, ["t"])
    master.execute("INSERT INTO t VALUES (1, 'a')")
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, ["t"])
    rc, out, err = run_cli("run", master.dsn, slave.dsn)
    assert rc == 1
    assert (f"slave {slave.name} is not registered on the master, but this slave database already replicates "
            f"from it as s1: give that name (--name s1, or the config's SLAVE_FIELD/NAME)") in err, err
    assert master.execute("SELECT name FROM pyreplica.replica_slaves") == [("s1",)]
