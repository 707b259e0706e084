"""pyreplica skip-event (issue 11 item 6, docs/design.md §6): an administrator skips exactly one named
event that cannot be replayed; recorded on both sides, logged and mailed by the daemon; never automatic."""
from replication import Daemon, create_on_both, run_cli, wait_identical, wait_until
from test_mail import console_run, inbox, smtp_keys  # noqa: F401 (fixture)

TABLE = "CREATE TABLE t (id int PRIMARY KEY, v text)"


def last_event(master):
    return master.scalar("SELECT max(id) FROM replica_log")


def stuck_at_conflict(master, slave, daemon):
    """Make the slave diverge so that the master's next UPDATE cannot be replayed; returns its event id."""
    slave.execute("DELETE FROM t WHERE id = 2")
    master.execute("UPDATE t SET v = 'b2' WHERE id = 2")
    event = last_event(master)
    daemon.wait_for_output(f"conflict at event {event} (UPDATE on public.t): the UPDATE matched 0 rows")
    return event


def test_skip_event_resumes_replay_exactly_past_that_event(tmp_path, inbox, master, slave):  # noqa: F811
    create_on_both(master, slave, TABLE, ["t"])
    master.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    daemon = console_run(tmp_path, master, slave, smtp_keys(inbox.server))
    conf = daemon.args[1]
    with daemon:
        wait_identical(master, slave, ["t"])
        event = stuck_at_conflict(master, slave, daemon)
        master.execute("INSERT INTO t VALUES (3, 'c')")      # behind the stuck event: waits for it
        assert slave.execute("SELECT id FROM t ORDER BY id") == [(1,)]

        code, out, err = run_cli("skip-event", str(event), "-c", conf)
        assert (code, err) == (0, ""), err
        assert out == (f"event {event} (UPDATE on public.t) will be skipped by slave mailset: recorded on the "
                       f"master and on the slave; its daemon leaves it out of its next batch (and logs and "
                       f"mails it)\n")

        daemon.wait_for_output(f"Skipping event {event} (UPDATE on public.t) as told by skip-event")
        wait_until(lambda: slave.execute("SELECT id, v FROM t ORDER BY id") == [(1, "a"), (3, "c")],
                   message="the events after the skipped one")
        # mailed as a warning, once, after the batch without it committed
        wait_until(lambda: any("as told by skip-event" in m.body for m in inbox.mails), message="the skip's mail")
        skip_mails = [m for m in inbox.mails if "as told by skip-event" in m.body]
        assert [m.subject for m in skip_mails] == ["pyreplica mailset conflict"]
        assert f"Skipped event {event} (UPDATE on public.t) as told by skip-event: batch " in skip_mails[0].body

        # a later change of the same row is replayed: only that one event was skipped
        slave.execute("INSERT INTO t VALUES (2, 'b')")
        master.execute("UPDATE t SET v = 'b3' WHERE id = 2")
        wait_identical(master, slave, ["t"])
        assert daemon.output.count("Skipping event") == 1, daemon.output

    # visible on both sides: who asked on the master; on the slave, the batch that left it out
    assert master.execute("SELECT slave, event_id, op::text, relname, requested_by::text = current_user "
                          "FROM pyreplica.skipped_events") == [("mailset", event, "U", "public.t", True)]
    rows = slave.execute("SELECT slave, event_id, described, skipped_at IS NOT NULL, batch_id > 0 "
                         "FROM pyreplica.skip_requests")
    assert rows == [("mailset", event, "UPDATE on public.t", True, True)]


def test_skip_requested_while_the_daemon_is_stopped_survives_the_restart(master, slave):
    create_on_both(master, slave, TABLE, ["t"])
    master.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    with Daemon(master, slave, name="s1") as daemon:
        wait_identical(master, slave, ["t"])
        event = stuck_at_conflict(master, slave, daemon)
        assert daemon.stop() == 0
    code, out, err = run_cli("skip-event", str(event), master.dsn, slave.dsn, "--name", "s1")
    assert code == 0, err
    master.execute("UPDATE t SET v = 'a2' WHERE id = 1")
    with Daemon(master, slave, name="s1") as daemon:
        daemon.wait_for_output(f"Skipping event {event} (UPDATE on public.t) as told by skip-event")
        wait_until(lambda: slave.execute("SELECT id, v FROM t ORDER BY id") == [(1, "a2")],
                   message="replay past the skipped event")
    assert slave.scalar("SELECT count(*) FROM pyreplica.skip_requests WHERE skipped_at IS NOT NULL") == 1


