-- pyreplica: master side.
--
--   psql somedb -f master-install.sql          (as a superuser)
--
-- Everything lives in the schema `pyreplica`, created and owned by the installing superuser, where
-- no other role may create anything (docs/design.md §2): the log pyreplica.replica_log (+ sequence
-- replica_log_id_seq), the slave registry pyreplica.replica_slaves, the ticks (pyreplica.ticks: the
-- end points of catch-up steps), the capture trigger function py_log_replica, the functions that
-- manage capture, and the daemon's API (register, claim, confirm, touch, prune, drop,
-- captured_tables, unapplied, batch_end). Every pyreplica function carries a comment
-- starting 'pyreplica:', which is how the REVOKE loop below and master-uninstall.sql find them.
--
-- The install guide's names keep working through thin entry points in schema public:
-- py_log_create_tg(text), py_log_drop_tg(text), py_log_sql(text) and the view replica_log.
-- A NOLOGIN role pyreplica_daemon gets exactly what a daemon needs (README "Security").
--
-- Running it again changes nothing and loses no log row; a previous install whose objects are in
-- schema public (pyreplica 1, or the original PyReplica's replica_log) is upgraded: rows move over.
-- It refuses, changing nothing, when an object it would create already exists with an owner that
-- is not a superuser (someone planted it), or while one of pyreplica's batches is prepared here.
-- The whole script is one transaction: on any error nothing is left half-installed.

\set ON_ERROR_STOP on
BEGIN;
SET LOCAL client_min_messages = warning;
-- Nothing below may resolve to an object someone planted: only pg_catalog is searched.
SET LOCAL search_path = pg_catalog, pg_temp;
-- Never queue an exclusive lock in front of every writer for long.
SET LOCAL lock_timeout = '10s';

DO $check$
DECLARE
    planted text;
    doubt   record;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'pyreplica: master-install.sql must be run by a superuser (role "%" is not one)', current_user
            USING HINT = 'Run it as postgres, e.g.: sudo -u postgres psql somedb -f master-install.sql';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'plpython3u') THEN
        RAISE EXCEPTION 'pyreplica: PL/Python (plpython3u) is not available on this server'
            USING HINT = format('Install the package postgresql-plpython3-%s (apt-get install postgresql-plpython3-%s) and run this script again.',
                                current_setting('server_version_num')::int / 10000,
                                current_setting('server_version_num')::int / 10000);
    END IF;

    -- Objects this script would create or adopt, owned by a role that is not a superuser.
    SELECT string_agg(what, '; ') INTO planted FROM (
        SELECT format('schema pyreplica (owner %s)', n.nspowner::regrole) AS what
          FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
         WHERE n.nspname = 'pyreplica' AND NOT r.rolsuper
        UNION ALL
        SELECT format('%s %s (owner %s)', CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view' ELSE 'relation' END,
                      c.oid::regclass, c.relowner::regrole)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_roles r ON r.oid = c.relowner
         WHERE NOT r.rolsuper
           AND (n.nspname = 'pyreplica'
                OR (n.nspname = 'public' AND c.relname IN ('replica_log', 'replica_log_id_seq', 'replica_slaves')))
        UNION ALL
        SELECT format('function %s (owner %s)', p.oid::regprocedure, p.proowner::regrole)
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_roles r ON r.oid = p.proowner
         WHERE NOT r.rolsuper
           AND (n.nspname = 'pyreplica'
                OR (n.nspname = 'public' AND p.proname IN ('py_log_create_tg', 'py_log_drop_tg', 'py_log_sql',
                                                                'py_log_create_seq', 'py_log_drop_seq',
                                                                'py_log_sql_only')))
        UNION ALL
        SELECT format('type %s (owner %s)', t.oid::regtype, t.typowner::regrole)
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_roles r ON r.oid = t.typowner
         WHERE n.nspname = 'pyreplica' AND NOT r.rolsuper
        UNION ALL
        SELECT format('schema pyreplica lets %s create objects in it', a.grantee::regrole)
          FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a
         WHERE n.nspname = 'pyreplica' AND a.privilege_type = 'CREATE' AND a.grantee <> n.nspowner
    ) found;
    IF planted IS NOT NULL THEN
        RAISE EXCEPTION 'pyreplica: refusing to install: % already exist(s) and belong(s) to a role that is not a superuser', planted
            USING HINT = 'Someone else created these names: find out why, drop them as a superuser, then run this script again.';
    END IF;

    -- Re-installing behind a prepared (in-doubt) batch would wait for its locks, and every writer
    -- of a replicated table would queue behind us.
    SELECT gid, prepared INTO doubt FROM pg_prepared_xacts
     WHERE database = current_database() AND gid LIKE 'pyreplica:%' ORDER BY prepared LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pyreplica: a batch is prepared (in doubt) on this master since % (%): settle it first with `pyreplica recover MASTER SLAVE --name %` or by starting its daemon, then run this script again',
                        doubt.prepared, doubt.gid, split_part(doubt.gid, ':', 2);
    END IF;
END
$check$;

-- PL/Python. If this script creates it, it says so in the extension's comment, and
-- master-uninstall.sql drops it again (when nothing else uses it); one already there is left alone.
DO $lang$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'plpython3u') THEN
        CREATE EXTENSION plpython3u;
        COMMENT ON EXTENSION plpython3u IS
            'PL/Python3U untrusted procedural language (created by pyreplica master-install.sql)';
    END IF;
END
$lang$;

-- The daemon's role (cluster-wide: it may exist already from another database's install).
DO $role$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pyreplica_daemon') THEN
        CREATE ROLE pyreplica_daemon NOLOGIN;
        COMMENT ON ROLE pyreplica_daemon IS
            'pyreplica: what a replication daemon needs on a master (created by pyreplica master-install.sql)';
    END IF;
END
$role$;

