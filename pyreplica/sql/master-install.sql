-- pyreplica: master side.
--
--   psql somedb -f master-install.sql          (as a superuser)
--
-- Installs, in schema public: the log table replica_log (+ sequence replica_log_id_seq), the slave
-- registry replica_slaves, the capture trigger function py_log_replica, py_log_create_tg /
-- py_log_drop_tg to put it on tables, py_log_sql to log an administrator's SQL, and the functions
-- the daemon calls (replica_register_slave, replica_confirm, replica_prune, replica_drop_slave).
-- Running it again changes nothing and loses no log row. master-uninstall.sql removes it all.
--
-- The whole script is one transaction: on any error nothing is left half-installed.

\set ON_ERROR_STOP on
BEGIN;
SET LOCAL client_min_messages = warning;

DO $check$
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

-- ---------------------------------------------------------------------------------------------
-- The log. One row per row change (or per TRUNCATE, or per administrator's statement).
-- ---------------------------------------------------------------------------------------------
CREATE SEQUENCE IF NOT EXISTS public.replica_log_id_seq;

CREATE TABLE IF NOT EXISTS public.replica_log (
    id       bigint      NOT NULL DEFAULT nextval('public.replica_log_id_seq') PRIMARY KEY,
    sql      text        NOT NULL,
    username name        NOT NULL DEFAULT session_user,
    ts       timestamptz NOT NULL DEFAULT now()
);
-- Columns added over the original PyReplica's (an old log table is upgraded in place).
ALTER TABLE public.replica_log
    ADD COLUMN IF NOT EXISTS txid    xid8 NOT NULL DEFAULT pg_current_xact_id(),
    ADD COLUMN IF NOT EXISTS relname text,
    ADD COLUMN IF NOT EXISTS op      "char" NOT NULL DEFAULT 'S';
ALTER SEQUENCE public.replica_log_id_seq OWNED BY public.replica_log.id;
-- Batches are chosen by transaction id (see the daemon's batch module).
CREATE INDEX IF NOT EXISTS replica_log_txid_idx ON public.replica_log (txid);

COMMENT ON TABLE public.replica_log IS
    'pyreplica: every replicated change as the SQL statement that repeats it on a slave';

-- ---------------------------------------------------------------------------------------------
-- The slave registry: where each slave has got to (for status and pruning).
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS public.replica_slaves (
    name          text        PRIMARY KEY,
    confirmed     pg_snapshot NOT NULL,    -- the master snapshot the slave has applied up to
    batch_id      bigint      NOT NULL DEFAULT 0,
    applied       bigint      NOT NULL DEFAULT 0,   -- events applied since registration
    confirmed_at  timestamptz NOT NULL DEFAULT now(),
    last_contact  timestamptz NOT NULL DEFAULT now(),
    registered_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE public.replica_slaves IS 'pyreplica: one row per slave, its confirmed position';

REVOKE ALL ON public.replica_log, public.replica_log_id_seq, public.replica_slaves FROM PUBLIC;

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

-- The query that logs one statement's rows of table `rel` for operation `op` (I, U, D, T).
-- py_log_replica prepares it once per backend, table and column signature.
CREATE OR REPLACE FUNCTION public.py_log_capture_sql(rel regclass, op "char")
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    target    text := format('%I.%I', (SELECT nspname FROM pg_namespace n JOIN pg_class c ON c.relnamespace = n.oid WHERE c.oid = rel),
                                      (SELECT relname FROM pg_class WHERE oid = rel));
    cols      text[];      -- quoted names of the columns a statement writes (no generated ones)
    pk        text[];      -- quoted names of the primary-key columns
    overriding text := '';
    rn        text := 'pyreplica_rn';   -- the row-number column pairing old and new rows
    stmt      text;
BEGIN
    SELECT array_agg(quote_ident(attname) ORDER BY attnum),
           bool_or(attidentity = 'a')
      INTO cols, overriding
      FROM pg_attribute
     WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped AND attgenerated = '';
    overriding := CASE WHEN overriding::bool THEN ' OVERRIDING SYSTEM VALUE' ELSE '' END;

    SELECT array_agg(quote_ident(a.attname) ORDER BY k.ord)
      INTO pk
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary;

    IF op = 'T' THEN
        -- CASCADE: a TRUNCATE that succeeded here truncated every table referencing this one too,
        -- and on a slave with the same schema a plain TRUNCATE of it would fail on those foreign keys.
        RETURN format($q$INSERT INTO public.replica_log (txid, relname, op, sql)
                         VALUES (pg_current_xact_id(), %L, 'T', %L)$q$,
                      target, 'TRUNCATE ' || target || ' CASCADE');
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
        RETURN format($q$INSERT INTO public.replica_log (txid, relname, op, sql)
                         SELECT pg_current_xact_id(), %L, 'I', %s FROM pyreplica_new n$q$, target, stmt);
    ELSIF op = 'D' THEN
        -- DELETE FROM t WHERE id = '1'
        stmt := format($q$%L || %s$q$, format('DELETE FROM %s WHERE ', target),
                       (SELECT string_agg(format($e$%L || format('%%L', o.%s)$e$, c || ' = ', c), $s$ || ' AND ' || $s$) FROM unnest(pk) c));
        RETURN format($q$INSERT INTO public.replica_log (txid, relname, op, sql)
                         SELECT pg_current_xact_id(), %L, 'D', %s FROM pyreplica_old o$q$, target, stmt);
    ELSIF op = 'U' THEN
        -- UPDATE t SET b = 'y' WHERE id = '1'; only changed columns, nothing for a no-op row.
        -- Old and new rows are paired by position: PostgreSQL appends each updated row's old and
        -- new versions to the two transition tables in lockstep (trigger.c, TransitionTableAddTuple),
        -- so the k-th row of one is the k-th row of the other, even when the primary key changed.
        -- Values are compared by their text form, which works for every type (json has no "=")
        -- and sees changes "=" would hide (1.0 -> 1.00).
        WHILE quote_ident(rn) = ANY (cols) LOOP    -- a table may have a column of that name
            rn := rn || '_';
        END LOOP;
        stmt := format($q$array_to_string(ARRAY[%s], ', ')$q$,
                       (SELECT string_agg(format($e$CASE WHEN format('%%L', o.%1$s) IS DISTINCT FROM format('%%L', n.%1$s) THEN %2$L || format('%%L', n.%1$s) END$e$, c, c || ' = '), ', ')
                          FROM unnest(cols) c));
        RETURN format($q$INSERT INTO public.replica_log (txid, relname, op, sql)
                         SELECT pg_current_xact_id(), %L, 'U', %L || s.set_list || %L || %s
                           FROM (SELECT row_number() OVER () AS %6$I, * FROM pyreplica_old) o
                           JOIN (SELECT row_number() OVER () AS %6$I, * FROM pyreplica_new) n USING (%6$I)
                          CROSS JOIN LATERAL (SELECT %5$s AS set_list) s
                          WHERE s.set_list <> ''
                          ORDER BY %6$I$q$,
                      target, format('UPDATE %s SET ', target), ' WHERE ',
                      (SELECT string_agg(format($e$%L || format('%%L', o.%s)$e$, c || ' = ', c), $s$ || ' AND ' || $s$) FROM unnest(pk) c),
                      stmt, rn);
    END IF;
    RAISE EXCEPTION 'pyreplica: unknown operation %', op;
END
$fn$;

-- The capture trigger. Kept tiny: find (or prepare once per backend) the logging query for this
-- table, operation and column signature, run it, NOTIFY. PostgreSQL folds identical NOTIFYs of one
-- transaction into one, so listeners get one notification per writing transaction.
CREATE OR REPLACE FUNCTION public.py_log_replica()
RETURNS trigger
LANGUAGE plpython3u
SECURITY DEFINER
-- Only the settings that change what format('%L') writes in a way a slave could read otherwise:
-- every SET clause costs each call. Not pinned, because they cannot: TimeZone (ISO dates carry an
-- explicit offset), bytea_output (both formats read back the same), standard_conforming_strings
-- (quote_literal writes E'' strings when there is a backslash), xmloption (input only).
SET search_path = pg_catalog, pg_temp
SET "DateStyle" = 'ISO, YMD'
SET "IntervalStyle" = 'iso_8601'
SET extra_float_digits = 1
SET lc_monetary = 'C'
AS $py$
# TD["args"][0] is the table's column signature, renewed by py_log_replica_ddl whenever
# ALTER TABLE changes the columns: a new signature means a new query.
# No NOTIFY while pyreplica replays (session_replication_role = replica, reached only by
# ENABLE ALWAYS triggers in a cascade): PostgreSQL refuses to PREPARE a transaction that sent one;
# the daemon notifies this database's listeners itself once the batch is committed.
NOTIFY = "SELECT pg_notify('replicas', '') WHERE current_setting('session_replication_role') <> 'replica'"
key = (TD["relid"], TD["event"], tuple(TD["args"] or ()))
plan = SD.get(key)
if plan is None:
    op = {"INSERT": "I", "UPDATE": "U", "DELETE": "D", "TRUNCATE": "T"}[TD["event"]]
    text = plpy.execute(plpy.prepare("SELECT public.py_log_capture_sql($1, $2) AS q", ["oid", '"char"']),
                        [TD["relid"], op])[0]["q"]
    plan = SD[key] = (plpy.prepare(text), plpy.prepare(NOTIFY))
if plpy.execute(plan[0]).nrows() > 0 or TD["event"] == "TRUNCATE":
    plpy.execute(plan[1])
$py$;

-- The signature of what a table's capture query is made of: it changes when the table is renamed
-- or moved to another schema, a column is added, dropped, renamed or retyped, becomes generated or
-- an identity, or the primary key changes (columns or deferrability).
CREATE OR REPLACE FUNCTION public.py_log_signature(rel regclass)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT md5(rel::text || ':'
               || coalesce(string_agg(format('%s:%s:%s:%s:%s:%s', attnum, attname, atttypid, atttypmod, attgenerated, attidentity), ',' ORDER BY attnum), '')
               || coalesce((SELECT indkey::text || indimmediate::text FROM pg_index WHERE indrelid = rel AND indisprimary), ''))
      FROM pg_attribute
     WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped;
$fn$;

-- Resolve a table name as the install guide's query passes it (pg_class.relname as it is, whatever
-- its case, spaces or dots) or as a person types it ('name', 'schema.name', "Quoted"."Names").
-- A bare name found in one schema only is that table even off the search_path; a bare name found
-- in several schemas is a problem, not a guess. Temporary tables are not candidates (a slave has
-- none of them). Returns the table, or NULL and a line saying what is wrong.
CREATE OR REPLACE FUNCTION public.py_log_resolve(tablename text, OUT rel regclass, OUT problem text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    parts   text[];
    bare    text;
    schemas text[];
BEGIN
    -- 1. the relname itself, as the guide's query passes it
    bare := tablename;
    SELECT array_agg(n.nspname ORDER BY n.nspname), min(c.oid) INTO schemas, rel
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relname = bare AND c.relkind IN ('r', 'p') AND c.relpersistence <> 't';
    IF schemas IS NULL THEN
        -- 2. an SQL name: unquoted parts fold to lower case
        BEGIN
            parts := parse_ident(tablename);
        EXCEPTION WHEN others THEN
            problem := format('table %s does not exist (couldn''t be replicated)!', tablename);
            RETURN;
        END;
        IF array_length(parts, 1) = 2 THEN
            SELECT c.oid INTO rel FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = parts[1] AND c.relname = parts[2] AND c.relkind IN ('r', 'p')
               AND c.relpersistence <> 't';
        ELSIF array_length(parts, 1) = 1 THEN
            bare := parts[1];
            SELECT array_agg(n.nspname ORDER BY n.nspname), min(c.oid) INTO schemas, rel
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relname = bare AND c.relkind IN ('r', 'p') AND c.relpersistence <> 't';
        ELSE
            problem := format('table %s: expected name or schema.name (couldn''t be replicated)!', tablename);
            RETURN;
        END IF;
    END IF;
    IF array_length(schemas, 1) > 1 THEN
        rel := NULL;
        problem := format('table %s exists in several schemas (%s): give it as schema.name, e.g. %s',
                          tablename, array_to_string(schemas, ', '), format('%I.%I', schemas[1], bare));
    ELSIF rel IS NULL THEN
        problem := format('table %s does not exist (couldn''t be replicated)!', tablename);
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION public.py_log_is_own_table(rel regclass)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT rel IN ('public.replica_log'::regclass, 'public.replica_slaves'::regclass)
        OR (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel) = 'pyreplica';
$fn$;

-- The tables whose capture triggers go with rel's: rel and, for a partitioned table, every
-- partition below it. A statement fires the statement-level triggers of the table it names only,
-- so a row written straight into a partition is seen by that partition's triggers alone.
CREATE OR REPLACE FUNCTION public.py_log_members(rel regclass)
RETURNS SETOF regclass
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT rel
    UNION
    SELECT relid FROM pg_partition_tree(rel) WHERE relid::oid IN (SELECT oid FROM pg_class WHERE relkind IN ('r', 'p'));
$fn$;

-- (Re)create the four capture triggers of one table; returns its primary-key columns.
-- Raises if the table has no primary key.
CREATE OR REPLACE FUNCTION public.py_log_add_triggers(rel regclass)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    pkcols text;
    sig    text := public.py_log_signature(rel);
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
    PERFORM public.py_log_drop_triggers(rel);
    FOREACH ev IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
        EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s %s FOR EACH STATEMENT EXECUTE FUNCTION public.py_log_replica(%L)',
                       base || '_replica_tg' || CASE ev WHEN 'insert' THEN '' ELSE '_' || left(ev, 1) END,
                       upper(ev), rel,
                       CASE ev WHEN 'insert' THEN 'REFERENCING NEW TABLE AS pyreplica_new'
                               WHEN 'update' THEN 'REFERENCING OLD TABLE AS pyreplica_old NEW TABLE AS pyreplica_new'
                               WHEN 'delete' THEN 'REFERENCING OLD TABLE AS pyreplica_old'
                               ELSE '' END,
                       sig);
    END LOOP;
    RETURN pkcols;
END
$fn$;

-- Put the capture triggers on a table (and its partitions). Returns one line per table saying what
-- happened; a problem with one table is such a line, never an error, so that the install guide's
-- query over every table always completes. pyreplica's own tables yield no line at all.
CREATE OR REPLACE FUNCTION public.py_log_create_tg(tablename text)
RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r       record;
    member  regclass;
    pkcols  text;
BEGIN
    SELECT * INTO r FROM public.py_log_resolve(tablename);
    IF r.problem IS NOT NULL THEN
        RETURN NEXT r.problem;
        RETURN;
    END IF;
    IF public.py_log_is_own_table(r.rel) THEN
        RAISE NOTICE 'pyreplica: % is pyreplica''s own table, not replicated', r.rel;
        RETURN;
    END IF;
    IF (SELECT relispartition FROM pg_class WHERE oid = r.rel) THEN
        RETURN NEXT format('table %s is a partition: replicate its partitioned table %s instead',
                           tablename, pg_partition_root(r.rel));
        RETURN;
    END IF;
    IF EXISTS (SELECT FROM pg_inherits WHERE inhrelid = r.rel) THEN
        RETURN NEXT format('table %s inherits from another table (couldn''t be replicated)!', tablename);
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_index WHERE indrelid = r.rel AND indisprimary) THEN
        RETURN NEXT format('table %s has no pk constraint (couldn''t be replicated)!', tablename);
        RETURN;
    END IF;
    -- A deferrable key may hold duplicates until the end of a statement or transaction, so a
    -- logged "WHERE key = ..." could then match two rows on the slave: refused, not corrupted.
    IF EXISTS (SELECT FROM pg_index WHERE indrelid = r.rel AND indisprimary AND NOT indimmediate) THEN
        RETURN NEXT format('table %s has a deferrable pk constraint (couldn''t be replicated)!', tablename);
        RETURN;
    END IF;
    FOR member IN SELECT public.py_log_members(r.rel) LOOP
        IF member = r.rel THEN
            pkcols := public.py_log_add_triggers(member);
        ELSE
            PERFORM public.py_log_add_triggers(member);
        END IF;
    END LOOP;
    RETURN NEXT format('created trigger on %s (%s)', tablename, pkcols);
END
$fn$;

-- Drop pyreplica's capture triggers from a table, whatever their names (the table may have been
-- renamed since). Returns how many were dropped.
CREATE OR REPLACE FUNCTION public.py_log_drop_triggers(rel regclass)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    t    record;
    n    int := 0;
