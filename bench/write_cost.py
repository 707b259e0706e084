"""Master write cost: what capturing changes adds to the writers' transactions.

Variants, each in its own database holding the same tables and rows:
  none       no trigger (wal_level = replica)
  pyreplica  pyreplica's capture triggers (py_log_create_tg), no daemon running
  pgq        PgQ's C row trigger pgq.sqltriga into a queue, no consumer (skipped without the extension)
  native     wal_level = logical, a publication FOR TABLE, and an active subscription on the slave
             cluster, so the walsender decodes the WAL as it is written (on this same machine)
The first three live in one cluster at wal_level = replica, native in the cluster at wal_level =
logical; both have fsync, synchronous_commit and full_page_writes on.

Workloads: pgbench -c2 -j2 single-row INSERT and single-row UPDATE transactions, with
synchronous_commit on and off (PGOPTIONS), and one INSERT ... SELECT generate_series(1, N).
Rounds interleave the variants (round r runs every variant of every workload) and each figure is
the median over rounds; a CHECKPOINT precedes every run so each starts with the same full-page-write
state.
"""
from psycopg2 import sql

from .common import DB, create_subscription, median, pgbench, pgq_available, timed, wait_subscription_ready

VARIANTS = ("none", "pyreplica", "pgq", "native")

SCHEMA = """
CREATE TABLE wt (id bigserial PRIMARY KEY, k int NOT NULL, v text NOT NULL);
CREATE TABLE bulk (id bigint PRIMARY KEY, k int NOT NULL, v text NOT NULL);
"""
PREFILL = "INSERT INTO wt (k, v) SELECT g, 'prefilled row ' || g FROM generate_series(1, %s) g"

INSERT_SCRIPT = """\\set k random(1, 1000000)
INSERT INTO wt (k, v) VALUES (:k, 'pgbench single-row insert');
"""
UPDATE_SCRIPT = """\\set id random(1, :rows)
UPDATE wt SET k = k + 1 WHERE id = :id;
"""
BULK = "INSERT INTO bulk (id, k, v) SELECT g, g %% 1000, 'bulk row ' || g FROM generate_series(1, %s) g"

SYNC_OFF = "-c synchronous_commit=off"

# (key, label, script or None for the bulk INSERT, PGOPTIONS)
WORKLOADS = (
    ("single_insert", "single-row INSERT", INSERT_SCRIPT, None),
    ("single_update", "single-row UPDATE", UPDATE_SCRIPT, None),
    ("single_insert_async", "single-row INSERT, synchronous_commit=off", INSERT_SCRIPT, SYNC_OFF),
    ("single_update_async", "single-row UPDATE, synchronous_commit=off", UPDATE_SCRIPT, SYNC_OFF),
    ("bulk_insert", "INSERT ... SELECT generate_series", None, None),
)


def setup(plain, logical, slave, scale):
    """One database per variant; returns {variant: DB or a 'skipped: why' string}."""
    dbs = {}
    for variant in VARIANTS:
        if variant == "pgq" and not pgq_available(plain):
            dbs[variant] = "skipped: the pgq extension is not installed (apt-get install postgresql-15-pgq3)"
            continue
        db = DB(logical if variant == "native" else plain, f"write_{variant}")
        db.execute(SCHEMA)
        db.execute(PREFILL, (scale.update_rows,))
        db.execute("VACUUM ANALYZE")
        if variant == "pyreplica":
            db.install_master()
            db.capture("wt")
            db.capture("bulk")
        elif variant == "pgq":
            db.execute("CREATE EXTENSION pgq")
            db.execute("SELECT pgq.create_queue('bench')")
            for table in ("wt", "bulk"):
                db.execute(sql.SQL("CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} "
                                   "FOR EACH ROW EXECUTE FUNCTION pgq.sqltriga('bench')").format(
                    sql.Identifier(f"{table}_pgq"), sql.Identifier(table)))
        elif variant == "native":
            db.execute("CREATE PUBLICATION write_pub FOR TABLE wt, bulk")
            sub = DB(slave, "write_native_sub")
            sub.execute(SCHEMA)
            create_subscription(sub, db, "write_sub", "write_pub")
            wait_subscription_ready(sub, "write_sub")
        dbs[variant] = db
    return dbs


def run_one(db, workload, scale):
    """One measurement: (tps, latency µs) for a pgbench workload, seconds for the bulk INSERT."""
    key, _, script, options = workload
    if script is None:
        db.execute("TRUNCATE bulk")
        db.checkpoint()
        return timed(db, BULK, (scale.bulk_rows,))
    db.checkpoint()
    return pgbench(db, script, seconds=scale.pgbench_seconds, transactions=scale.pgbench_transactions,
                   options=options, define={"rows": scale.update_rows})


def measure(plain, logical, slave, scale, progress=print):
    dbs = setup(plain, logical, slave, scale)
    samples = {(w[0], v): [] for w in WORKLOADS for v in VARIANTS}
    for round_no in range(scale.rounds):
        for workload in WORKLOADS:
            for variant in VARIANTS:
                if isinstance(dbs[variant], DB):
                    samples[workload[0], variant].append(run_one(dbs[variant], workload, scale))
        progress(f"write cost: round {round_no + 1}/{scale.rounds} done")
    return summarize(dbs, samples, scale)


def summarize(dbs, samples, scale):
    """Rows for the table and the ratios."""
    rows, ratios = [], {}
    for key, label, script, _ in WORKLOADS:
        base = None
        added = {}
        for variant in VARIANTS:
            if not isinstance(dbs[variant], DB):
                rows.append((label, variant, dbs[variant]))
                added[variant] = float("nan")
                continue
            values = samples[key, variant]
            if script is None:
                seconds = median(values)
                base = seconds if variant == "none" else base
                text = f"{seconds:.2f} s for {scale.bulk_rows:,} rows ({seconds / base:.2f}x no trigger)"
                added[variant] = seconds / base
            else:
                tps = median([tps for tps, _ in values])
                latency = median([lat for _, lat in values])
                base = latency if variant == "none" else base
                added[variant] = latency - base
                text = f"{tps:,.0f} tps, {latency:,.0f} µs/tx" + (
                    "" if variant == "none" else f", {latency - base:+,.0f} µs vs no trigger")
            rows.append((label, variant, text))
        if script is None:
            ratios["bulk_insert_vs_no_trigger"] = added["pyreplica"]
            ratios["bulk_insert_pgq_vs_no_trigger"] = added["pgq"]
            ratios["bulk_insert_native_vs_no_trigger"] = added["native"]
        else:
            ratios[f"write_{key}_trigger_vs_pgq"] = added_ratio(added["pyreplica"], added["pgq"])
            ratios[f"write_{key}_added_us"] = added["pyreplica"]
            ratios[f"write_{key}_pgq_added_us"] = added["pgq"]
    return rows, ratios


def added_ratio(ours, theirs):
    """ours / theirs for added µs. Behind a synchronous commit's flush PgQ's added time can be zero or
    negative (noise): then inf if ours is positive (PgQ adds nothing measurable, we do), 1 if neither
    adds anything measurable; nan when PgQ was skipped."""
    if theirs != theirs:
        return float("nan")
    if theirs > 0:
        return ours / theirs
    return float("inf") if ours > 0 else 1.0