CREATE SCHEMA IF NOT EXISTS pyreplica;
REVOKE ALL ON SCHEMA pyreplica FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- The log (one row per row change, per TRUNCATE, or per administrator's statement) and the
-- slave registry. Created only when missing, so that a re-run takes no lock on them.
-- ---------------------------------------------------------------------------------------------
DO $tables$
BEGIN
    -- Up to pyreplica 3 the log was one plain table (pruned by DELETE): converted once, in this
    -- transaction, to the partitioned log below (its rows kept; the view over it is re-made below).
    IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('pyreplica.replica_log')) = 'r' THEN
        ALTER TABLE pyreplica.replica_log RENAME TO replica_log_unpartitioned;
        ALTER TABLE pyreplica.replica_log_unpartitioned DROP CONSTRAINT IF EXISTS replica_log_pkey;
        DROP INDEX IF EXISTS pyreplica.replica_log_txid_idx;      -- (the names are the new log's)
        DROP FUNCTION IF EXISTS pyreplica.unapplied(pg_snapshot);     -- returns the old table's row type
        IF obj_description(to_regclass('public.replica_log'), 'pg_class') LIKE 'pyreplica:%' THEN
            DROP VIEW public.replica_log;
        END IF;
    END IF;
    IF to_regclass('pyreplica.replica_log') IS NULL THEN
        IF to_regclass('pyreplica.replica_log_id_seq') IS NULL THEN
            CREATE SEQUENCE pyreplica.replica_log_id_seq;
        END IF;
        -- Three partitions written in turn, 100,000 ids each (docs/design.md §3): consumed events
        -- leave by TRUNCATE of a whole partition (prune), never by DELETE, so the log does not bloat.
        CREATE TABLE pyreplica.replica_log (
            id       bigint      NOT NULL DEFAULT nextval('pyreplica.replica_log_id_seq'),
            sql      text        NOT NULL,
            username name        NOT NULL DEFAULT session_user,
            ts       timestamptz NOT NULL DEFAULT now(),
            txid     xid8        NOT NULL DEFAULT pg_current_xact_id(),   -- the writing transaction
            relname  text,                                                -- "schema"."table", quoted
            op       "char"      NOT NULL DEFAULT 'S'                     -- I U D T, or S: administrator's SQL
        ) PARTITION BY LIST (((id / 100000) % 3));
        CREATE TABLE pyreplica.replica_log_0 PARTITION OF pyreplica.replica_log FOR VALUES IN (0);
        CREATE TABLE pyreplica.replica_log_1 PARTITION OF pyreplica.replica_log FOR VALUES IN (1);
        CREATE TABLE pyreplica.replica_log_2 PARTITION OF pyreplica.replica_log FOR VALUES IN (2);
        ALTER SEQUENCE pyreplica.replica_log_id_seq OWNED BY pyreplica.replica_log.id;
        -- Batches are chosen by transaction id (docs/design.md §4), events replayed in id order.
        CREATE INDEX replica_log_txid_idx ON pyreplica.replica_log (txid);
        CREATE INDEX replica_log_id_idx ON pyreplica.replica_log (id);
        COMMENT ON TABLE pyreplica.replica_log IS
            'pyreplica: every replicated change as the SQL statement that repeats it on a slave';
        REVOKE ALL ON pyreplica.replica_log, pyreplica.replica_log_0, pyreplica.replica_log_1,
                      pyreplica.replica_log_2, pyreplica.replica_log_id_seq FROM PUBLIC;
        GRANT SELECT ON pyreplica.replica_log TO pyreplica_daemon;
        IF to_regclass('pyreplica.replica_log_unpartitioned') IS NOT NULL THEN
            INSERT INTO pyreplica.replica_log SELECT * FROM pyreplica.replica_log_unpartitioned;
            DROP TABLE pyreplica.replica_log_unpartitioned;
        END IF;
    END IF;
    -- Administrators' statements of a batch, which batch_start looks for (MAY_RUN_ALONE in
    -- master.py): without it a catch-up scanned a whole 50,000-event step (40 ms) to find none.
    -- (Also created by an upgrade; the few rows it holds cost writers one index open per statement.)
    CREATE INDEX IF NOT EXISTS replica_log_admin_idx ON pyreplica.replica_log (txid) WHERE op = 'S';
    IF to_regclass('pyreplica.replica_slaves') IS NULL THEN
        CREATE TABLE pyreplica.replica_slaves (
            name          text        PRIMARY KEY,
            confirmed     pg_snapshot NOT NULL,    -- the master snapshot the slave has applied up to
            batch_id      bigint      NOT NULL DEFAULT 0,
            applied       bigint      NOT NULL DEFAULT 0,   -- events applied since registration
            confirmed_at  timestamptz NOT NULL DEFAULT now(),
            last_contact  timestamptz NOT NULL DEFAULT now(),
            registered_at timestamptz NOT NULL DEFAULT now(),
            -- the slave this name belongs to, claimed by its first daemon start (docs/design.md §6)
            slave_system_id text,
            slave_database  text,
            -- where the slave started (its registration): a slave that never committed a batch
            -- starts there, whatever its record says since
            start_snapshot  pg_snapshot
        );
        COMMENT ON TABLE pyreplica.replica_slaves IS 'pyreplica: one row per slave, its confirmed position';
        REVOKE ALL ON pyreplica.replica_slaves FROM PUBLIC;
        GRANT SELECT ON pyreplica.replica_slaves TO pyreplica_daemon;
    END IF;
    IF to_regclass('pyreplica.log_pruned') IS NULL THEN
        -- One row once events have been removed: from then on a slave that was never registered
        -- cannot start from "the oldest event" (docs/design.md §6).
        CREATE TABLE pyreplica.log_pruned (
            one       boolean     PRIMARY KEY DEFAULT true CHECK (one),
            horizon   xid8        NOT NULL,     -- events of transactions below it are gone
            pruned_at timestamptz NOT NULL DEFAULT now()
        );
        COMMENT ON TABLE pyreplica.log_pruned IS 'pyreplica: how far the log has been pruned';
        REVOKE ALL ON pyreplica.log_pruned FROM PUBLIC;
        GRANT SELECT ON pyreplica.log_pruned TO pyreplica_daemon;
    END IF;
    IF to_regclass('pyreplica.ticks') IS NULL THEN
        -- Master snapshots recorded as time passes (PgQ's ticks): the end points a catch-up may stop
        -- at, so that a backlog is applied in bounded, committed steps (docs/design.md §4).
        CREATE TABLE pyreplica.ticks (
            snapshot      pg_snapshot NOT NULL,   -- as any other session saw the master at that moment
            snapshot_xmax xid8        NOT NULL,   -- pg_snapshot_xmax(snapshot): ticks in snapshot order
            last_id       bigint      NOT NULL,   -- the log's sequence then: events between two ticks, about
            ts            timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        CREATE INDEX ticks_snapshot_xmax_idx ON pyreplica.ticks (snapshot_xmax);
        CREATE INDEX ticks_last_id_idx ON pyreplica.ticks (last_id);
        CREATE INDEX ticks_ts_idx ON pyreplica.ticks (ts);
        COMMENT ON TABLE pyreplica.ticks IS 'pyreplica: master snapshots recorded as time passes, the end points of catch-up steps';
        REVOKE ALL ON pyreplica.ticks FROM PUBLIC;
        GRANT SELECT ON pyreplica.ticks TO pyreplica_daemon;
    END IF;
END
$tables$;
GRANT USAGE ON SCHEMA pyreplica TO pyreplica_daemon;

-- ---------------------------------------------------------------------------------------------
-- Capture.
--
-- Four statement-level AFTER triggers per table (INSERT, UPDATE, DELETE, TRUNCATE) with
-- transition tables: the statements for all rows a statement touched are rendered by one
-- INSERT ... SELECT inside the server, so a 200,000-row INSERT costs one trigger call.
-- Values are rendered with format('%L'), i.e. the type's own output function, under pinned
-- settings (the SET clauses below), so the slave parses them back identically whatever its
-- session's TimeZone, DateStyle, IntervalStyle, extra_float_digits or standard_conforming_strings.
-- ---------------------------------------------------------------------------------------------

-- Quoted names of a table's primary-key columns, in key order (NULL: no primary key).
CREATE OR REPLACE FUNCTION pyreplica.py_log_pk(rel regclass)
RETURNS text[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT array_agg(quote_ident(a.attname) ORDER BY k.ord)
      FROM pg_index i
     CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary;
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_pk(regclass) IS 'pyreplica: quoted primary-key columns of a table';

-- The query that logs one statement's rows of table `rel` for operation `op` (I, U, D, T).
-- py_log_replica prepares it once per backend, table and column signature.
CREATE OR REPLACE FUNCTION pyreplica.py_log_capture_sql(rel regclass, op "char")
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
-- the writer's session may quote every name it prints: the log's relname must be the one the
-- daemon's TABLES patterns and the slave's table states name (called once per backend and table)
SET quote_all_identifiers = off
AS $fn$
DECLARE
    target    text := format('%I.%I', (SELECT nspname FROM pg_namespace n JOIN pg_class c ON c.relnamespace = n.oid WHERE c.oid = rel),
                                      (SELECT relname FROM pg_class WHERE oid = rel));
    cols      text[];      -- quoted names of the columns a statement writes (no generated ones)
    pk        text[] := pyreplica.py_log_pk(rel);
    overriding text := '';
    carried   text[];      -- the columns an UPDATE's pairing carries: cols, then any key column not in cols
    stmt      text;
BEGIN
    SELECT array_agg(quote_ident(attname) ORDER BY attnum),
           bool_or(attidentity = 'a')
      INTO cols, overriding
      FROM pg_attribute
     WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped AND attgenerated = '';
    overriding := CASE WHEN overriding::bool THEN ' OVERRIDING SYSTEM VALUE' ELSE '' END;

    IF op = 'T' THEN
        -- No CASCADE: a TRUNCATE that cascaded here fired this trigger on every table it emptied,
        -- each logging its own event in this transaction; the slave replays consecutive ones as one
        -- TRUNCATE of exactly those tables, and never empties a slave-only table.
        RETURN format($q$INSERT INTO pyreplica.replica_log (txid, relname, op, sql)
                         VALUES (pg_current_xact_id(), %L, 'T', %L)$q$,
                      target, 'TRUNCATE ' || target);
    END IF;
    IF pk IS NULL THEN
        RAISE EXCEPTION 'pyreplica: table % has no primary key and cannot be replicated', target;
    END IF;

    IF op = 'I' THEN
        -- INSERT INTO t (a, b) VALUES ('1', 'x')
        -- (ARRAY[...], not concat_ws(...): a function call takes at most 100 arguments)
        stmt := format($q$%L || array_to_string(ARRAY[%s], ', ') || ')'$q$,
                       format('INSERT INTO %s (%s)%s VALUES (', target, array_to_string(cols, ', '), overriding),
                       (SELECT string_agg(format('format(''%%L'', n.%s)', c), ', ') FROM unnest(cols) c));
        RETURN format($q$INSERT INTO pyreplica.replica_log (txid, relname, op, sql)
                         SELECT pg_current_xact_id(), %L, 'I', %s FROM pyreplica_new n$q$, target, stmt);
    ELSIF op = 'D' THEN
        -- DELETE FROM t WHERE id = '1'
        stmt := format($q$%L || %s$q$, format('DELETE FROM %s WHERE ', target),
                       (SELECT string_agg(format($e$%L || format('%%L', o.%s)$e$, c || ' = ', c), $s$ || ' AND ' || $s$) FROM unnest(pk) c));
        RETURN format($q$INSERT INTO pyreplica.replica_log (txid, relname, op, sql)
                         SELECT pg_current_xact_id(), %L, 'D', %s FROM pyreplica_old o$q$, target, stmt);
    ELSIF op = 'U' THEN
        -- UPDATE t SET b = 'y' WHERE id = '1'; only changed columns, nothing for a no-op row.
        -- Old and new rows are paired by position: PostgreSQL appends each updated row's old and
        -- new versions to the two transition tables in lockstep (trigger.c, TransitionTableAddTuple),
        -- so the k-th row of one is the k-th row of the other, even when the primary key changed.
        -- Each row's values are formatted once, into one text[] (what is compared and written).
        -- The pairing is one pass and never a join: the old rows, then the new ones (UNION ALL keeps
        -- that order), and each new row reads its old row's array n rows back with lag(), n the
        -- number of old rows (carried by the new rows only; lag's offset is an integer, so one UPDATE
        -- statement may change at most 2^31 - 1 rows of a captured table). A join would be planned
        -- once per backend, for the first statement's row count: a nested loop after a one-row
        -- UPDATE, quadratic for a 20,000-row UPDATE later in the same session (82 s, not 0.5 s).
        -- The window emits rows in the order it reads them, so events keep the statement's order.
        -- Values are compared by their text form, which works for every type (json has no "=")
        -- and sees changes "=" would hide (1.0 -> 1.00), byte for byte (COLLATE "C"): under a
        -- column's nondeterministic collation 'abc' and 'ABC' would compare equal.
        carried := cols || ARRAY(SELECT c FROM unnest(pk) c WHERE c <> ALL (cols));
        stmt := format('ARRAY[%s]', (SELECT string_agg(format('format(''%%L'', %s)', c), ', ') FROM unnest(carried) c));
        RETURN format($q$INSERT INTO pyreplica.replica_log (txid, relname, op, sql)
                         SELECT pg_current_xact_id(), %L, 'U', %L || s.set_list || %L || %s
                           FROM (SELECT b.is_new, lag(b.v, b.n) OVER () AS o, b.v AS n
                                   FROM (SELECT false, 0, %s FROM pyreplica_old
                                         UNION ALL
                                         SELECT true, (SELECT count(*) FROM pyreplica_old)::int, %5$s FROM pyreplica_new) AS b(is_new, n, v)) AS p
                          CROSS JOIN LATERAL (SELECT array_to_string(ARRAY[%s], ', ') AS set_list) s
                          WHERE p.is_new AND s.set_list <> ''$q$,
                      target, format('UPDATE %s SET ', target), ' WHERE ',
                      (SELECT string_agg(format($e$%L || p.o[%s]$e$, c || ' = ', array_position(carried, c)), $s$ || ' AND ' || $s$)
                         FROM unnest(pk) c),
                      stmt,
                      (SELECT string_agg(format($e$CASE WHEN p.o[%1$s] COLLATE "C" IS DISTINCT FROM p.n[%1$s] COLLATE "C" THEN %2$L || p.n[%1$s] END$e$, i, cols[i] || ' = '), ', ')
                         FROM generate_series(1, cardinality(cols)) i));
    END IF;
    RAISE EXCEPTION 'pyreplica: unknown operation %', op;
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_capture_sql(regclass, "char") IS
    'pyreplica: the query that logs one statement''s rows of a table';

-- The capture trigger. Kept tiny: find (or prepare once per backend) the logging query for this
-- table, operation and column signature, run it, and wake a sleeping daemon. A daemon sleeps holding
-- the wake-up lock (advisory lock 1887007333, 1, exclusive, docs/design.md §3): the trigger takes
-- it shared until its transaction ends, and NOTIFYs only when it cannot (a daemon sleeps or queues
-- for it). PostgreSQL serialises the commits of transactions that NOTIFY; while every daemon works,
-- writers neither NOTIFY nor wait. Identical NOTIFYs of one transaction are folded into one.
CREATE OR REPLACE FUNCTION pyreplica.py_log_replica()
RETURNS trigger
LANGUAGE plpython3u
SECURITY DEFINER
-- Only the settings that change what format('%L') writes: every SET clause costs each call. Read
-- back, TimeZone's and bytea_output's forms mean the same value, but a key must have one text, as
-- the slave's grouping knows a row by it (apply.group: a timestamptz key written by sessions in two
-- time zones were two rows, and their UPDATEs were reordered). Not pinned, because they cannot
-- change the text: standard_conforming_strings (quote_literal writes E'' strings when there is a
-- backslash), xmloption (input only).
SET search_path = pg_catalog, pg_temp
SET "DateStyle" = 'ISO, YMD'
SET "IntervalStyle" = 'iso_8601'
SET extra_float_digits = 1
SET lc_monetary = 'C'
SET "TimeZone" = 'UTC'
SET bytea_output = 'hex'
AS $py$
# TD["args"][0] is the table's column signature, renewed by py_log_replica_ddl whenever
# ALTER TABLE changes the columns: a new signature means a new query.
# No wake-up (neither lock nor NOTIFY) while pyreplica replays (session_replication_role = replica,
# reached only by ENABLE ALWAYS triggers in a cascade): PostgreSQL refuses to PREPARE a transaction
# that sent a NOTIFY, and a prepared one holding the lock would keep daemons from sleeping; the
# daemon notifies this database's listeners itself once the batch is committed. For the same
# reason an application that prepares its own transactions sets pyreplica.notify = off (README).
# CASE, not AND: the planner orders AND's operands by cost, and the lock must come last. Taking a
# lock this transaction already holds is a local hash lookup: no need to remember it in SD.
# The logging INSERT and the wake-up are one statement (a data-modifying WITH always runs): one
# executor start and end per call, not two. A statement that logged nothing (an UPDATE that changed
# no value) wakes nobody.
WAKE_UP = (" SELECT pg_catalog.pg_notify('replicas', '') WHERE CASE"
           " WHEN NOT EXISTS (SELECT FROM logged) THEN false"
           " WHEN pg_catalog.current_setting('session_replication_role') = 'replica' THEN false"
           " WHEN coalesce(pg_catalog.current_setting('pyreplica.notify', true), '') = 'off' THEN false"
           " ELSE NOT pg_catalog.pg_try_advisory_xact_lock_shared(1887007333, 1) END")
key = (TD["relid"], TD["event"], tuple(TD["args"] or ()))
plan = SD.get(key)
if plan is None:
    op = {"INSERT": "I", "UPDATE": "U", "DELETE": "D", "TRUNCATE": "T"}[TD["event"]]
    text = plpy.execute(plpy.prepare('SELECT pyreplica.py_log_capture_sql($1::pg_catalog.regclass, $2::pg_catalog."char") AS q',
                                     ["oid", '"char"']), [TD["relid"], op])[0]["q"]
    plan = SD[key] = plpy.prepare("WITH logged AS (" + text + " RETURNING 1)" + WAKE_UP)
plpy.execute(plan)
# A tick at most once a second per backend (pyreplica.tick): the end points of catch-up steps,
# recorded while the master is written to, whether a daemon runs or not. One clock read per call.
tick = SD.get("tick")
if tick is None:
    import time
    tick = SD["tick"] = [time.monotonic, 0.0, plpy.prepare("SELECT pyreplica.tick()")]
now = tick[0]()
if now >= tick[1]:
    tick[1] = now + 1.0
    plpy.execute(tick[2])
$py$;
COMMENT ON FUNCTION pyreplica.py_log_replica() IS 'pyreplica: the capture trigger';

-- The same trigger without the format pins, for tables whose every column prints the same whatever
-- the session's settings (py_log_format_neutral):
-- each SET clause costs every call, together about 20 µs of a single-row INSERT's CPU (docs/design.md
-- §10). One body: copied from py_log_replica, so the two never differ.
DO $unpinned$
BEGIN
    EXECUTE format($create$CREATE OR REPLACE FUNCTION pyreplica.py_log_replica_unpinned()
                           RETURNS trigger LANGUAGE plpython3u SECURITY DEFINER
                           SET search_path = pg_catalog, pg_temp AS %L$create$,
                   (SELECT prosrc FROM pg_proc WHERE oid = 'pyreplica.py_log_replica()'::regprocedure));
END
$unpinned$;
COMMENT ON FUNCTION pyreplica.py_log_replica_unpinned() IS 'pyreplica: the capture trigger, for tables of format-neutral columns';

-- Is this function one of the two capture triggers? Asked wherever a capture trigger is looked for.
CREATE OR REPLACE FUNCTION pyreplica.py_log_is_capture_fn(fn oid)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT fn IN ('pyreplica.py_log_replica()'::regprocedure, 'pyreplica.py_log_replica_unpinned()'::regprocedure);
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_is_capture_fn(oid) IS 'pyreplica: is this a capture trigger function';

-- Does a type print the same under any DateStyle, IntervalStyle, extra_float_digits, lc_monetary,
-- TimeZone and bytea_output? Through domains and arrays to the base type, which must be one of these
-- or an enum; everything else (dates and times, intervals, floats, money, bytea, and composites and
-- ranges, which may hold them) takes the pinned trigger.
CREATE OR REPLACE FUNCTION pyreplica.py_log_format_neutral(typ oid)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH RECURSIVE under(oid, depth) AS (
        SELECT typ, 0
        UNION ALL
        SELECT CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.typelem END, u.depth + 1
          FROM under u JOIN pg_type t ON t.oid = u.oid
         WHERE (t.typtype = 'd' OR (t.typcategory = 'A' AND t.typelem <> 0)) AND u.depth < 20
    )
    SELECT t.typtype = 'e'
           OR t.oid IN ('bool'::regtype, 'int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'oid'::regtype,
                        'numeric'::regtype, 'text'::regtype, 'varchar'::regtype, 'bpchar'::regtype,
                        '"char"'::regtype, 'name'::regtype, 'uuid'::regtype,
                        'json'::regtype, 'jsonb'::regtype, 'inet'::regtype, 'cidr'::regtype,
                        'macaddr'::regtype, 'macaddr8'::regtype, 'bit'::regtype, 'varbit'::regtype)
      FROM under u JOIN pg_type t ON t.oid = u.oid
     ORDER BY u.depth DESC
     LIMIT 1;
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_format_neutral(oid) IS 'pyreplica: does a type print the same under any format setting';

-- The capture trigger function for a table: unpinned when every column is format-neutral. The
-- choice follows the column types, which are part of the signature: an ALTER TABLE that changes
-- them re-captures the table (py_log_replica_ddl), choosing again.
CREATE OR REPLACE FUNCTION pyreplica.py_log_capture_fn(rel regclass)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT CASE WHEN bool_and(pyreplica.py_log_format_neutral(atttypid)) THEN 'pyreplica.py_log_replica_unpinned'
                ELSE 'pyreplica.py_log_replica' END
      FROM pg_attribute
     WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped;
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_capture_fn(regclass) IS 'pyreplica: which capture trigger function a table gets';

-- The signature of what a table's capture query is made of: it changes when the table is renamed
-- or moved to another schema, a column is added, dropped, renamed or retyped, becomes generated or
-- an identity, or the primary key changes (columns or deferrability).
-- rel::text must read the same in every session: a session with quote_all_identifiers on (its DDL
-- fires the event trigger that compares signatures) would see each table it touches as changed.
CREATE OR REPLACE FUNCTION pyreplica.py_log_signature(rel regclass)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET quote_all_identifiers = off
AS $fn$
    SELECT md5(rel::text || ':'
               || coalesce(string_agg(format('%s:%s:%s:%s:%s:%s', attnum, attname, atttypid, atttypmod, attgenerated, attidentity), ',' ORDER BY attnum), '')
               || coalesce((SELECT indkey::text || indimmediate::text FROM pg_index WHERE indrelid = rel AND indisprimary), ''))
      FROM pg_attribute
     WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped;
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_signature(regclass) IS 'pyreplica: the column signature of a captured table';

-- Resolve a table name as the install guide's query passes it (pg_class.relname as it is, whatever
-- its case, spaces or dots) or as a person types it ('name', 'schema.name', "Quoted"."Names").
-- Every reading is tried: when they find more than one table (a relname that merely contains a dot,
-- such as "public.accounts" in some schema, next to public.accounts), or a bare name is found in
-- several schemas, the answer is a problem line, never a guess. A bare name found in one schema
-- only is that table even off the search_path. Temporary tables are not candidates (a slave has
-- none of them). Returns the table, or NULL and a line saying what is wrong.
CREATE OR REPLACE FUNCTION pyreplica.py_log_resolve(tablename text, OUT rel regclass, OUT problem text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    parts   text[];
    found   regclass[];
BEGIN
    BEGIN
        parts := parse_ident(tablename);
    EXCEPTION WHEN others THEN
        parts := NULL;
    END;
    SELECT array_agg(DISTINCT c.oid::regclass) INTO found
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
       AND (c.relname = tablename                                                  -- the relname itself
            OR (array_length(parts, 1) = 1 AND c.relname = parts[1])                -- an SQL name
            OR (array_length(parts, 1) = 2 AND n.nspname = parts[1] AND c.relname = parts[2]));
    IF array_length(found, 1) = 1 THEN
        rel := found[1];
    ELSIF array_length(found, 1) > 1 THEN
        problem := format('table %s is ambiguous: it could be %s; give it as schema.name with quotes, e.g. %s',
                          tablename,
                          (SELECT string_agg(pyreplica.py_log_display(f), ' or ' ORDER BY pyreplica.py_log_display(f)) FROM unnest(found) f),
                          (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                            WHERE c.oid = found[1]));
    ELSIF array_length(parts, 1) > 2 THEN
        problem := format('table %s: expected name or schema.name (couldn''t be replicated)!', tablename);
    ELSE
        problem := format('table %s does not exist (couldn''t be replicated)!', tablename);
    END IF;
END
$fn$;

-- How answer lines name a table: schema-qualified and quoted where needed, except the install
-- guide's tables in schema public, which keep their bare names (`created trigger on tt (id1,id2)`).
CREATE OR REPLACE FUNCTION pyreplica.py_log_display(rel regclass)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT CASE WHEN n.nspname = 'public' THEN quote_ident(c.relname) ELSE format('%I.%I', n.nspname, c.relname) END
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = rel;
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_display(regclass) IS 'pyreplica: a table''s name in answer lines';
COMMENT ON FUNCTION pyreplica.py_log_resolve(text) IS 'pyreplica: resolve a table name to exactly one table';

CREATE OR REPLACE FUNCTION pyreplica.py_log_is_own_table(rel regclass)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel) = 'pyreplica';
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_is_own_table(regclass) IS 'pyreplica: is this one of pyreplica''s own tables';