BEGIN
    FOR t IN SELECT tgname FROM pg_trigger
              WHERE tgrelid = rel AND tgfoid = 'public.py_log_replica()'::regprocedure LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, rel);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$fn$;

-- Stop replicating a table (and its partitions).
CREATE OR REPLACE FUNCTION public.py_log_drop_tg(tablename text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r record;
    n int := 0;
BEGIN
    SELECT * INTO r FROM public.py_log_resolve(tablename);
    IF r.problem IS NOT NULL THEN
        RETURN r.problem;
    END IF;
    SELECT sum(public.py_log_drop_triggers(m)) INTO n FROM public.py_log_members(r.rel) m;
    IF n = 0 THEN
        RETURN format('table %s had no replica trigger', tablename);
    END IF;
    RETURN format('dropped trigger on %s', tablename);
END
$fn$;

-- After ALTER TABLE or CREATE TABLE: for every replicated table touched (a partition counts as its
-- partitioned table), renew the column signature of its triggers and its partitions' triggers
-- where it changed, so that every backend prepares a new capture query (a cached one would miss
-- an added column), and put triggers on a partition just created or attached.
CREATE OR REPLACE FUNCTION public.py_log_replica_ddl()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    root   regclass;
    member regclass;
BEGIN
    FOR root IN SELECT DISTINCT coalesce(pg_partition_root(objid), objid)::regclass
                  FROM pg_event_trigger_ddl_commands()
                 WHERE classid = 'pg_class'::regclass AND objsubid = 0
                   AND objid IN (SELECT oid FROM pg_class WHERE relkind IN ('r', 'p')) LOOP
        CONTINUE WHEN NOT EXISTS (SELECT FROM pg_trigger
                                   WHERE tgrelid = root AND tgfoid = 'public.py_log_replica()'::regprocedure);
        FOR member IN SELECT public.py_log_members(root) LOOP
            IF NOT EXISTS (SELECT FROM pg_trigger
                            WHERE tgrelid = member AND tgfoid = 'public.py_log_replica()'::regprocedure
                              AND encode(tgargs, 'escape') = public.py_log_signature(member) || '\000'
                           HAVING count(*) = 4) THEN
                PERFORM public.py_log_add_triggers(member);
            END IF;
        END LOOP;
    END LOOP;
END
$fn$;

-- (Re)created only when missing or different, so that running this script again changes nothing.
DO $evt$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_event_trigger
                    WHERE evtname = 'py_log_replica_ddl' AND evtevent = 'ddl_command_end'
                      AND evtfoid = 'public.py_log_replica_ddl()'::regprocedure
                      AND evttags = ARRAY['ALTER TABLE', 'CREATE TABLE']) THEN
        DROP EVENT TRIGGER IF EXISTS py_log_replica_ddl;
        CREATE EVENT TRIGGER py_log_replica_ddl ON ddl_command_end
            WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE')
            EXECUTE FUNCTION public.py_log_replica_ddl();
    END IF;
