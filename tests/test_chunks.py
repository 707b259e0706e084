"""A batch of many chunks (BATCH_EVENTS small): each chunk is applied by a worker thread while the
next is planned (apply.Applier). Replay must stay exact in the master's order, an administrator's
statement in one chunk must be in force for the next, and an error in a later chunk must name its
event and leave nothing of the batch behind."""
from replication import conf_daemon, create_on_both, prepared_count, wait_identical, wait_until

CHUNK = 20


def chunked_daemon(master, slave, tmp_path):
    return conf_daemon(master, slave, tmp_path, BATCH_EVENTS=CHUNK)


def test_chunks_applied_while_the_next_is_planned_replay_exactly_across_a_schema_change(master, slave, tmp_path):
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, v text)", ["t"])
    # one transaction, so one batch of many chunks: rows, then a column added (administrator's
    # statement), then rows and updates that need the column, each run longer than a chunk
    conn = master.connect(autocommit=False)
    with conn.cursor() as cur:
        for i in range(1, 101):
            cur.execute("INSERT INTO t VALUES (%s, %s)", (i, f"row {i}"))
        cur.execute("SELECT py_log_sql('ALTER TABLE public.t ADD COLUMN w numeric(6,2)')")
        for i in range(101, 201):
            cur.execute("INSERT INTO t VALUES (%s, %s, %s)", (i, f"row {i}", i / 3))
        for i in range(1, 201, 2):
            cur.execute("UPDATE t SET w = %s, v = v || ' updated' WHERE id = %s", (i / 7, i))
        for i in range(2, 201, 4):
            cur.execute("DELETE FROM t WHERE id = %s", (i,))
    conn.commit()
    conn.close()
    with chunked_daemon(master, slave, tmp_path) as daemon:
        wait_identical(master, slave, ["t"])
        assert daemon.stop() == 0
    assert slave.scalar("SELECT count(*) FROM t WHERE w IS NOT NULL") == master.scalar(
        "SELECT count(*) FROM t WHERE w IS NOT NULL") > 100
    assert prepared_count(master) == prepared_count(slave) == 0


def test_an_error_in_a_later_chunk_names_its_event_and_leaves_nothing_of_the_batch(master, slave, tmp_path):
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, v text)", ["t"])
    slave.execute("INSERT INTO t VALUES (150, 'only on the slave')")
    conn = master.connect(autocommit=False)
    with conn.cursor() as cur:
        for i in range(1, 201):
            cur.execute("INSERT INTO t VALUES (%s, %s)", (i, f"row {i}"))
    conn.commit()
    conn.close()
    event = master.scalar("SELECT id FROM replica_log WHERE sql LIKE '%%''row 150''%%'")
    with chunked_daemon(master, slave, tmp_path) as daemon:
        daemon.wait_for_output(f"error at event {event} (INSERT on public.t): duplicate key value violates "
                               f"unique constraint")
        assert slave.execute("SELECT id, v FROM t") == [(150, "only on the slave")], \
            "the chunks before the failing one must be rolled back with the batch"
        slave.execute("DELETE FROM t WHERE id = 150")
        wait_identical(master, slave, ["t"], timeout=90)
        wait_until(lambda: prepared_count(master) + prepared_count(slave) == 0, message="no prepared transaction")
        assert daemon.stop() == 0
