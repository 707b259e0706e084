"""The log's size over time (docs/design.md §3): it must not bloat.

Phase 1: pgbench writes single-row INSERTs for `bloat_seconds` while a daemon keeps up; the log's
on-disk size (every partition with its indexes and TOAST) is read after a warm-up and at the end,
with the dead tuples the statistics count in it (pruning never DELETEs, so there should be none).
Phase 2: the daemon is stopped while pgbench writes for `bloat_stopped_seconds` (the log grows with
the unapplied events), then started again; once it has caught up and pruned, the size is read again.
"""
import time

from .common import DB, applied, pgbench, start_daemon, wait_until

SCHEMA = "CREATE TABLE bloat (id bigserial PRIMARY KEY, v text NOT NULL)"
INSERT = "INSERT INTO bloat (v) VALUES ('sustained writes, one row per transaction');\n"
LOG_MB = """SELECT sum(pg_total_relation_size(c.oid)) / 1048576.0 FROM pg_class c
             WHERE c.oid IN ('pyreplica.replica_log_0'::regclass, 'pyreplica.replica_log_1'::regclass,
                             'pyreplica.replica_log_2'::regclass)"""
DEAD = """SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_all_tables
           WHERE schemaname = 'pyreplica' AND relname LIKE 'replica\\_log\\_%'"""
NAME = "bloat"
PRUNE_EVERY = 10        # the daemon's (replicator.PRUNE_EVERY): a caught-up log shrinks within it


def log_figures(master):
    time.sleep(1)       # let the backends' statistics reach pg_stat
    return float(master.scalar(LOG_MB)), int(master.scalar(DEAD))


def caught_up(master, slave):
    return applied(slave, NAME) >= master.scalar("SELECT count(*) FROM bloat")


def measure(master_cluster, slave_cluster, scale, progress=print):
    master, slave = DB(master_cluster, "bloat"), DB(slave_cluster, "bloat")
    master.execute(SCHEMA)
    slave.execute(SCHEMA)
    master.install_master()
    master.capture("bloat")
    master.execute("SELECT pyreplica.register_slave(%s)", (NAME,))
    warmup = max(1, round(scale.bloat_seconds / 20))        # pgbench -T takes whole seconds
    with start_daemon(master, slave, NAME):
        pgbench(master, INSERT, clients=2, seconds=warmup)
        start_mb, _ = log_figures(master)
        pgbench(master, INSERT, clients=2, seconds=max(1, round(scale.bloat_seconds)))
        events = master.scalar("SELECT count(*) FROM bloat")
        wait_until(lambda: caught_up(master, slave), scale.timeout, 0.2, "the daemon to catch up")
        end_mb, dead = log_figures(master)
    progress(f"bloat: {events:,} events in {scale.bloat_seconds:g} s, log {start_mb:.1f} -> {end_mb:.1f} MB, "
             f"{dead} dead tuples")
    before = master.scalar("SELECT count(*) FROM bloat")
    pgbench(master, INSERT, clients=2, seconds=max(1, round(scale.bloat_stopped_seconds)))
    unapplied = master.scalar("SELECT count(*) FROM bloat") - before
    stopped_mb, _ = log_figures(master)
    with start_daemon(master, slave, NAME):
        wait_until(lambda: caught_up(master, slave), scale.timeout, 0.2, "the daemon to catch up")
        time.sleep(PRUNE_EVERY + 2)
        after_mb, after_dead = log_figures(master)
    progress(f"bloat: slave stopped: log {stopped_mb:.1f} MB with {unapplied:,} unapplied events, "
             f"{after_mb:.1f} MB after catch-up")
    rows = [(f"{scale.bloat_seconds:g} s of single-row INSERTs (2 clients), daemon keeping up", "pyreplica",
             f"{events:,} events; log {start_mb:.1f} MB after warm-up, {end_mb:.1f} MB at the end; "
             f"{dead} dead tuples"),
            (f"daemon stopped for {scale.bloat_stopped_seconds:g} s of writes, then started", "pyreplica",
             f"log {stopped_mb:.1f} MB holding {unapplied:,} unapplied events; {after_mb:.1f} MB after "
             f"catch-up; {after_dead} dead tuples")]
    return rows, {"log_mb_start": start_mb, "log_mb_end": end_mb, "log_dead_tuples": dead,
                  "log_mb_slave_stopped": stopped_mb, "log_mb_after_catchup": after_mb}