END
$evt$;

-- ---------------------------------------------------------------------------------------------
-- An administrator's SQL (DDL to propagate): run here, and logged so every slave runs it too, in
-- the same place of the stream. The slave runs it as the daemon's role.
-- ---------------------------------------------------------------------------------------------
-- Runs with the caller's rights and search_path (an unqualified name means what it means to the
-- caller here; on a slave it is resolved by the daemon's search_path, so qualify names).
CREATE OR REPLACE FUNCTION public.py_log_sql(statement text)
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    logged bigint;
BEGIN
    EXECUTE statement;
    INSERT INTO public.replica_log (txid, relname, op, sql)
    VALUES (pg_current_xact_id(), NULL, 'S', statement)
    RETURNING id INTO logged;
    PERFORM pg_notify('replicas', '');
    RETURN logged;
END
$fn$;
COMMENT ON FUNCTION public.py_log_sql(text) IS
    'pyreplica: run an administrator''s SQL (e.g. ALTER TABLE) here and log it for every slave; returns its log id';

-- ---------------------------------------------------------------------------------------------
-- The daemon's side of the registry (called by pyreplica, never by applications).
-- ---------------------------------------------------------------------------------------------

-- Register a slave at a snapshot (default: the oldest event still in the log, i.e. a snapshot
-- that sees none of the logged transactions). Returns the slave's confirmed snapshot.
CREATE OR REPLACE FUNCTION public.replica_register_slave(slave text, at pg_snapshot DEFAULT NULL)
RETURNS pg_snapshot
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    start pg_snapshot;
BEGIN
    IF at IS NULL THEN
        start := coalesce((SELECT min(txid)::text || ':' || min(txid)::text || ':' FROM public.replica_log),
                          pg_current_snapshot()::text)::pg_snapshot;
    ELSE
        start := at;
    END IF;
    INSERT INTO public.replica_slaves (name, confirmed) VALUES (slave, start)
    ON CONFLICT (name) DO UPDATE SET confirmed = EXCLUDED.confirmed, batch_id = 0, applied = 0,
                                     confirmed_at = now(), last_contact = now(), registered_at = now();
    RETURN start;