-- The tables whose capture triggers go with rel's: rel and every partition below it. A statement
-- fires the statement-level triggers of the table it names only, so a row written straight into a
-- partition is seen by that partition's triggers alone.
CREATE OR REPLACE FUNCTION pyreplica.py_log_members(rel regclass)
RETURNS SETOF regclass
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT rel
    UNION
    SELECT relid FROM pg_partition_tree(rel) WHERE relid::oid IN (SELECT oid FROM pg_class WHERE relkind IN ('r', 'p'));
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_members(regclass) IS 'pyreplica: a table and its partitions';

-- Is this table captured (does it carry pyreplica's capture trigger)? Asked in one place only.
CREATE OR REPLACE FUNCTION pyreplica.py_log_is_captured(rel regclass)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = rel AND pyreplica.py_log_is_capture_fn(tgfoid));
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_is_captured(regclass) IS 'pyreplica: does a table carry the capture trigger';

-- Enable a table's capture triggers as the cascade setting says: ALWAYS (replayed rows are captured
-- too: this database feeds further slaves) or ordinarily.
CREATE OR REPLACE FUNCTION pyreplica.py_log_enable_triggers(rel regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    t    name;
    flag text := current_setting('pyreplica.skip_ddl_capture', true);
BEGIN
    -- Our own ALTER TABLE ... ENABLE TRIGGER is no statement for the slaves (the DDL capture skips it).
    PERFORM set_config('pyreplica.skip_ddl_capture', 'on', true);
    FOR t IN SELECT tgname FROM pg_trigger
              WHERE tgrelid = rel AND pyreplica.py_log_is_capture_fn(tgfoid) LOOP
        EXECUTE format('ALTER TABLE %s ENABLE %s TRIGGER %I', rel,
                       CASE WHEN to_regclass('pyreplica.settings') IS NULL THEN ''   -- (during an upgrade)
                            WHEN pyreplica.option('cascade') = 'on' THEN 'ALWAYS' ELSE '' END, t);
    END LOOP;
    PERFORM set_config('pyreplica.skip_ddl_capture', coalesce(flag, ''), true);
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_enable_triggers(regclass) IS 'pyreplica: enable capture triggers as the cascade setting says';

-- (Re)create the four capture triggers of one table; returns its primary-key columns.
-- Raises if the table has no primary key.
CREATE OR REPLACE FUNCTION pyreplica.py_log_add_triggers(rel regclass)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    pkcols text;
    sig    text := pyreplica.py_log_signature(rel);
    base   text := (SELECT relname FROM pg_class WHERE oid = rel);
    ev     text;
BEGIN
    SELECT string_agg(a.attname, ',' ORDER BY k.ord) INTO pkcols
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary;
    IF pkcols IS NULL THEN
        RAISE EXCEPTION 'pyreplica: table % is replicated and must keep a primary key', rel
            USING HINT = format('Stop replicating it first: SELECT py_log_drop_tg(%L);', rel::text);
    END IF;
    IF EXISTS (SELECT FROM pg_index WHERE indrelid = rel AND indisprimary AND NOT indimmediate) THEN
        RAISE EXCEPTION 'pyreplica: table % is replicated and its primary key cannot be deferrable', rel
            USING HINT = format('Stop replicating it first: SELECT py_log_drop_tg(%L);', rel::text);
    END IF;
    -- Trigger names are <table>_replica_tg[_u|_d|_t]; a long table name is cut so that all four
    -- fit in 63 bytes and stay distinct (PostgreSQL would cut them to the same name).
    WHILE octet_length(base || '_replica_tg_x') > 63 LOOP
        base := left(base, -1);
    END LOOP;
    PERFORM pyreplica.py_log_drop_triggers(rel);
    FOREACH ev IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
        EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s %s FOR EACH STATEMENT EXECUTE FUNCTION %s(%L)',
                       base || '_replica_tg' || CASE ev WHEN 'insert' THEN '' ELSE '_' || left(ev, 1) END,
                       upper(ev), rel,
                       CASE ev WHEN 'insert' THEN 'REFERENCING NEW TABLE AS pyreplica_new'
                               WHEN 'update' THEN 'REFERENCING OLD TABLE AS pyreplica_old NEW TABLE AS pyreplica_new'
                               WHEN 'delete' THEN 'REFERENCING OLD TABLE AS pyreplica_old'
                               ELSE '' END,
                       pyreplica.py_log_capture_fn(rel), sig);
    END LOOP;
    PERFORM pyreplica.py_log_enable_triggers(rel);
    IF to_regclass('pyreplica.replica_sequences') IS NOT NULL THEN     -- (NULL during an upgrade)
        INSERT INTO pyreplica.replica_sequences (seq, rel)
        SELECT DISTINCT pyreplica.py_log_table_sequences(rel), rel ON CONFLICT DO NOTHING;
    END IF;
    -- a table captured on a fenced (switched-over) node is fenced too (NULL during an upgrade)
    IF to_regclass('pyreplica.fenced') IS NOT NULL THEN
        IF pyreplica.py_log_is_fenced() THEN
            PERFORM pyreplica.py_log_fence_table(rel);
        END IF;
    END IF;
    RETURN pkcols;
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_add_triggers(regclass) IS 'pyreplica: (re)create the capture triggers of one table';

-- Put the capture triggers on a table (and its partitions). Returns one line per table saying what
-- happened; a problem with one table is such a line, never an error, so that the install guide's
-- query over every table always completes. pyreplica's own tables yield no line at all.
CREATE OR REPLACE FUNCTION pyreplica.py_log_create_tg(tablename text)
RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r       record;
    member  regclass;
    pkcols  text;
    shown   text;
BEGIN
    SELECT * INTO r FROM pyreplica.py_log_resolve(tablename);
    IF r.problem IS NOT NULL THEN
        RETURN NEXT r.problem;
        RETURN;
    END IF;
    IF pyreplica.py_log_is_own_table(r.rel) THEN
        RAISE NOTICE 'pyreplica: % is pyreplica''s own table, not replicated', r.rel;
        RETURN;
    END IF;
    shown := pyreplica.py_log_display(r.rel);
    IF (SELECT relispartition FROM pg_class WHERE oid = r.rel) THEN
        RETURN NEXT format('table %s is a partition: replicate its partitioned table %s instead',
                           shown, pyreplica.py_log_display(pg_partition_root(r.rel)));
        RETURN;
    END IF;
    IF EXISTS (SELECT FROM pg_inherits WHERE inhrelid = r.rel) THEN
        RETURN NEXT format('table %s inherits from another table (couldn''t be replicated)!', shown);
        RETURN;
    END IF;
    -- Rows of inheritance children are seen by their own triggers only, and a parent's primary key
    -- does not cover them: replicating the parent alone would be silently partial.
    IF EXISTS (SELECT FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = r.rel AND NOT c.relispartition) THEN
        RETURN NEXT format('table %s has inheritance children (%s) (couldn''t be replicated)!', shown,
                           (SELECT string_agg(pyreplica.py_log_display(i.inhrelid), ', ' ORDER BY 1)
                              FROM pg_inherits i WHERE i.inhparent = r.rel));
        RETURN;
    END IF;
    IF pyreplica.py_log_pk(r.rel) IS NULL THEN
        RETURN NEXT format('table %s has no pk constraint (couldn''t be replicated)!', shown);
        RETURN;
    END IF;
    -- A deferrable key may hold duplicates until the end of a statement or transaction, so a
    -- logged "WHERE key = ..." could then match two rows on the slave: refused, not corrupted.
    IF EXISTS (SELECT FROM pg_index WHERE indrelid = r.rel AND indisprimary AND NOT indimmediate) THEN
        RETURN NEXT format('table %s has a deferrable pk constraint (couldn''t be replicated)!', shown);
        RETURN;
    END IF;
    -- CREATE TRIGGER's lock on the table and every partition, taken at once, parent first as a
    -- writer takes them: one partition at a time, in any order, deadlocks with writers.
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', r.rel);
    FOR member IN SELECT pyreplica.py_log_members(r.rel) LOOP
        IF member = r.rel THEN
            pkcols := pyreplica.py_log_add_triggers(member);
        ELSE
            PERFORM pyreplica.py_log_add_triggers(member);
        END IF;
    END LOOP;
    RETURN NEXT format('created trigger on %s (%s)', shown, pkcols);
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_create_tg(text) IS 'pyreplica: start capturing a table (and its partitions)';

-- Drop pyreplica's capture triggers from a table, whatever their names (the table may have been
-- renamed since). Returns how many were dropped.
CREATE OR REPLACE FUNCTION pyreplica.py_log_drop_triggers(rel regclass)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    t    record;
    n    int := 0;
BEGIN
    FOR t IN SELECT tgname FROM pg_trigger
              WHERE tgrelid = rel AND pyreplica.py_log_is_capture_fn(tgfoid) LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, rel);
        n := n + 1;
    END LOOP;
    IF to_regclass('pyreplica.replica_sequences') IS NOT NULL THEN     -- (NULL during an upgrade)
        DELETE FROM pyreplica.replica_sequences WHERE replica_sequences.rel = py_log_drop_triggers.rel;
    END IF;
    RETURN n;
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_drop_triggers(regclass) IS 'pyreplica: drop the capture triggers of one table';

