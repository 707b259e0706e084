-- pyreplica: remove the master side.
--
--   psql somedb -f master-uninstall.sql        (as a superuser)
--
-- Drops every capture trigger pyreplica created and every object master-install.sql created, the
-- log included, and nothing else. One transaction: all or nothing.

\set ON_ERROR_STOP on
BEGIN;
SET LOCAL client_min_messages = warning;

DO $drop_triggers$
DECLARE
    t record;
BEGIN
    IF to_regprocedure('public.py_log_replica()') IS NULL THEN
        RETURN;
    END IF;
    FOR t IN SELECT tgname, tgrelid::regclass AS rel FROM pg_trigger
              WHERE tgfoid = 'public.py_log_replica()'::regprocedure LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
END
$drop_triggers$;

DROP EVENT TRIGGER IF EXISTS py_log_replica_ddl;
DROP FUNCTION IF EXISTS
    public.py_log_replica(), public.py_log_replica_ddl(), public.py_log_capture_sql(regclass, "char"),
    public.py_log_signature(regclass), public.py_log_resolve(text), public.py_log_is_own_table(regclass),
    public.py_log_members(regclass), public.py_log_add_triggers(regclass), public.py_log_create_tg(text), public.py_log_drop_triggers(regclass), public.py_log_drop_tg(text),
    public.py_log_sql(text), public.replica_register_slave(text, pg_snapshot),
    public.replica_confirm(text, pg_snapshot, bigint, bigint), public.replica_prune(int),
    public.replica_drop_slave(text);
DROP TABLE IF EXISTS public.replica_log, public.replica_slaves;
DROP SEQUENCE IF EXISTS public.replica_log_id_seq;

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