END
$fn$;

CREATE OR REPLACE FUNCTION public.replica_confirm(slave text, snap pg_snapshot, batch bigint, events bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    UPDATE public.replica_slaves
       SET confirmed = snap, batch_id = batch, applied = applied + events,
           confirmed_at = now(), last_contact = now()
     WHERE name = slave;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pyreplica: slave "%" is not registered on this master (dropped with drop-slave?)', slave
            USING HINT = 'Register it again with pyreplica clone, or start the daemon with a new slave database.';
    END IF;
END
$fn$;

-- Delete, in small batches, the events every registered slave has confirmed: those of
-- transactions older than the oldest confirmed snapshot's xmin. Returns how many were deleted.
CREATE OR REPLACE FUNCTION public.replica_prune(batch_size int DEFAULT 5000)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    horizon xid8 := (SELECT min(pg_snapshot_xmin(confirmed)) FROM public.replica_slaves);
    deleted bigint;
BEGIN
    IF horizon IS NULL THEN
        RETURN 0;   -- no slave registered yet: keep everything for the first one
    END IF;
    DELETE FROM public.replica_log
     WHERE id IN (SELECT id FROM public.replica_log WHERE txid < horizon LIMIT batch_size);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$fn$;

CREATE OR REPLACE FUNCTION public.replica_drop_slave(slave text)
RETURNS boolean
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH gone AS (DELETE FROM public.replica_slaves WHERE name = slave RETURNING 1)
    SELECT EXISTS (SELECT FROM gone);
$fn$;

-- Only superusers (and roles the administrator grants them to) manage replication.
REVOKE ALL ON FUNCTION public.py_log_replica(), public.py_log_replica_ddl(),
    public.py_log_capture_sql(regclass, "char"), public.py_log_signature(regclass),
    public.py_log_resolve(text), public.py_log_is_own_table(regclass), public.py_log_members(regclass),
    public.py_log_add_triggers(regclass), public.py_log_create_tg(text),
    public.py_log_drop_triggers(regclass), public.py_log_drop_tg(text), public.py_log_sql(text),
    public.replica_register_slave(text, pg_snapshot), public.replica_confirm(text, pg_snapshot, bigint, bigint),
    public.replica_prune(int), public.replica_drop_slave(text)
    FROM PUBLIC;

COMMIT;
