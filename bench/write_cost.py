"""Master write cost: what capturing changes adds to the writers' transactions.

Variants, each in its own database holding the same tables and rows:
  none       no trigger (wal_level = replica)
  pyreplica  pyreplica's capture triggers (py_log_create_tg), no daemon running
  pgq        PgQ's C row trigger pgq.sqltriga into a queue, no consumer (skipped without the extension)
  native     wal_level = logical, a publication FOR TABLE, and an active subscription on the slave
             cluster, so the walsender decodes the WAL as it is written (on this same machine)
The first three live in one cluster at wal_level = replica, native in the cluster at wal_level =
logical; both have fsync, synchronous_commit and full_page_writes on.

Workloads:
  - pgbench -c2 -j2 single-row INSERT and single-row UPDATE transactions, with synchronous_commit on
    and off (PGOPTIONS), one INSERT ... SELECT generate_series(1, N), and one UPDATE of those N rows
    in a session that first updated one row: wall-clock figures;
  - writer CPU: the same single-row INSERT and UPDATE (pgbench -c2, synchronous_commit on); the CPU
    time the server spends in pgbench's backends per transaction, from the kernel's accounting of
    those processes (common.pgbench_cpu: read after a warm-up and again `cpu_seconds` later, divided
    by the transactions pgbench's log shows completed in between). It does not move with the
    machine's load the way wall-clock tps does. For native, the row also shows the walsender's CPU
    per transaction over the same window (decoding is done there, not in the writer's backend);
  - clients: tps of the single-row INSERT and UPDATE at 1, 4, 8 and 16 clients (pgbench -c N
    -j min(N, 4)), synchronous_commit on: what concurrent committers pay (a trigger that NOTIFYs
    serialises commits). tps is counted from pgbench's per-transaction log over `clients_seconds`
    after a 0.5 s warm-up (common.pgbench_tps), so each new backend's one-off start-up (16 PL/Python
    interpreters on 2 cores) does not weigh on short runs.
Rounds interleave the variants (round r runs every variant of every workload, the variants' order
rotated by one each round so none always runs first) and each figure is the median over rounds; a
tps ratio "vs no trigger" is the median of the rounds' ratios (each from two runs close in time).
A CHECKPOINT precedes every run so each starts with the same full-page-write state.
"""
from psycopg2 import sql

from .common import (DB, create_subscription, median, pgbench, pgbench_cpu, pgbench_tps, pgq_available, timed,
                     wait_subscription_ready)

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
# Every row the bulk INSERT wrote, in a session that first updated one row: a pooled connection's
# usual history, and the one that once made the capture's UPDATE pairing quadratic (a plan made
# for the first statement's row count is kept for the session).
BULK_UPDATE_FIRST = "UPDATE bulk SET k = k + 1 WHERE id = 1"
BULK_UPDATE = "UPDATE bulk SET k = k + 1"

SYNC_OFF = "-c synchronous_commit=off"

# (key, label, script or None for the bulk statements, PGOPTIONS)
WORKLOADS = (
    ("single_insert", "single-row INSERT", INSERT_SCRIPT, None),
    ("single_update", "single-row UPDATE", UPDATE_SCRIPT, None),
    ("single_insert_async", "single-row INSERT, synchronous_commit=off", INSERT_SCRIPT, SYNC_OFF),
    ("single_update_async", "single-row UPDATE, synchronous_commit=off", UPDATE_SCRIPT, SYNC_OFF),
    ("bulk_insert", "INSERT ... SELECT generate_series", None, None),
    ("bulk_update", "UPDATE of all those rows, after a one-row UPDATE in the session", None, None),
)

# (key, label, script): the single-row workloads of the CPU and clients measurements
SINGLE = (("insert", "single-row INSERT", INSERT_SCRIPT), ("update", "single-row UPDATE", UPDATE_SCRIPT))
CPU_CLIENTS = 2
CLIENTS = (1, 4, 8, 16)
# the walsender of the native variant's subscription (its application_name is the subscription's)
WALSENDER = "SELECT pid FROM pg_stat_replication WHERE application_name = 'write_sub'"


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
    """One measurement: (tps, latency µs) for a pgbench workload, seconds for a bulk statement
    (the bulk UPDATE runs on the rows the bulk INSERT before it wrote)."""
    key, _, script, options = workload
    if key == "bulk_insert":
        db.execute("TRUNCATE bulk")
        db.checkpoint()
        return timed(db, BULK, (scale.bulk_rows,))
    if key == "bulk_update":
        db.checkpoint()
        return timed(db, BULK_UPDATE, before=BULK_UPDATE_FIRST)
    db.checkpoint()
    return pgbench(db, script, seconds=scale.pgbench_seconds, transactions=scale.pgbench_transactions,
                   options=options, define={"rows": scale.update_rows})


def run_cpu(db, variant, script, scale):
    """(backend µs/tx, walsender µs/tx or None) of the single-row workload."""
    db.checkpoint()
    return pgbench_cpu(db, script, CPU_CLIENTS, scale.cpu_seconds, define={"rows": scale.update_rows},
                       others_sql=WALSENDER if variant == "native" else None)