-- Stop replicating a table (and its partitions).
CREATE OR REPLACE FUNCTION pyreplica.py_log_drop_tg(tablename text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r record;
    n int := 0;
BEGIN
    SELECT * INTO r FROM pyreplica.py_log_resolve(tablename);
    IF r.problem IS NOT NULL THEN
        RETURN r.problem;
    END IF;
    -- DROP TRIGGER's lock on the whole tree at once, parent first (see py_log_create_tg)
    EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', r.rel);
    SELECT sum(pyreplica.py_log_drop_triggers(m)) INTO n FROM pyreplica.py_log_members(r.rel) m;
    IF n = 0 THEN
        RETURN format('table %s had no replica trigger', pyreplica.py_log_display(r.rel));
    END IF;
    RETURN format('dropped trigger on %s', pyreplica.py_log_display(r.rel));
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_drop_tg(text) IS 'pyreplica: stop capturing a table (and its partitions)';

-- Is a setting on? Off while the settings table does not exist yet (the event triggers of an older
-- install fire on the CREATE TABLEs of this script).
CREATE OR REPLACE FUNCTION pyreplica.py_log_setting_on(setting text)
RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    -- two statements: plpgsql plans a whole expression, and during an upgrade this runs (from the
    -- event trigger, on the install's own CREATE TABLE) before option() exists
    IF to_regclass('pyreplica.settings') IS NULL OR to_regprocedure('pyreplica.option(text)') IS NULL THEN
        RETURN false;
    END IF;
    RETURN pyreplica.option(setting) = 'on';
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_setting_on(text) IS 'pyreplica: is a setting on (off during an install)';

-- DDL capture (ddl = on, docs/design.md §12): log the statement the event trigger fired for, as
-- an administrator's statement ('S'), in this transaction, so it takes its place in the stream.
-- Only a faithful capture: current_query() is the whole query string the client sent, so it must
-- hold exactly this one statement (not several, not a DO block or a function call that ran the
-- DDL), which a small tokenizer checks. Refusing raises: the DDL is rolled back with it.
-- Only a superuser's DDL: a slave runs the text as the daemon's role, so anyone else's would run
-- there with rights its author may not have. CONCURRENTLY cannot run in a slave's batch
-- transaction: not logged, a WARNING says how to build the index on the slaves.
-- Called by the event trigger functions only (SECURITY DEFINER themselves); returns the log id.
-- How the query string reads as `tag` (the command the event trigger fired for): 'ok' (exactly
-- that one statement), 'concurrently' (CREATE/DROP INDEX CONCURRENTLY), 'inside' (another
-- statement, e.g. a DO block or a function call, ran the DDL), 'unqualified' (CREATE TABLE without
-- a schema), 'triggers' (ALTER TABLE ... ENABLE/DISABLE TRIGGER alone), 'triggers and more' (with
-- other subcommands) or 'statements:N' (N statements).
CREATE OR REPLACE FUNCTION pyreplica.py_log_ddl_reading(query text, tag text)
RETURNS text
LANGUAGE plpython3u IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $py$
import re

WORD = re.compile(r"[^\W\d][\w$]*")
DOLLAR = re.compile(r"\$([^\W\d][\w]*)?\$")


def statements(text):
    """The query string's statements, each as its list of upper-cased words (quoted text,
    quoted names and comments are skipped; an empty statement is none)."""
    found, words, i, n = [], [], 0, len(text)
    while i < n:
        c = text[i]
        if c == ";":
            if words:
                found.append(words)
            words, i = [], i + 1
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif text.startswith("/*", i):                  # comments nest in PostgreSQL
            depth, i = 1, i + 2
            while depth and i < n:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c in "'\"":
            escapes = c == "'" and words and words[-1] == "E" and text[i - 1] in "eE"
            if escapes:
                words.pop()                             # E'...' is one literal, not a word
            i += 1
            while i < n:
                if escapes and text[i] == "\\":
                    i += 2
                elif text[i] == c and text.startswith(c + c, i):
                    i += 2
                elif text[i] == c:
                    break
                else:
                    i += 1
            i += 1
            words.append("<literal>")
        elif c == "$" and DOLLAR.match(text, i):
            tag_ = DOLLAR.match(text, i).group(0)
            end = text.find(tag_, i + len(tag_))
            i = n if end < 0 else end + len(tag_)
            words.append("<literal>")
        elif WORD.match(text, i):
            word = WORD.match(text, i).group(0)
            words.append(word.upper())
            i += len(word)
        else:
            if not c.isspace():
                words.append(c)
            i += 1
    if words:
        found.append(words)
    return found


def is_the_command(words, tag):
    """Does the statement begin with the command's own keywords (CREATE [UNIQUE] INDEX, CREATE
    [UNLOGGED] TABLE, ALTER TABLE, ...)?"""
    expected = tag.split()
    if len(words) > 2 and words[0] == "CREATE" and words[1] in ("UNIQUE", "UNLOGGED"):
        words = words[:1] + words[2:]
    return words[:len(expected)] == expected


def sets_triggers(words):
    """Does an ALTER TABLE (ENABLE | DISABLE) [ALWAYS | REPLICA] TRIGGER? (Word next to word: a
    column renamed from "enable" to "trigger" is not one.)"""
    for i, w in enumerate(words):
        if w in ("ENABLE", "DISABLE"):
            following = words[i + 1:i + 3]
            if following[:1] == ["TRIGGER"] or (following[:1] in (["ALWAYS"], ["REPLICA"]) and following[1:] == ["TRIGGER"]):
                return True
    return False


def top_level_commas(words):
    depth, commas = 0, 0
    for w in words:
        depth += (w == "(") - (w == ")")
        commas += w == "," and depth == 0
    return commas


found = statements(query)
if len(found) != 1:
    return "statements:%d" % len(found)
if not is_the_command(found[0], tag):
    return "inside"
if tag == "ALTER TABLE" and sets_triggers(found[0]):
    return "triggers" if top_level_commas(found[0]) == 0 else "triggers and more"
if tag in ("CREATE INDEX", "DROP INDEX") and "CONCURRENTLY" in found[0][:4]:
    return "concurrently"
# A slave's search_path starts with pg_catalog: an unqualified new table would be created there.
words = [w for w in found[0] if w not in ("UNLOGGED", "IF", "NOT", "EXISTS")]
if tag == "CREATE TABLE" and words[3:4] != ["."]:
    return "unqualified"
return "ok"
$py$;
COMMENT ON FUNCTION pyreplica.py_log_ddl_reading(text, text) IS 'pyreplica: is a query string exactly one statement of a command';

-- Called by the event trigger functions only (SECURITY DEFINER themselves); returns the log id.
CREATE OR REPLACE FUNCTION pyreplica.py_log_ddl_statement(tag text)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    query   text := current_query();
    reading text := pyreplica.py_log_ddl_reading(query, tag);
    hint    text := 'Run the statement alone (one statement per query string), or log it yourself with '
                    'SELECT py_log_sql(''...''), or turn the DDL capture off: SELECT pyreplica.set_option(''ddl'', ''off'');';
    logged  bigint;
BEGIN
    IF reading LIKE 'statements:%' THEN
        RAISE EXCEPTION 'pyreplica: ddl = on logs the text of % for the slaves, but this query string holds % statements, which would all run there',
                        tag, split_part(reading, ':', 2) USING HINT = hint;
    ELSIF reading = 'inside' THEN
        RAISE EXCEPTION 'pyreplica: ddl = on cannot log this %: it ran inside another statement (a DO block or a function), whose text is not the % itself',
                        tag, tag USING HINT = hint;
    ELSIF reading = 'unqualified' THEN
        RAISE EXCEPTION 'pyreplica: ddl = on needs the schema of a new table in CREATE TABLE (the slaves run it with search_path pg_catalog, public)'
            USING HINT = 'Write CREATE TABLE public.name (...), or log it yourself with SELECT py_log_sql(''...''), or turn the DDL capture off: SELECT pyreplica.set_option(''ddl'', ''off'');';
    ELSIF reading = 'triggers' THEN
        -- the slaves have no capture triggers (a DISABLE TRIGGER for a bulk load would stop their
        -- replay), and their own triggers do not fire on replay anyway
        RAISE WARNING 'pyreplica: ALTER TABLE ... ENABLE/DISABLE TRIGGER is not logged for the slaves (a trigger''s state is each node''s own, and pyreplica''s capture triggers are only on the master)'
            USING HINT = 'To change a trigger on the slaves too: SELECT py_log_sql_only(''ALTER TABLE ...'');';
        RETURN NULL;
    ELSIF reading = 'triggers and more' THEN
        RAISE EXCEPTION 'pyreplica: ddl = on does not log ENABLE/DISABLE TRIGGER for the slaves: run it in an ALTER TABLE of its own'
            USING HINT = 'Split the statement: its other changes are logged, the trigger''s state stays this node''s own.';
    ELSIF reading = 'concurrently' THEN
        RAISE WARNING 'pyreplica: % CONCURRENTLY is not logged for the slaves (they replay inside a transaction, where it cannot run)', tag
            USING HINT = format('Do it on the slaves too: SELECT py_log_sql_only(''%s ...''); (without CONCURRENTLY).', tag);
        RETURN NULL;
    ELSIF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = session_user) THEN
        RAISE EXCEPTION 'pyreplica: ddl = on logs only a superuser''s DDL of a captured table (the slaves run it as the daemon''s role); role % is not a superuser',
                        session_user USING HINT = 'Have a superuser run it, or run it with SELECT py_log_sql(''...'') as a superuser.';
    END IF;
    INSERT INTO pyreplica.replica_log (txid, relname, op, sql)
    VALUES (pg_current_xact_id(), NULL, 'S', query)
    RETURNING id INTO logged;
    -- Wake a sleeping daemon as the capture trigger does (docs/design.md §3 "Wake-up").
    PERFORM pg_notify('replicas', '') WHERE CASE
        WHEN current_setting('session_replication_role') = 'replica' THEN false
        WHEN coalesce(current_setting('pyreplica.notify', true), '') = 'off' THEN false
        ELSE NOT pg_try_advisory_xact_lock_shared(1887007333, 1) END;
    RETURN logged;
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_ddl_statement(text) IS 'pyreplica: log the DDL statement an event trigger fired for (ddl = on)';

-- capture_new_tables = on: capture a table just created (py_log_create_tg's checks and path); a
-- table it cannot capture (no primary key, an inheritance child) gets a WARNING, not an error.
-- Partitions follow their root (py_log_replica_ddl); pyreplica's own and temporary tables never.
CREATE OR REPLACE FUNCTION pyreplica.py_log_capture_new(rel regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    line text;
    name text := (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
                    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel);
BEGIN
    IF EXISTS (SELECT FROM pg_class WHERE oid = rel AND (relispartition OR relpersistence = 't'))
       OR pyreplica.py_log_is_own_table(rel) OR pyreplica.py_log_is_captured(rel) THEN
        RETURN;
    END IF;
    line := pyreplica.py_log_create_tg(name);
    IF line NOT LIKE 'created trigger on %' THEN
        RAISE WARNING 'pyreplica: new table % is not captured (capture_new_tables = on): %', name, line
            USING HINT = format('Give it a primary key, create it on every slave, then: SELECT py_log_create_tg(%L);', name);
    END IF;
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_capture_new(regclass) IS 'pyreplica: capture a table just created (capture_new_tables)';

-- Re-capture a table whose capture triggers do not carry its current signature (all four).
CREATE OR REPLACE FUNCTION pyreplica.py_log_renew_triggers(member regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_trigger
                    WHERE tgrelid = member AND pyreplica.py_log_is_capture_fn(tgfoid)
                      AND encode(tgargs, 'escape') = pyreplica.py_log_signature(member) || '\000'
                   HAVING count(*) = 4) THEN
        PERFORM pyreplica.py_log_add_triggers(member);
    END IF;
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_renew_triggers(regclass) IS 'pyreplica: re-capture a table whose signature changed';

-- After ALTER TABLE, CREATE TABLE, CREATE INDEX, ALTER INDEX, ALTER SCHEMA: for every replicated
-- table touched (a partition counts as its partitioned table, an index as its table, a schema as
-- the tables in it), renew the column signature of its triggers and its partitions' triggers where
-- it changed, so that every backend prepares a new capture query (a cached one would miss an added
-- column), and put triggers on a partition just created or attached. A new inheritance child of a replicated table is refused (its rows
-- would never be captured), and so is a new parent of one. With capture_new_tables on, a new table
-- is captured; with ddl on, the statement is logged when it touched a captured table (unless
-- py_log_sql runs it, or it is pyreplica's own ALTER TABLE ... ENABLE TRIGGER: they set
-- pyreplica.skip_ddl_capture). Never fires while a daemon replays (session_replication_role =
-- replica: the event triggers are ENABLE ORIGIN).
CREATE OR REPLACE FUNCTION pyreplica.py_log_replica_ddl()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    root     regclass;
    member   regclass;
    parent   regclass;
    child    regclass;
    created  regclass;
    touched  boolean := false;
BEGIN
    -- A new inheritance link touching a replicated table, either way round: a child's rows escape
    -- the parent's statement triggers, and so do rows of a replicated child changed through its parent.
    SELECT i.inhparent, d.objid::regclass INTO parent, child
      FROM pg_event_trigger_ddl_commands() d
      JOIN pg_inherits i ON i.inhrelid = d.objid
      JOIN pg_class c ON c.oid = d.objid
     WHERE d.classid = 'pg_class'::regclass AND NOT c.relispartition
       AND (pyreplica.py_log_is_captured(i.inhparent) OR pyreplica.py_log_is_captured(d.objid))
     LIMIT 1;
    IF pyreplica.py_log_is_captured(parent) THEN
        RAISE EXCEPTION 'pyreplica: table % is replicated and cannot get inheritance children (their rows would not be replicated)', parent
            USING HINT = 'Use a partitioned table, or stop replicating it first: SELECT py_log_drop_tg(...);';
    ELSIF child IS NOT NULL THEN
        RAISE EXCEPTION 'pyreplica: table % is replicated and cannot inherit from another table (rows changed through the parent would not be replicated)', child
            USING HINT = 'Stop replicating it first: SELECT py_log_drop_tg(...);';
    END IF;
    IF TG_TAG = 'CREATE TABLE' AND pyreplica.py_log_setting_on('capture_new_tables') THEN
        FOR created IN SELECT d.objid FROM pg_event_trigger_ddl_commands() d JOIN pg_class c ON c.oid = d.objid
                        WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND d.command_tag = 'CREATE TABLE'
                          AND c.relkind IN ('r', 'p') LOOP
            PERFORM pyreplica.py_log_capture_new(created);
        END LOOP;
    END IF;
    FOR root IN SELECT DISTINCT coalesce(pg_partition_root(t.rel), t.rel)::regclass
                  FROM pg_event_trigger_ddl_commands() d
                  JOIN pg_class c ON c.oid = d.objid
                  LEFT JOIN pg_index i ON i.indexrelid = d.objid
                  CROSS JOIN LATERAL (SELECT coalesce(i.indrelid, d.objid) AS rel) t
                 WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0
                   AND c.relkind IN ('r', 'p', 'i', 'I') LOOP
        CONTINUE WHEN NOT pyreplica.py_log_is_captured(root);
        touched := true;
        FOR member IN SELECT pyreplica.py_log_members(root) LOOP
            PERFORM pyreplica.py_log_renew_triggers(member);
        END LOOP;
    END LOOP;
    -- ALTER SCHEMA ... RENAME renames every captured table in it: writers' sessions must stop using
    -- the old name (their cached query is keyed by the signature, which holds the name)
    FOR member IN SELECT DISTINCT t.tgrelid::regclass
                    FROM pg_event_trigger_ddl_commands() d
                    JOIN pg_class c ON c.relnamespace = d.objid
                    JOIN pg_trigger t ON t.tgrelid = c.oid AND pyreplica.py_log_is_capture_fn(t.tgfoid)
                   WHERE d.classid = 'pg_namespace'::regclass LOOP
        touched := true;
        PERFORM pyreplica.py_log_renew_triggers(member);
    END LOOP;
    IF touched AND coalesce(current_setting('pyreplica.skip_ddl_capture', true), '') <> 'on'
       AND pyreplica.py_log_setting_on('ddl') THEN
        PERFORM pyreplica.py_log_ddl_statement(TG_TAG);
    END IF;
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_replica_ddl() IS 'pyreplica: keep capture triggers right after ALTER/CREATE TABLE, capture DDL';

-- DROP INDEX and DROP TABLE (ddl = on). When sql_drop fires the objects are gone from the catalogs
-- (pg_event_trigger_dropped_objects() names an index, not its table), so ddl_command_start notes
-- first which relations are captured tables or their indexes, in pyreplica.ddl_dropping (session
-- level: DROP INDEX CONCURRENTLY commits in between), and sql_drop logs the statement when it
-- dropped one of them.
CREATE OR REPLACE FUNCTION pyreplica.py_log_replica_ddl_start()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF pyreplica.py_log_setting_on('ddl') THEN
        PERFORM set_config('pyreplica.ddl_dropping',
                           (SELECT coalesce(array_agg(DISTINCT r), '{}')::text
                              FROM pg_trigger t
                              CROSS JOIN LATERAL (SELECT t.tgrelid UNION ALL
                                                  SELECT indexrelid FROM pg_index WHERE indrelid = t.tgrelid) x(r)
                             WHERE pyreplica.py_log_is_capture_fn(t.tgfoid)),
                           false);
    END IF;
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_replica_ddl_start() IS 'pyreplica: note the captured tables and their indexes before a DROP';

CREATE OR REPLACE FUNCTION pyreplica.py_log_replica_ddl_drop()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    watched oid[] := coalesce(nullif(current_setting('pyreplica.ddl_dropping', true), ''), '{}')::oid[];
BEGIN
    PERFORM set_config('pyreplica.ddl_dropping', '', false);
    IF coalesce(current_setting('pyreplica.skip_ddl_capture', true), '') <> 'on'
       AND pyreplica.py_log_setting_on('ddl')
       AND EXISTS (SELECT FROM pg_event_trigger_dropped_objects()
                    WHERE classid = 'pg_class'::regclass AND objsubid = 0 AND objid = ANY (watched)) THEN
        PERFORM pyreplica.py_log_ddl_statement(TG_TAG);
    END IF;
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_replica_ddl_drop() IS 'pyreplica: log DROP INDEX/DROP TABLE of a captured table (ddl = on)';

-- ---------------------------------------------------------------------------------------------
-- An administrator's SQL (DDL to propagate): run here, and logged so every slave runs it too, in
-- the same place of the stream. The slave runs it as the daemon's role.
-- Runs with the caller's rights and search_path (an unqualified name means what it means to the
-- caller here; on a slave it is resolved by the daemon's search_path, so qualify names): no SET
-- clause, so every name in its own body is schema-qualified.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pyreplica.py_log_sql(statement text)
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    flag   text := pg_catalog.current_setting('pyreplica.skip_ddl_capture', true);
BEGIN
    -- Logged once, below: the DDL capture (ddl = on) skips the statement it runs.
    PERFORM pg_catalog.set_config('pyreplica.skip_ddl_capture', 'on', true);
    EXECUTE statement;
    PERFORM pg_catalog.set_config('pyreplica.skip_ddl_capture', coalesce(flag, ''), true);
    RETURN pyreplica.py_log_sql_only(statement);
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_sql(text) IS
    'pyreplica: run an administrator''s SQL (e.g. ALTER TABLE) here and log it for every slave; returns its log id';

-- The same, logged only, not run here: for a change that must differ on the master (an index only
-- the slaves need, a statement the master already had). The slaves run it in its place in the stream.
CREATE OR REPLACE FUNCTION pyreplica.py_log_sql_only(statement text)
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    logged bigint;
BEGIN
    INSERT INTO pyreplica.replica_log (txid, relname, op, sql)
    VALUES (pg_catalog.pg_current_xact_id(), NULL, 'S', statement)
    RETURNING id INTO logged;
    IF coalesce(pg_catalog.current_setting('pyreplica.notify', true), '') OPERATOR(pg_catalog.<>) 'off' THEN
        PERFORM pg_catalog.pg_notify('replicas', '');
    END IF;
    RETURN logged;
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_sql_only(text) IS
    'pyreplica: log an administrator''s statement for the slaves without running it here';

-- ---------------------------------------------------------------------------------------------
-- What the daemon, clone, status and compare ask (one function per question) and the registry's
-- state transitions (one function each, SECURITY DEFINER: the daemon's role writes nothing itself).
-- ---------------------------------------------------------------------------------------------

-- The captured tables: with all their columns (compare hashes them), the columns a logged
-- statement may name (no generated ones), and the primary key.
CREATE OR REPLACE FUNCTION pyreplica.captured_tables()
RETURNS TABLE (rel regclass, qualified text, schema_name text, table_name text,
               columns text[], written_columns text[], pk text[], is_partition boolean)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT c.oid::regclass, format('%I.%I', n.nspname, c.relname), n.nspname::text, c.relname::text,
           (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
           (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''),
           (SELECT array_agg(a.attname::text ORDER BY k.ord)
              FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = c.oid AND i.indisprimary),
           c.relispartition
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid IN (SELECT tgrelid FROM pg_trigger) AND pyreplica.py_log_is_captured(c.oid)
     ORDER BY n.nspname, c.relname;
$fn$;
COMMENT ON FUNCTION pyreplica.captured_tables() IS 'pyreplica: the captured tables, their columns and keys';

-- The events a slave at snapshot `since` has not applied (docs/design.md §4). LANGUAGE sql with no
-- SET clause so that the planner inlines it and the batch cursor keeps using the txid index; hence
-- the qualified operators.
CREATE OR REPLACE FUNCTION pyreplica.unapplied(since pg_snapshot)
RETURNS SETOF pyreplica.replica_log
LANGUAGE sql STABLE
AS $fn$
    SELECT * FROM pyreplica.replica_log l
     WHERE l.txid OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmin(since)
       AND NOT pg_catalog.pg_visible_in_snapshot(l.txid, since)
$fn$;
COMMENT ON FUNCTION pyreplica.unapplied(pg_snapshot) IS 'pyreplica: events not visible in a slave''s snapshot';

-- ---------------------------------------------------------------------------------------------
-- Ticks: master snapshots recorded as time passes, so that a backlog is applied in bounded,
-- committed steps, each a consistent cut in commit order (docs/design.md §4, PgQ's ticks).
-- ---------------------------------------------------------------------------------------------

-- Does snapshot `later` contain snapshot `earlier`: is every transaction visible in `earlier`
-- visible in `later` too? Only then may a batch go from `earlier` to `later`: the events visible in
-- `later` and not in `earlier` are then exactly the transactions that committed in between.
CREATE OR REPLACE FUNCTION pyreplica.snapshot_covers(later pg_snapshot, earlier pg_snapshot)
RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT pg_snapshot_xmin(earlier) <= pg_snapshot_xmin(later)
       AND pg_snapshot_xmax(earlier) <= pg_snapshot_xmax(later)
       AND NOT EXISTS (SELECT FROM pg_snapshot_xip(later) AS x
                        WHERE x < pg_snapshot_xmax(earlier) AND pg_visible_in_snapshot(x, earlier));
$fn$;
COMMENT ON FUNCTION pyreplica.snapshot_covers(pg_snapshot, pg_snapshot) IS
    'pyreplica: is every transaction visible in the second snapshot visible in the first';

-- Record a tick, unless one was recorded less than min_gap ago. The capture trigger calls it at
-- most once a second per backend, so a master written to records ticks also while no daemon runs
-- (the outage a catch-up follows). The snapshot is the master as every other session saw it: inside
-- a writing transaction PostgreSQL leaves the transaction's own xid out of the running list (to
-- itself its writes are visible), so it is put back, else the tick would show this transaction
-- committed before others that in fact commit earlier.
CREATE OR REPLACE FUNCTION pyreplica.tick(min_gap interval DEFAULT interval '1 second')
RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH here AS (
        SELECT pg_current_snapshot() AS s, pg_current_xact_id_if_assigned() AS me
    ), seen AS (
        SELECT CASE WHEN me IS NULL OR me >= pg_snapshot_xmax(s) THEN s
                    ELSE (least(pg_snapshot_xmin(s), me)::text || ':' || pg_snapshot_xmax(s)::text || ':'
                          || (SELECT string_agg(x::text, ',' ORDER BY x)
                                FROM (SELECT pg_snapshot_xip(s) UNION SELECT me) AS running(x)))::pg_snapshot
               END AS snapshot
          FROM here
    ), added AS (
        INSERT INTO pyreplica.ticks (snapshot, snapshot_xmax, last_id)
        SELECT snapshot, pg_snapshot_xmax(snapshot), (SELECT last_value FROM pyreplica.replica_log_id_seq)
          FROM seen
         WHERE NOT EXISTS (SELECT FROM pyreplica.ticks WHERE ts > clock_timestamp() - min_gap)
        RETURNING 1
    )
    SELECT EXISTS (SELECT FROM added);
$fn$;
COMMENT ON FUNCTION pyreplica.tick(interval) IS 'pyreplica: record the master''s snapshot as an end point of catch-up steps';

-- Where the next batch of a slave at `start` ends; `current` is the reader's snapshot. `current`
-- while at most max_events events separate them (live replication keeps its latency); else the
-- furthest tick at most about max_events events past the first tick after `start` (the log's
-- sequence counts them), so a backlog is applied in bounded committed steps. A tick qualifies only
-- when it contains `start` and `current` contains it: each step is a consistent cut in commit
-- order, and the reader sees every event of it. Without a qualifying tick: `current`.
CREATE OR REPLACE FUNCTION pyreplica.batch_end(start pg_snapshot, current pg_snapshot, max_events bigint)
RETURNS pg_snapshot
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    pending bigint;
    first   pyreplica.ticks;
    chosen  pg_snapshot;
BEGIN
    SELECT count(*) INTO pending
      FROM (SELECT FROM pyreplica.unapplied(start) l
             WHERE l.txid < pg_snapshot_xmax(current) AND pg_visible_in_snapshot(l.txid, current)
             LIMIT max_events + 1) p;
    IF pending <= max_events THEN
        RETURN current;
    END IF;
    SELECT * INTO first FROM pyreplica.ticks t
     WHERE t.snapshot_xmax BETWEEN pg_snapshot_xmax(start) AND pg_snapshot_xmax(current)
       AND t.snapshot::text <> start::text
       AND pyreplica.snapshot_covers(t.snapshot, start) AND pyreplica.snapshot_covers(current, t.snapshot)
     ORDER BY t.snapshot_xmax, t.last_id LIMIT 1;
    IF NOT FOUND THEN
        RETURN current;
    END IF;
    SELECT t.snapshot INTO chosen FROM pyreplica.ticks t
     WHERE t.last_id BETWEEN first.last_id AND first.last_id + max_events
       AND t.snapshot_xmax BETWEEN first.snapshot_xmax AND pg_snapshot_xmax(current)
       AND t.snapshot::text <> start::text
       AND pyreplica.snapshot_covers(t.snapshot, start) AND pyreplica.snapshot_covers(current, t.snapshot)
     ORDER BY t.snapshot_xmax DESC, t.last_id DESC LIMIT 1;
    RETURN coalesce(chosen, first.snapshot);
END
$fn$;
COMMENT ON FUNCTION pyreplica.batch_end(pg_snapshot, pg_snapshot, bigint) IS
    'pyreplica: the end snapshot of a slave''s next batch: now, or a tick when the backlog is large';

-- Register a slave at a snapshot (default: now, the start of a guide-style dump). A name belongs to
-- one slave: registering a name that exists needs drop_slave first.
CREATE OR REPLACE FUNCTION pyreplica.register_slave(slave text, at pg_snapshot DEFAULT NULL,
                                                    slave_system_id text DEFAULT NULL, slave_database text DEFAULT NULL)
RETURNS pg_snapshot
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    start pg_snapshot := coalesce(at, pg_current_snapshot());
BEGIN
    INSERT INTO pyreplica.replica_slaves AS s (name, confirmed, start_snapshot, slave_system_id, slave_database)
    VALUES (slave, start, start, register_slave.slave_system_id, register_slave.slave_database)
    ON CONFLICT (name) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pyreplica: a slave named "%" is already registered on this master', slave
            USING HINT = format('Choose another name (--name), or forget the old slave first: pyreplica drop-slave %s MASTER', slave);
    END IF;
    RETURN start;
END
$fn$;
COMMENT ON FUNCTION pyreplica.register_slave(text, pg_snapshot, text, text) IS 'pyreplica: register a slave at a snapshot';

-- Where a slave that was never registered may start: before the oldest event, as long as no
-- event was ever removed; NULL once the log has been pruned (it must be registered or cloned).
CREATE OR REPLACE FUNCTION pyreplica.log_start()
RETURNS pg_snapshot
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT CASE WHEN EXISTS (SELECT FROM pyreplica.log_pruned) THEN NULL
                ELSE coalesce((SELECT (min(txid)::text || ':' || min(txid)::text || ':')::pg_snapshot
                                 FROM pyreplica.replica_log),
                              pg_current_snapshot())
           END;
$fn$;
COMMENT ON FUNCTION pyreplica.log_start() IS
    'pyreplica: a snapshot before every event ever logged, or NULL when events have been removed';

-- A daemon claims its name for its slave (system identifier and database): the first start
-- records the identity, every later start must match it.
CREATE OR REPLACE FUNCTION pyreplica.claim_slave(slave text, slave_system_id text, slave_database text)
RETURNS TABLE (confirmed text, batch_id bigint, start_snapshot text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    s pyreplica.replica_slaves;
BEGIN
    -- no row lock: an in-doubt batch of this slave may hold one, and recovery comes after this
    SELECT * INTO s FROM pyreplica.replica_slaves r WHERE r.name = slave;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF s.slave_system_id IS NULL THEN
        UPDATE pyreplica.replica_slaves r
           SET slave_system_id = claim_slave.slave_system_id, slave_database = claim_slave.slave_database,
               last_contact = now()
         WHERE r.name = slave AND r.slave_system_id IS NULL;
    ELSIF (s.slave_system_id, s.slave_database) IS DISTINCT FROM (claim_slave.slave_system_id, claim_slave.slave_database) THEN
        RAISE EXCEPTION 'pyreplica: slave name "%" belongs to another slave (database % of server %), not to this one (database % of server %)',
                        slave, s.slave_database, s.slave_system_id, claim_slave.slave_database, claim_slave.slave_system_id
            USING HINT = 'Give this slave its own name (--name or SLAVE_FIELD); to reuse the name, drop the other slave first (pyreplica drop-slave).',
                  ERRCODE = 'PR002';
    END IF;
    RETURN QUERY SELECT s.confirmed::text, s.batch_id, coalesce(s.start_snapshot, s.confirmed)::text;
END
$fn$;
COMMENT ON FUNCTION pyreplica.claim_slave(text, text, text) IS 'pyreplica: check (or record) which slave owns a name';

-- Record a slave's new position, only as long as the name still belongs to that slave: a daemon
-- still running after drop-slave, whose name was then registered for another slave, must not move
-- that one's record (pruning trusts it). The identity is the one claim_slave recorded; every daemon
-- and clone claims (or registers with) its identity before it confirms, so a record without one
-- was registered again behind a running daemon's back.
CREATE OR REPLACE FUNCTION pyreplica.confirm(slave text, snap pg_snapshot, batch bigint, events bigint,
                                             slave_system_id text, slave_database text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    s pyreplica.replica_slaves;
BEGIN
    UPDATE pyreplica.replica_slaves r
       SET confirmed = snap, batch_id = batch, applied = applied + events,
           confirmed_at = now(), last_contact = now()
     WHERE r.name = slave
       AND (r.slave_system_id, r.slave_database) = (confirm.slave_system_id, confirm.slave_database);
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO s FROM pyreplica.replica_slaves r WHERE r.name = slave;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pyreplica: slave "%" is not registered on this master (dropped with drop-slave?)', slave
            USING HINT = 'Register it again with pyreplica clone, or start the daemon with a new slave database.';
    END IF;
    IF s.slave_system_id IS NULL THEN
        RAISE EXCEPTION 'pyreplica: slave name "%" was registered again (drop-slave, then register) while this daemon ran: it may belong to another slave now', slave
            USING HINT = 'Stop this daemon; if the name is this slave''s, start it again (it claims the name), else give this slave a new name and clone it.',
                  ERRCODE = 'PR002';
    END IF;
    RAISE EXCEPTION 'pyreplica: slave name "%" belongs to another slave (database % of server %), not to this one (database % of server %)',
                    slave, s.slave_database, s.slave_system_id, confirm.slave_database, confirm.slave_system_id
        USING HINT = 'The name was dropped (drop-slave) and given to another slave while this daemon ran: stop it; this slave needs a new name and a clone.',
              ERRCODE = 'PR002';
END
$fn$;
COMMENT ON FUNCTION pyreplica.confirm(text, pg_snapshot, bigint, bigint, text, text) IS 'pyreplica: record a slave''s new position';

-- The confirm of daemons older than this install (no identity): refused with words that say what
-- to do, rather than "function does not exist".
CREATE OR REPLACE FUNCTION pyreplica.confirm(slave text, snap pg_snapshot, batch bigint, events bigint)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RAISE EXCEPTION 'pyreplica: this daemon is older than the master''s pyreplica install'
        USING HINT = 'Upgrade pyreplica where the daemon runs, then restart it.';
END
$fn$;
COMMENT ON FUNCTION pyreplica.confirm(text, pg_snapshot, bigint, bigint) IS 'pyreplica: refuses the confirm of daemons older than this install';

-- Bring a slave's record back to the slave's own position when the record got ahead of it (an
-- operator committed the master's side of an in-doubt batch and rolled back the slave's, or the
-- slave was restored from an older backup). Possible only while every event the slave still
-- needs is in the log; serialised with prune, which takes the same lock (PRUNE_LOCK below).
CREATE OR REPLACE FUNCTION pyreplica.rewind_slave(slave text, snap pg_snapshot, batch bigint)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    gone xid8;
BEGIN
    LOCK TABLE pyreplica.log_pruned IN SHARE ROW EXCLUSIVE MODE;      -- PRUNE_LOCK
    SELECT horizon INTO gone FROM pyreplica.log_pruned WHERE horizon > pg_snapshot_xmin(snap);
    IF FOUND THEN
        RAISE EXCEPTION 'pyreplica: slave "%" is at batch % but the master has pruned events it still needs (of transactions below %)', slave, batch, gone
            USING HINT = 'Rebuild the slave with pyreplica clone (drop-slave first).', ERRCODE = 'PR003';
    END IF;
    UPDATE pyreplica.replica_slaves SET confirmed = snap, batch_id = batch, confirmed_at = now(), last_contact = now()
     WHERE name = slave;
END
$fn$;
COMMENT ON FUNCTION pyreplica.rewind_slave(text, pg_snapshot, bigint) IS
    'pyreplica: move a slave''s record back to its own position while the events it needs remain';

CREATE OR REPLACE FUNCTION pyreplica.touch(slave text)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    UPDATE pyreplica.replica_slaves SET last_contact = now() WHERE name = slave;
$fn$;
COMMENT ON FUNCTION pyreplica.touch(text) IS 'pyreplica: a slave''s daemon is alive';

-- Does a partition of the log hold an event a slave still needs (of a transaction at or above the
-- horizon)? The txid index answers. VOLATILE: every call reads with a fresh snapshot (prune asks
-- again once it holds the partition's lock).
CREATE OR REPLACE FUNCTION pyreplica.log_part_needed(part regclass, horizon xid8)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    needed boolean;
BEGIN
    EXECUTE format('SELECT EXISTS (SELECT FROM %s WHERE txid >= $1)', part) INTO needed USING horizon;
    RETURN needed;
END
$fn$;
COMMENT ON FUNCTION pyreplica.log_part_needed(regclass, xid8) IS 'pyreplica: does a log partition hold events a slave needs';

-- Remove the events every registered slave has confirmed (those of transactions older than the
-- oldest confirmed snapshot's xmin) by emptying whole partitions of the log (docs/design.md §3):
-- TRUNCATE, never DELETE, so the log does not bloat. A partition goes only when every row in it is
-- below that horizon, under an ACCESS EXCLUSIVE lock taken with NOWAIT: holding it proves no
-- writer that has not finished (open or prepared) still has rows there, and no writer ever waits
-- behind us (busy: try again at the next prune). One prune at a time; returns how many events were
-- removed. PRUNE_LOCK: a lock on pyreplica.log_pruned (self-conflicting, and no reader's ACCESS SHARE
-- conflicts with it), not an advisory one: any role may take any advisory lock, and could so stop
-- pruning for good without a word; only pyreplica's own functions (and superusers) may lock this table.
DROP FUNCTION IF EXISTS pyreplica.prune(int);
CREATE OR REPLACE FUNCTION pyreplica.prune()
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    horizon xid8 := (SELECT min(pg_snapshot_xmin(confirmed)) FROM pyreplica.replica_slaves);
    part    regclass;
    found   bigint;
    removed bigint := 0;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- one snapshot for the whole transaction would not see rows committed before our lock
        RAISE EXCEPTION 'pyreplica: prune() must run in a READ COMMITTED transaction (this one is %)',
                        current_setting('transaction_isolation');
    END IF;
    IF horizon IS NULL THEN
        RETURN 0;   -- no slave registered yet: keep everything
    END IF;
    BEGIN
        LOCK TABLE pyreplica.log_pruned IN SHARE ROW EXCLUSIVE MODE NOWAIT;     -- PRUNE_LOCK
    EXCEPTION WHEN lock_not_available THEN
        RETURN 0;   -- another daemon is pruning, or rewind_slave runs
    END;
    -- also the partition being written to: NOWAIT fails while a writer there is in flight, and a
    -- writer that comes while we hold the lock waits only for the count and the TRUNCATE
    FOR part IN SELECT format('pyreplica.replica_log_%s', p)::regclass FROM generate_series(0, 2) p LOOP
        CONTINUE WHEN pg_relation_size(part) = 0 OR pyreplica.log_part_needed(part, horizon);
        BEGIN
            EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE NOWAIT', part);
        EXCEPTION WHEN lock_not_available THEN
            CONTINUE;
        END;
        -- again under the lock: a transaction may have committed rows there since
        CONTINUE WHEN pyreplica.log_part_needed(part, horizon);
        EXECUTE format('SELECT count(*) FROM %s', part) INTO found;
        EXECUTE format('TRUNCATE %s', part);
        removed := removed + found;
    END LOOP;
    -- A tick below the horizon is contained in every slave's position: no slave can step to it.
    DELETE FROM pyreplica.ticks WHERE snapshot_xmax <= horizon;
    IF removed > 0 THEN
        INSERT INTO pyreplica.log_pruned (horizon) VALUES (horizon)
        ON CONFLICT (one) DO UPDATE SET horizon = EXCLUDED.horizon, pruned_at = now();
    END IF;
    RETURN removed;
END
$fn$;
COMMENT ON FUNCTION pyreplica.prune() IS 'pyreplica: empty the log''s partitions every slave has applied';

CREATE OR REPLACE FUNCTION pyreplica.drop_slave(slave text)
RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH gone AS (DELETE FROM pyreplica.replica_slaves WHERE name = slave RETURNING 1)
    SELECT EXISTS (SELECT FROM gone);
$fn$;
COMMENT ON FUNCTION pyreplica.drop_slave(text) IS 'pyreplica: forget a slave';

-- An event an administrator told a slave to skip (pyreplica skip-event): the master's record of the
-- request (the slave keeps its own, marked when a committed batch left the event out). Validated
-- here: the slave is registered and the event is in the log and not yet applied by it.
DO $skipped$
BEGIN
    IF to_regclass('pyreplica.skipped_events') IS NULL THEN
        CREATE TABLE pyreplica.skipped_events (
            slave        text        NOT NULL,
            event_id     bigint      NOT NULL,
            txid         xid8        NOT NULL,
            op           "char"      NOT NULL,
            relname      text,
            requested_by name        NOT NULL DEFAULT session_user,
            requested_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (slave, event_id)
        );
        COMMENT ON TABLE pyreplica.skipped_events IS 'pyreplica: events an administrator told a slave to skip (skip-event)';
        REVOKE ALL ON pyreplica.skipped_events FROM PUBLIC;
        GRANT SELECT ON pyreplica.skipped_events TO pyreplica_daemon;
    END IF;
END
$skipped$;

CREATE OR REPLACE FUNCTION pyreplica.skip_event(slave text, event bigint, OUT event_txid text, OUT description text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    s pyreplica.replica_slaves;
    e pyreplica.replica_log;
BEGIN
    -- no row lock: the batch stuck at this event may be in doubt and hold one
    SELECT * INTO s FROM pyreplica.replica_slaves r WHERE r.name = skip_event.slave;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pyreplica: no slave named "%" is registered on this master', slave
            USING HINT = 'Check the name (--name, or the slave''s database name).';
    END IF;
    SELECT * INTO e FROM pyreplica.replica_log l WHERE l.id = skip_event.event;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pyreplica: event % is not in the master''s log (never logged, or applied by every slave and pruned)', event
            USING HINT = 'Give the id of the event replay stopped at, as the daemon''s "conflict at event N" line names it.';
    END IF;
    IF pg_visible_in_snapshot(e.txid, s.confirmed) THEN
        RAISE EXCEPTION 'pyreplica: event % is not pending for slave "%": it applied it already (its position is batch %)', event, slave, s.batch_id
            USING HINT = 'Give the id of the event replay stopped at, as the daemon''s "conflict at event N" line names it.';
    END IF;
    INSERT INTO pyreplica.skipped_events (slave, event_id, txid, op, relname)
    VALUES (s.name, e.id, e.txid, e.op, e.relname)
    ON CONFLICT ON CONSTRAINT skipped_events_pkey DO NOTHING;
    event_txid := e.txid::text;
    description := format('%s on %s', CASE e.op WHEN 'I' THEN 'INSERT' WHEN 'U' THEN 'UPDATE' WHEN 'D' THEN 'DELETE'
                                                 WHEN 'T' THEN 'TRUNCATE' ELSE 'SQL' END,
                          coalesce(e.relname, '-'));
END
$fn$;
COMMENT ON FUNCTION pyreplica.skip_event(text, bigint) IS
    'pyreplica: record that a slave is to skip one pending event (pyreplica skip-event)';

-- ---------------------------------------------------------------------------------------------
-- Upgrade of an install in schema public (pyreplica 1, or the original PyReplica's replica_log,
-- owned by a superuser: checked above): the log's rows and the registry move over, the capture
-- triggers are re-created on the new function, the old objects go.
-- ---------------------------------------------------------------------------------------------
DO $upgrade$
DECLARE
    rel  regclass;
    t    record;
    f    regprocedure;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('public.replica_log')) IS DISTINCT FROM 'r' THEN
        RETURN;
    END IF;
    INSERT INTO pyreplica.replica_log (id, sql, username, ts, txid, relname, op)
    SELECT (j->>'id')::bigint, j->>'sql', coalesce(j->>'username', 'unknown'),
           coalesce((j->>'ts')::timestamptz, now()),
           coalesce((j->>'txid')::xid8, '1'::xid8),   -- no txid: committed long ago, older than any slave
           j->>'relname', coalesce(j->>'op', 'S')::"char"
      FROM (SELECT to_jsonb(o) AS j FROM public.replica_log o) old;
    PERFORM setval('pyreplica.replica_log_id_seq',
                   greatest((SELECT max(id) FROM pyreplica.replica_log), 1),
                   (SELECT max(id) FROM pyreplica.replica_log) IS NOT NULL);
    IF to_regclass('public.replica_slaves') IS NOT NULL THEN
        INSERT INTO pyreplica.replica_slaves (name, confirmed, batch_id, applied, confirmed_at, last_contact, registered_at)
        SELECT name, confirmed, batch_id, applied, confirmed_at, last_contact, registered_at FROM public.replica_slaves
        ON CONFLICT (name) DO NOTHING;
        IF FOUND THEN   -- slaves were registered, so the old log may have been pruned
            INSERT INTO pyreplica.log_pruned (horizon)
            SELECT coalesce(min(txid), pg_current_xact_id()) FROM pyreplica.replica_log ON CONFLICT DO NOTHING;
        END IF;
    END IF;
    IF to_regprocedure('public.py_log_replica()') IS NOT NULL THEN
        FOR rel IN SELECT DISTINCT tgrelid::regclass FROM pg_trigger
                    WHERE tgfoid = 'public.py_log_replica()'::regprocedure LOOP
            FOR t IN SELECT tgname FROM pg_trigger
                      WHERE tgrelid = rel AND tgfoid = 'public.py_log_replica()'::regprocedure LOOP
                EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, rel);
            END LOOP;
            PERFORM pyreplica.py_log_add_triggers(rel);
        END LOOP;
    END IF;
    DROP EVENT TRIGGER IF EXISTS py_log_replica_ddl;
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
              WHERE p.pronamespace = 'public'::regnamespace
                AND p.proname IN ('py_log_replica', 'py_log_replica_ddl', 'py_log_capture_sql', 'py_log_signature',
                                  'py_log_resolve', 'py_log_is_own_table', 'py_log_members', 'py_log_add_triggers',
                                  'py_log_create_tg', 'py_log_drop_triggers', 'py_log_drop_tg', 'py_log_sql',
                                  'replica_register_slave', 'replica_confirm', 'replica_prune', 'replica_drop_slave') LOOP
        EXECUTE format('DROP FUNCTION %s CASCADE', f);   -- CASCADE: the old triggers
    END LOOP;
    DROP TABLE public.replica_log;
    DROP TABLE IF EXISTS public.replica_slaves;
    DROP SEQUENCE IF EXISTS public.replica_log_id_seq;
END
$upgrade$;

-- ---------------------------------------------------------------------------------------------
-- Settings of this node (docs/design.md §12), changed by a superuser with pyreplica.set_option.
--   cascade  on: this database is a slave that feeds further slaves: its capture triggers are
--            ENABLE ALWAYS, so the rows its daemon replays (session_replication_role = replica)
--            are captured again. Off (default): ordinary triggers, nothing replayed is captured.
--   ddl      on: the DDL event triggers log a superuser's ALTER TABLE, CREATE/ALTER/DROP INDEX and
--            CREATE/DROP TABLE of a captured table, as its statement text, for every slave
--            (README "Schema changes"). Off (default): DDL travels only through py_log_sql.
--   capture_new_tables  on: a table created with a primary key is captured at once. Off (default).
-- ---------------------------------------------------------------------------------------------
DO $settings$
DECLARE
    -- Every setting's name; the CHECK is re-made when an older install's CHECK lacks one of them.
    known text[] := ARRAY['cascade', 'ddl', 'capture_new_tables'];
BEGIN
    IF to_regclass('pyreplica.settings') IS NULL THEN
        CREATE TABLE pyreplica.settings (
            name       text        PRIMARY KEY,
            value      text        NOT NULL,
            changed_at timestamptz NOT NULL DEFAULT now()
        );
        COMMENT ON TABLE pyreplica.settings IS 'pyreplica: this node''s settings (pyreplica.set_option)';
        REVOKE ALL ON pyreplica.settings FROM PUBLIC;
        GRANT SELECT ON pyreplica.settings TO pyreplica_daemon;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_constraint
                    WHERE conrelid = 'pyreplica.settings'::regclass AND conname = 'settings_name_check'
                      AND (SELECT bool_and(pg_get_constraintdef(oid) LIKE '%' || k || '%')
                             FROM unnest(known) k)) THEN
        ALTER TABLE pyreplica.settings DROP CONSTRAINT IF EXISTS settings_name_check;
        EXECUTE format('ALTER TABLE pyreplica.settings ADD CONSTRAINT settings_name_check CHECK (name = ANY (%L::text[]))',
                       known);
    END IF;
END
$settings$;

CREATE OR REPLACE FUNCTION pyreplica.option(setting text)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce((SELECT value FROM pyreplica.settings WHERE name = setting),
                    CASE WHEN setting IN ('cascade', 'ddl', 'capture_new_tables') THEN 'off' END);
$fn$;
COMMENT ON FUNCTION pyreplica.option(text) IS 'pyreplica: a setting of this node, or its default';

-- Change a setting; returns a line saying what it did. cascade re-sets every capture trigger.
CREATE OR REPLACE FUNCTION pyreplica.set_option(setting text, new_value text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    rel regclass;
    n   int := 0;
    val text := lower(new_value);
BEGIN
    IF pyreplica.option(setting) IS NULL THEN       -- option() knows every setting's default
        RAISE EXCEPTION 'pyreplica: unknown setting "%"', setting
            USING HINT = 'Settings: cascade, ddl, capture_new_tables (each on or off).';
    ELSIF val IS NULL OR val NOT IN ('on', 'off') THEN
        RAISE EXCEPTION 'pyreplica: setting % must be on or off, not "%"', setting, new_value;
    END IF;
    INSERT INTO pyreplica.settings (name, value) VALUES (setting, val)
    ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, changed_at = now();
    IF setting = 'ddl' THEN
        RETURN format('ddl = %s (%s)', val,
                      CASE val WHEN 'on' THEN 'a superuser''s ALTER TABLE, CREATE/ALTER/DROP INDEX and CREATE/DROP TABLE of a captured table are logged for every slave'
                               ELSE 'DDL is not logged: run it on every slave, or through py_log_sql' END);
    ELSIF setting = 'capture_new_tables' THEN
        RETURN format('capture_new_tables = %s (%s)', val,
                      CASE val WHEN 'on' THEN 'a table created with a primary key is captured at once'
                               ELSE 'a new table is captured only by py_log_create_tg' END);
    END IF;
    FOR rel IN SELECT DISTINCT tgrelid::regclass FROM pg_trigger
                WHERE pyreplica.py_log_is_capture_fn(tgfoid) LOOP
        PERFORM pyreplica.py_log_enable_triggers(rel);
        n := n + 1;
    END LOOP;
    RETURN format('cascade = %s (capture triggers of %s table(s) %s)', val, n,
                  CASE val WHEN 'on' THEN 'capture replayed rows too: ENABLE ALWAYS'
                           ELSE 'capture only this database''s own writes: ENABLE' END);
END
$fn$;
COMMENT ON FUNCTION pyreplica.set_option(text, text) IS 'pyreplica: change a setting of this node';

-- ---------------------------------------------------------------------------------------------
-- Sequences (docs/design.md §11). A sequence is not transactional and nextval writes no row, so the
-- log cannot carry it: each batch reads the values here and brings the slave's sequences up to them.
-- Followed: every sequence behind a captured table (serial, identity, a column DEFAULT calling
-- nextval), found from the catalogs at each read so that ALTER TABLE needs no bookkeeping, plus
-- the sequences an administrator names with py_log_create_seq.
-- ---------------------------------------------------------------------------------------------
DO $sequences$
BEGIN
    IF to_regclass('pyreplica.replica_sequences') IS NULL THEN
        -- kept by py_log_add_triggers / py_log_drop_triggers (every capture or re-capture of a
        -- table, also after ALTER TABLE) and py_log_create_seq, so that a batch reads it cheaply
        CREATE TABLE pyreplica.replica_sequences (
            seq      oid         NOT NULL,     -- the sequence (pg_class oid: a rename is followed)
            rel      oid         NOT NULL,     -- the captured table it numbers; 0: py_log_create_seq
            added_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (seq, rel)
        );
        COMMENT ON TABLE pyreplica.replica_sequences IS 'pyreplica: the sequences slaves follow';
        REVOKE ALL ON pyreplica.replica_sequences FROM PUBLIC;
        GRANT SELECT ON pyreplica.replica_sequences TO pyreplica_daemon;
    END IF;
END
$sequences$;

-- The sequences that number a table's rows: serial (dependency 'a') and identity ('i') columns
-- depend on their sequence; a column DEFAULT nextval('...') depends on the sequence it calls.
CREATE OR REPLACE FUNCTION pyreplica.py_log_table_sequences(rel regclass)
RETURNS SETOF oid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT d.objid FROM pg_depend d
     WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = rel
       AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
    UNION
    SELECT d.refobjid FROM pg_attrdef ad
      JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid AND d.refclassid = 'pg_class'::regclass
      JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
     WHERE ad.adrelid = rel;
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_table_sequences(regclass) IS 'pyreplica: the sequences behind a table''s columns';

-- The followed sequences that have handed out a value, with the last one ("schema"."name", value).
-- Read by every batch's first statement: index lookups only. PL/pgSQL, not SQL, so that a session
-- plans the query once (a SQL function with SET is planned at every call: half a millisecond of
-- each batch's latency).
CREATE OR REPLACE FUNCTION pyreplica.sequence_values()
RETURNS TABLE (name text, last_value bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN QUERY
    SELECT v.name, v.last_value
      FROM (SELECT format('%I.%I', n.nspname, s.relname) AS name,
                   -- CASE: the planner may try a condition on any pg_class row, not only sequences
                   CASE WHEN s.relkind = 'S' THEN pg_sequence_last_value(s.oid) END AS last_value
              FROM (SELECT DISTINCT r.seq FROM pyreplica.replica_sequences r) f
              JOIN pg_class s ON s.oid = f.seq AND s.relkind = 'S'
              JOIN pg_namespace n ON n.oid = s.relnamespace) v
     WHERE v.last_value IS NOT NULL
     ORDER BY 1;
END
$fn$;
COMMENT ON FUNCTION pyreplica.sequence_values() IS 'pyreplica: the followed sequences and their last values';

-- The sequences a name can mean: "schema.name", or a bare name in whatever schema it is (as
-- py_log_resolve does for tables: the caller's search_path does not reach in here).
CREATE OR REPLACE FUNCTION pyreplica.py_log_find_sequences(seqname text)
RETURNS SETOF text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    parts text[];
BEGIN
    BEGIN
        parts := parse_ident(seqname);
    EXCEPTION WHEN others THEN
        parts := NULL;
    END;
    RETURN QUERY SELECT format('%I.%I', n.nspname, c.relname)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind = 'S' AND c.relpersistence <> 't'
       AND (c.relname = seqname
            OR (array_length(parts, 1) = 1 AND c.relname = parts[1])
            OR (array_length(parts, 1) = 2 AND n.nspname = parts[1] AND c.relname = parts[2]))
     ORDER BY 1;
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_find_sequences(text) IS 'pyreplica: the sequences a name can mean';

-- Follow one more sequence (one not behind a captured table); a line saying what happened.
CREATE OR REPLACE FUNCTION pyreplica.py_log_create_seq(seqname text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    found text[] := ARRAY(SELECT pyreplica.py_log_find_sequences(seqname));
BEGIN
    IF cardinality(found) = 0 THEN
        RETURN format('%s is not a sequence (couldn''t be replicated)!', seqname);
    ELSIF cardinality(found) > 1 THEN
        RETURN format('sequence %s is ambiguous: it could be %s; give it as schema.name', seqname,
                      array_to_string(found, ' or '));
    END IF;
    INSERT INTO pyreplica.replica_sequences (seq, rel) VALUES (found[1]::regclass, 0) ON CONFLICT DO NOTHING;
    RETURN format('following sequence %s', found[1]);
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_create_seq(text) IS 'pyreplica: follow a sequence on every slave';

CREATE OR REPLACE FUNCTION pyreplica.py_log_drop_seq(seqname text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    gone text;
BEGIN
    DELETE FROM pyreplica.replica_sequences
     WHERE rel = 0 AND seq IN (SELECT f::regclass FROM pyreplica.py_log_find_sequences(seqname) f)
    RETURNING format('%I.%I', (SELECT nspname FROM pg_namespace n JOIN pg_class c ON c.relnamespace = n.oid WHERE c.oid = seq),
                     (SELECT relname FROM pg_class WHERE oid = seq)) INTO gone;
    IF gone IS NULL THEN
        RETURN format('sequence %s was not followed on request (a sequence behind a captured table is followed with it)', seqname);
    END IF;
    RETURN format('no longer following sequence %s', gone);
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_drop_seq(text) IS 'pyreplica: stop following a sequence named with py_log_create_seq';

-- (Re)fill the registry for every captured table: a first install of this version, or a master
-- restored from a dump (new oids).
DO $follow$
BEGIN
    DELETE FROM pyreplica.replica_sequences r
     WHERE r.rel <> 0 AND NOT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = r.rel
                                                              AND pyreplica.py_log_is_capture_fn(tgfoid));
    INSERT INTO pyreplica.replica_sequences (seq, rel)
    SELECT DISTINCT pyreplica.py_log_table_sequences(tgrelid::regclass), tgrelid FROM pg_trigger
     WHERE pyreplica.py_log_is_capture_fn(tgfoid)
    ON CONFLICT DO NOTHING;
END
$follow$;

-- (Re)created only when missing or different, so that running this script again changes nothing.
DO $evt$
DECLARE
    e record;
BEGIN
    FOR e IN SELECT * FROM (VALUES
            ('py_log_replica_ddl', 'ddl_command_end', 'pyreplica.py_log_replica_ddl()',
             ARRAY['ALTER INDEX', 'ALTER SCHEMA', 'ALTER TABLE', 'CREATE INDEX', 'CREATE TABLE']),
            ('py_log_replica_ddl_start', 'ddl_command_start', 'pyreplica.py_log_replica_ddl_start()',
             ARRAY['DROP INDEX', 'DROP TABLE']),
            ('py_log_replica_ddl_drop', 'sql_drop', 'pyreplica.py_log_replica_ddl_drop()',
             ARRAY['DROP INDEX', 'DROP TABLE'])) AS v(name, event, fn, tags) LOOP
        IF NOT EXISTS (SELECT FROM pg_event_trigger
                        WHERE evtname = e.name AND evtevent = e.event
                          AND evtfoid = e.fn::regprocedure AND evttags = e.tags) THEN
            EXECUTE format('DROP EVENT TRIGGER IF EXISTS %I', e.name);
            EXECUTE format('CREATE EVENT TRIGGER %I ON %I WHEN TAG IN (%s) EXECUTE FUNCTION %s',
                           e.name, e.event, (SELECT string_agg(quote_literal(t), ', ') FROM unnest(e.tags) t), e.fn);
        END IF;
    END LOOP;
END
$evt$;

-- ---------------------------------------------------------------------------------------------
-- The fence (pyreplica switchover, docs/design.md §8): a switched-over master becomes a slave and
-- must take no more writes of its own. pyreplica.fence(true) puts a BEFORE ... FOR EACH STATEMENT
-- trigger py_log_fence on every captured table (partitions too: a row written straight into a
-- partition fires only that partition's statement triggers) that refuses INSERT, UPDATE, DELETE
-- and TRUNCATE. It is ENABLE (origin only): the daemon replaying into this node
-- (session_replication_role = replica) is not fenced. CREATE TRIGGER waits for the writers in
-- flight (SHARE ROW EXCLUSIVE against their ROW EXCLUSIVE), so once fence(true) has committed no
-- write to a captured table can commit any more. A table captured later on a fenced node (by
-- py_log_create_tg, or a new partition) is fenced too: py_log_add_triggers asks py_log_is_fenced.
-- pyreplica.fenced remembers that the node is fenced and the first snapshot taken after the fence
-- (fence_point), so a switchover run again waits for the same point.
-- ---------------------------------------------------------------------------------------------
DO $fence$
BEGIN
    IF to_regclass('pyreplica.fenced') IS NULL THEN
        CREATE TABLE pyreplica.fenced (
            one       boolean      PRIMARY KEY DEFAULT true CHECK (one),    -- at most one row
            fenced_at timestamptz  NOT NULL DEFAULT now(),
            fenced_by name         NOT NULL DEFAULT session_user,
            point     pg_snapshot                  -- first snapshot after the fence (fence_point)
        );
        COMMENT ON TABLE pyreplica.fenced IS 'pyreplica: this node is fenced (read-only) since a switchover';
        REVOKE ALL ON pyreplica.fenced FROM PUBLIC;
        GRANT SELECT ON pyreplica.fenced TO pyreplica_daemon;
    END IF;
END
$fence$;

CREATE OR REPLACE FUNCTION pyreplica.py_log_is_fenced()
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT EXISTS (SELECT FROM pyreplica.fenced);
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_is_fenced() IS 'pyreplica: is this node fenced (switched over)';

-- The fence trigger: every statement that would write a fenced table fails, naming what to do.
-- It runs as the writer, who has no right on pyreplica's schema or functions: it calls none (the
-- table's name as py_log_display writes it, from the trigger's own variables).
CREATE OR REPLACE FUNCTION pyreplica.py_log_fence()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RAISE EXCEPTION 'pyreplica: % is read-only: this database was switched over and is a slave now',
                    CASE WHEN TG_TABLE_SCHEMA = 'public' THEN quote_ident(TG_TABLE_NAME)
                         ELSE format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME) END
        USING ERRCODE = 'read_only_sql_transaction',
              HINT = 'Write on the new master. To make this database writable again (only once no daemon replicates into it): SELECT pyreplica.fence(false);';
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_fence() IS 'pyreplica: refuse writes on a fenced (switched-over) table';

-- Put the fence trigger on one table, unless it is there already.
CREATE OR REPLACE FUNCTION pyreplica.py_log_fence_table(rel regclass)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF EXISTS (SELECT FROM pg_trigger WHERE tgrelid = rel AND tgfoid = 'pyreplica.py_log_fence()'::regprocedure) THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TRIGGER py_log_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION pyreplica.py_log_fence()', rel);
    RETURN true;
END
$fn$;
COMMENT ON FUNCTION pyreplica.py_log_fence_table(regclass) IS 'pyreplica: fence one table';

-- fence(true): fence every captured table and remember it; fence(false): remove every fence
-- trigger (whatever table carries it: one captured once and dropped since too) and forget it.
-- Running it again changes nothing. A line saying what it did.
CREATE OR REPLACE FUNCTION pyreplica.fence("on" boolean)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    fence_on ALIAS FOR $1;
    rel      regclass;
    t        record;
    n        int := 0;
BEGIN
    IF fence_on IS NULL THEN
        RAISE EXCEPTION 'pyreplica: fence(true) or fence(false), not fence(NULL)';
    END IF;
    IF NOT fence_on THEN
        FOR t IN SELECT tgname, tgrelid::regclass AS rel FROM pg_trigger
                  WHERE tgfoid = 'pyreplica.py_log_fence()'::regprocedure ORDER BY tgrelid LOOP
            EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
            n := n + 1;
        END LOOP;
        DELETE FROM pyreplica.fenced;
        RETURN format('unfenced: %s table(s) writable again', n);
    END IF;
    INSERT INTO pyreplica.fenced DEFAULT VALUES ON CONFLICT (one) DO NOTHING;
    -- in oid order, as every run takes its locks: two fences never deadlock each other
    FOR rel IN SELECT DISTINCT tgrelid::regclass FROM pg_trigger
                WHERE pyreplica.py_log_is_capture_fn(tgfoid) ORDER BY 1 LOOP
        IF pyreplica.py_log_fence_table(rel) THEN
            n := n + 1;
        END IF;
    END LOOP;
    RETURN format('fenced: %s more table(s) read-only, %s in all', n,
                  (SELECT count(*) FROM pg_trigger WHERE tgfoid = 'pyreplica.py_log_fence()'::regprocedure));
END
$fn$;
COMMENT ON FUNCTION pyreplica.fence(boolean) IS 'pyreplica: make every captured table read-only (switchover), or writable again';

-- The point a switchover waits for its slave to reach: the first snapshot taken after the fence
-- committed (recorded by the first call, so a switchover run again waits for the same point).
-- Call it in a transaction of its own after fence(true) committed.
CREATE OR REPLACE FUNCTION pyreplica.fence_point()
RETURNS pg_snapshot
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    at pg_snapshot;
BEGIN
    UPDATE pyreplica.fenced SET point = coalesce(point, pg_current_snapshot()) RETURNING point INTO at;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pyreplica: this database is not fenced' USING HINT = 'SELECT pyreplica.fence(true); first.';
    END IF;
    RETURN at;
END
$fn$;
COMMENT ON FUNCTION pyreplica.fence_point() IS 'pyreplica: the first snapshot after the fence (switchover waits for it)';

-- ---------------------------------------------------------------------------------------------
-- The install guide's names, in schema public: thin entry points, each an exact (text) match
-- that calls the real function by its qualified name, and the log as a view.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public.py_log_create_tg(tablename text)
RETURNS SETOF text LANGUAGE sql
AS $fn$ SELECT pyreplica.py_log_create_tg(tablename) $fn$;
COMMENT ON FUNCTION public.py_log_create_tg(text) IS 'pyreplica: entry point of pyreplica.py_log_create_tg';

CREATE OR REPLACE FUNCTION public.py_log_drop_tg(tablename text)
RETURNS text LANGUAGE sql
AS $fn$ SELECT pyreplica.py_log_drop_tg(tablename) $fn$;
COMMENT ON FUNCTION public.py_log_drop_tg(text) IS 'pyreplica: entry point of pyreplica.py_log_drop_tg';

CREATE OR REPLACE FUNCTION public.py_log_sql(statement text)
RETURNS bigint LANGUAGE sql
AS $fn$ SELECT pyreplica.py_log_sql(statement) $fn$;
COMMENT ON FUNCTION public.py_log_sql(text) IS 'pyreplica: entry point of pyreplica.py_log_sql';

CREATE OR REPLACE FUNCTION public.py_log_sql_only(statement text)
RETURNS bigint LANGUAGE sql
AS $fn$ SELECT pyreplica.py_log_sql_only(statement) $fn$;
COMMENT ON FUNCTION public.py_log_sql_only(text) IS 'pyreplica: entry point of pyreplica.py_log_sql_only';

CREATE OR REPLACE FUNCTION public.py_log_create_seq(seqname text)
RETURNS text LANGUAGE sql
AS $fn$ SELECT pyreplica.py_log_create_seq(seqname) $fn$;
COMMENT ON FUNCTION public.py_log_create_seq(text) IS 'pyreplica: entry point of pyreplica.py_log_create_seq';

CREATE OR REPLACE FUNCTION public.py_log_drop_seq(seqname text)
RETURNS text LANGUAGE sql
AS $fn$ SELECT pyreplica.py_log_drop_seq(seqname) $fn$;
COMMENT ON FUNCTION public.py_log_drop_seq(text) IS 'pyreplica: entry point of pyreplica.py_log_drop_seq';

DO $view$
BEGIN
    IF to_regclass('public.replica_log') IS NULL THEN
        CREATE VIEW public.replica_log AS SELECT * FROM pyreplica.replica_log;
        COMMENT ON VIEW public.replica_log IS 'pyreplica: the log (pyreplica.replica_log), as the install guide reads it';
        REVOKE ALL ON public.replica_log FROM PUBLIC;
    END IF;
END
$view$;

-- Only superusers (and roles the administrator grants them to) manage replication; the daemon's
-- role may call its API. Every pyreplica function is found by its comment, none is forgotten.
DO $grants$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname IN ('pyreplica', 'public') AND obj_description(p.oid, 'pg_proc') LIKE 'pyreplica:%' LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
    GRANT EXECUTE ON FUNCTION pyreplica.captured_tables(), pyreplica.py_log_is_captured(regclass), pyreplica.py_log_is_capture_fn(oid),
        pyreplica.unapplied(pg_snapshot),
        pyreplica.register_slave(text, pg_snapshot, text, text), pyreplica.log_start(),
        pyreplica.claim_slave(text, text, text), pyreplica.confirm(text, pg_snapshot, bigint, bigint, text, text),
        pyreplica.confirm(text, pg_snapshot, bigint, bigint),
        pyreplica.rewind_slave(text, pg_snapshot, bigint),
        pyreplica.batch_end(pg_snapshot, pg_snapshot, bigint), pyreplica.snapshot_covers(pg_snapshot, pg_snapshot),
        pyreplica.touch(text), pyreplica.prune(), pyreplica.drop_slave(text),
        pyreplica.skip_event(text, bigint), pyreplica.sequence_values()
        TO pyreplica_daemon;
END
$grants$;

COMMIT;