def test_skip_event_refuses_what_is_not_pending_for_that_slave(master, slave):
    create_on_both(master, slave, TABLE, ["t"])
    master.execute("INSERT INTO t VALUES (1, 'a')")
    applied = last_event(master)
    master.execute("SELECT pyreplica.register_slave('lagging', '1:1:'::pg_snapshot)")   # keeps the log unpruned
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, ["t"])
    cases = [
        (str(applied), "s1", f"pyreplica: event {applied} is not pending for slave \"s1\": it applied it "
                             f"already (its position is batch 1)"),
        ("999999", "s1", "pyreplica: event 999999 is not in the master's log (never logged, or applied by "
                         "every slave and pruned)"),
        (str(applied), "nobody", "pyreplica: no slave named \"nobody\" is registered on this master"),
    ]
    for event, name, message in cases:
        code, out, err = run_cli("skip-event", event, master.dsn, slave.dsn, "--name", name)
        assert (code, out, err.splitlines()[0]) == (1, "", message), err
    code, _, err = run_cli("skip-event", "twelve", master.dsn, slave.dsn)
    assert code == 2 and "argument ID: invalid int value: 'twelve'" in err
    # nothing was recorded anywhere, and nothing is ever skipped without being told
    assert master.scalar("SELECT count(*) FROM pyreplica.skipped_events") == 0
    assert slave.scalar("SELECT count(*) FROM pyreplica.skip_requests") == 0


def test_skip_of_a_pending_event_by_the_daemon_role(master, slave):
    """The daemon's least-privilege role on the master may record a skip (granted in master-install.sql)."""
    create_on_both(master, slave, TABLE, ["t"])
    master.execute("INSERT INTO t VALUES (1, 'a')")
    event = last_event(master)
    master.execute("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'skip_repl') THEN "
                   "CREATE ROLE skip_repl LOGIN; END IF; END $$; GRANT pyreplica_daemon TO skip_repl")
    master.execute("SELECT pyreplica.register_slave('s1', '1:1:'::pg_snapshot)")
    dsn = f"{master.dsn} user=skip_repl"
    code, out, err = run_cli("skip-event", str(event), dsn, slave.dsn, "--name", "s1")
    assert code == 0, err
    assert slave.execute("SELECT event_id, described FROM pyreplica.skip_requests") == [(event, "INSERT on public.t")]
    # twice is harmless
    assert run_cli("skip-event", str(event), dsn, slave.dsn, "--name", "s1")[0] == 0
    assert master.scalar("SELECT count(*) FROM pyreplica.skipped_events") == 1


def test_skip_event_again_while_the_batch_skipping_it_is_in_doubt_fails_clearly(master, slave):
    """Running skip-event again is harmless, also while the batch that skips the event is prepared on the
    slave and its daemon is gone: the slave's request row is locked by that batch, and the command says
    so within its lock timeout instead of waiting for an operator who is waiting for it."""
    create_on_both(master, slave, TABLE, ["t"])
    master.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    with Daemon(master, slave, name="s1") as daemon:
        wait_identical(master, slave, ["t"])
        event = stuck_at_conflict(master, slave, daemon)
    master.execute("INSERT INTO t VALUES (3, 'c')")
    assert run_cli("skip-event", str(event), master.dsn, slave.dsn, "--name", "s1")[0] == 0
    with Daemon(master, slave, name="s1", fault="after_slave_prepare") as daemon:
        wait_until(lambda: daemon.proc.poll() is not None, message="the daemon killed after the slave's PREPARE")
    assert slave.scalar("SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()") == 1

    code, out, err = run_cli("skip-event", str(event), master.dsn, slave.dsn, "--name", "s1", timeout=60)
    assert (code, out) == (1, ""), err
    assert err.splitlines()[0] == (
        f"pyreplica: slave s1's request to skip event {event} is locked by one of its batches prepared (in doubt) "
        f"on the slave: settle it first (pyreplica recover MASTER SLAVE --name s1, or start its daemon)")

    assert run_cli("recover", master.dsn, slave.dsn, "--name", "s1")[0] == 0
    assert run_cli("skip-event", str(event), master.dsn, slave.dsn, "--name", "s1")[0] == 0
    with Daemon(master, slave, name="s1") as daemon:
        daemon.wait_for_output(f"Skipping event {event} (UPDATE on public.t) as told by skip-event")
        wait_until(lambda: slave.execute("SELECT id, v FROM t ORDER BY id") == [(1, "a"), (3, "c")],
                   message="replay past the skipped event")
    assert slave.execute("SELECT event_id, skipped_at IS NOT NULL FROM pyreplica.skip_requests") == [(event, True)]