def run_clients(db, script, clients, scale):
    db.checkpoint()
    return pgbench_tps(db, script, clients, seconds=scale.clients_seconds, transactions=scale.clients_transactions,
                       define={"rows": scale.update_rows}, jobs=min(clients, 4))


def measure(plain, logical, slave, scale, progress=print):
    """[(section title, rows)], ratios."""
    dbs = setup(plain, logical, slave, scale)
    samples = {(w[0], v): [] for w in WORKLOADS for v in VARIANTS}
    cpu = {(w, v): [] for w, _, _ in SINGLE for v in VARIANTS}
    tps = {(w, n, v): [] for w, _, _ in SINGLE for n in CLIENTS for v in VARIANTS}
    for round_no in range(scale.rounds):
        shift = round_no % len(VARIANTS)
        present = [v for v in VARIANTS[shift:] + VARIANTS[:shift] if isinstance(dbs[v], DB)]
        for workload in WORKLOADS:
            for variant in present:
                samples[workload[0], variant].append(run_one(dbs[variant], workload, scale))
        for key, _, script in SINGLE:
            for variant in present:
                cpu[key, variant].append(run_cpu(dbs[variant], variant, script, scale))
        for clients in CLIENTS:
            for key, _, script in SINGLE:
                for variant in present:
                    tps[key, clients, variant].append(run_clients(dbs[variant], script, clients, scale))
        progress(f"write cost: round {round_no + 1}/{scale.rounds} done")
    rows, ratios = summarize(dbs, samples, scale)
    cpu_rows, cpu_ratios = summarize_cpu(dbs, cpu)
    clients_rows, clients_ratios = summarize_clients(dbs, tps)
    sections = [("Master write cost", rows),
                (f"Writer CPU per transaction (server backends of pgbench -c{CPU_CLIENTS}, synchronous_commit on)",
                 cpu_rows),
                ("Throughput by clients (synchronous_commit on)", clients_rows)]
    return sections, {**ratios, **cpu_ratios, **clients_ratios}


def summarize_cpu(dbs, cpu):
    rows, ratios = [], {}
    for key, label, _ in SINGLE:
        label = f"{label}, writer backend CPU"
        us = {v: median([b for b, _ in cpu[key, v]]) if isinstance(dbs[v], DB) else float("nan")
              for v in VARIANTS}
        for variant in VARIANTS:
            if not isinstance(dbs[variant], DB):
                rows.append((label, variant, dbs[variant]))
                continue
            text = f"{us[variant]:,.1f} µs/tx"
            if variant != "none":
                text += f", {us[variant] - us['none']:+,.1f} µs vs no trigger"
            if variant == "native":
                walsender = median([w for _, w in cpu[key, variant] if w is not None])
                text += f" (and its walsender {walsender:,.1f} µs/tx)"
                ratios[f"write_cpu_{key}_native_walsender_us"] = walsender
            rows.append((label, variant, text))
        added = {v: us[v] - us["none"] for v in VARIANTS}
        ratios[f"write_cpu_{key}_vs_pgq"] = added_ratio(added["pyreplica"], added["pgq"])
        ratios[f"write_cpu_{key}_added_us"] = added["pyreplica"]
        ratios[f"write_cpu_{key}_pgq_added_us"] = added["pgq"]
        ratios[f"write_cpu_{key}_native_added_us"] = added["native"]
        ratios[f"write_cpu_{key}_us"] = us["pyreplica"]
        ratios[f"write_cpu_{key}_no_trigger_us"] = us["none"]
    return rows, ratios


def summarize_clients(dbs, tps):
    rows, ratios = [], {}
    for key, label, _ in SINGLE:
        for clients in CLIENTS:
            row_label = f"{label}, {clients} client{'s' if clients > 1 else ''}"
            base = tps[key, clients, "none"]
            for variant in VARIANTS:
                if not isinstance(dbs[variant], DB):
                    rows.append((row_label, variant, dbs[variant]))
                    if variant != "none":
                        ratios[ratio_key(key, clients, variant)] = float("nan")
                    continue
                text = f"{median(tps[key, clients, variant]):,.0f} tps"
                if variant != "none":
                    # rounds pair each variant's run with no trigger's run of the same round
                    ratio = median([ours / theirs for ours, theirs in zip(tps[key, clients, variant], base)])
                    ratios[ratio_key(key, clients, variant)] = ratio
                    text += f" ({ratio:.2f}x no trigger)"
                rows.append((row_label, variant, text))
    return rows, ratios


def ratio_key(key, clients, variant):
    """tps_insert_8c_vs_no_trigger (pyreplica), tps_insert_8c_pgq_vs_no_trigger, ..._native_..."""
    who = "" if variant == "pyreplica" else f"{variant}_"
    return f"tps_{key}_{clients}c_{who}vs_no_trigger"


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
            ratios[f"{key}_vs_no_trigger"] = added["pyreplica"]
            ratios[f"{key}_pgq_vs_no_trigger"] = added["pgq"]
            ratios[f"{key}_native_vs_no_trigger"] = added["native"]
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
