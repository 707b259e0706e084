-- pyreplica: remove the master side.
--
--   psql somedb -f master-uninstall.sql        (as a superuser)
--
-- Drops every capture trigger pyreplica created and every object master-install.sql created, the
-- log included, and nothing else: pyreplica's functions are found by their 'pyreplica:' comment,
-- so a slave's own objects in schema pyreplica (a node that is master and slave) stay.
-- One transaction: all or nothing.

\set ON_ERROR_STOP on
BEGIN;
SET LOCAL client_min_messages = warning;
SET LOCAL search_path = pg_catalog, pg_temp;
SET LOCAL lock_timeout = '10s';

DO $drop$
DECLARE
    t record;
    f regprocedure;
BEGIN
    -- both capture trigger functions (py_log_replica, and py_log_replica_unpinned since pyreplica 4)
    FOR t IN SELECT tgname, tgrelid::regclass AS rel FROM pg_trigger
              WHERE tgfoid IN (SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                                WHERE n.nspname = 'pyreplica' AND p.proname IN ('py_log_replica', 'py_log_replica_unpinned')
                                  AND p.pronargs = 0) LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
    IF to_regprocedure('pyreplica.py_log_fence()') IS NOT NULL THEN     -- switchover's fence
        FOR t IN SELECT tgname, tgrelid::regclass AS rel FROM pg_trigger
                  WHERE tgfoid = 'pyreplica.py_log_fence()'::regprocedure LOOP
            EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
        END LOOP;
    END IF;
    DROP EVENT TRIGGER IF EXISTS py_log_replica_ddl;
    DROP EVENT TRIGGER IF EXISTS py_log_replica_ddl_start;
    DROP EVENT TRIGGER IF EXISTS py_log_replica_ddl_drop;
    IF obj_description(to_regclass('public.replica_log'), 'pg_class') LIKE 'pyreplica:%' THEN
        DROP VIEW public.replica_log;
    END IF;
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname IN ('pyreplica', 'public') AND obj_description(p.oid, 'pg_proc') LIKE 'pyreplica:%'
                LOOP
        EXECUTE format('DROP FUNCTION %s', f);
    END LOOP;
    DROP TABLE IF EXISTS pyreplica.replica_log, pyreplica.replica_slaves, pyreplica.log_pruned, pyreplica.ticks,
                         pyreplica.skipped_events, pyreplica.replica_sequences,
                         pyreplica.settings, pyreplica.fenced;
    IF NOT EXISTS (SELECT FROM pg_class c WHERE c.relnamespace = 'pyreplica'::regnamespace)
       AND NOT EXISTS (SELECT FROM pg_proc p WHERE p.pronamespace = 'pyreplica'::regnamespace)
       AND NOT EXISTS (SELECT FROM pg_type ty WHERE ty.typnamespace = 'pyreplica'::regnamespace) THEN
        DROP SCHEMA pyreplica;
    END IF;
EXCEPTION WHEN invalid_schema_name THEN
    NULL;   -- never installed
END
$drop$;

-- The daemon's role is cluster-wide: it goes only when this script's install made it and no
-- database of the cluster still grants it anything (DROP ROLE refuses then).
DO $role$
BEGIN
    IF EXISTS (SELECT FROM pg_roles r WHERE r.rolname = 'pyreplica_daemon'
                AND shobj_description(r.oid, 'pg_authid') LIKE 'pyreplica:%') THEN
        BEGIN
            DROP ROLE pyreplica_daemon;
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE NOTICE 'pyreplica: role pyreplica_daemon is still used elsewhere, left in place';
        END;
    END IF;
END
$role$;

-- PL/Python goes only if master-install.sql created it (it said so in the extension's comment) and
-- no function of this database is written in it any more.
DO $lang$
BEGIN
    IF EXISTS (SELECT FROM pg_extension e
                WHERE e.extname = 'plpython3u'
                  AND obj_description(e.oid, 'pg_extension') LIKE '%created by pyreplica%')
       AND NOT EXISTS (SELECT FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
                        WHERE l.lanname = 'plpython3u') THEN
        BEGIN
            DROP EXTENSION plpython3u;
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE NOTICE 'pyreplica: plpython3u is still used here, left installed';
        END;
    END IF;
END
$lang$;

COMMIT;
