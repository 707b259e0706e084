-- pyreplica: slave side, created by the daemon on its first start (idempotent).
-- The position lives here, and is updated in the same transaction as the changes it covers.

-- Not CREATE SCHEMA IF NOT EXISTS: that checks CREATE on the database even when the schema exists,
-- and a least-privilege daemon role owns a schema an administrator created for it.
DO $$
BEGIN
    IF to_regnamespace('pyreplica') IS NULL THEN
        CREATE SCHEMA pyreplica;
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS pyreplica.position (
    slave      text        PRIMARY KEY,      -- this slave's name on the master
    snapshot   pg_snapshot NOT NULL,         -- master snapshot applied up to (docs/design.md §4)
    batch_id   bigint      NOT NULL,         -- last batch committed; names the 2PC transactions
    applied    bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- The TABLES patterns of the daemon replicating into this slave (empty: every table), written when it
-- starts and with every batch; NULL until a daemon that knows this column has run. add-table
-- refuses a table the running daemon would filter out (docs/design.md §13).
ALTER TABLE pyreplica.position ADD COLUMN IF NOT EXISTS tables text[];

-- Events an administrator told this slave to skip (pyreplica skip-event), never chosen by the daemon:
-- the daemon leaves out exactly the event with this id and transaction, and marks the row in the
-- very transaction of the batch that skipped it (docs/design.md §6). The master keeps its own record
-- (pyreplica.skipped_events there: another name, since a node that is master and slave has both).
CREATE TABLE IF NOT EXISTS pyreplica.skip_requests (
    slave        text        NOT NULL,          -- this slave's name on the master
    event_id     bigint      NOT NULL,          -- the event's id in the master's log
    txid         xid8        NOT NULL,          -- its transaction: an id never stands for another event
    described    text        NOT NULL,          -- e.g. 'UPDATE on public.t'
    requested_by text        NOT NULL DEFAULT session_user,
    requested_at timestamptz NOT NULL DEFAULT now(),
    skipped_at   timestamptz,                   -- NULL until a committed batch has left it out
    batch_id     bigint,                        -- that batch
    PRIMARY KEY (slave, event_id)
);

-- Tables this slave does not take from the stream for now (docs/design.md §13), one row per table
-- and per partition, named as the log names them. The daemon leaves their events out of every batch,
-- reading these rows FOR SHARE in the batch's transaction, so add-table's final step (which takes them
-- FOR UPDATE) is never concurrent with a batch that left events out.
--   copying      add-table is copying the table: its rows come from the copy
--   catching_up  copied at copy_snapshot; add-table itself replays its events up to caught_up, then
--                deletes the row in the transaction that replays the last ones
--   removed      remove-table: its events are left out until add-table copies it again
CREATE TABLE IF NOT EXISTS pyreplica.table_states (
    slave         text        NOT NULL,          -- this slave's name on the master
    relname       text        NOT NULL,          -- "schema"."table", as the log names it
    state         text        NOT NULL CHECK (state IN ('copying', 'catching_up', 'removed')),
    copy_snapshot pg_snapshot,                   -- the master snapshot the copy was read at
    caught_up     pg_snapshot,                   -- the table's events visible here are applied
    changed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slave, relname)
);
-- The daemon locks these rows (FOR SHARE needs UPDATE): when an administrator's add-table created
-- the table, it goes to the schema's owner, the daemon's role in README's least-privilege setup.
DO $$
DECLARE
    schema_owner regrole := (SELECT nspowner FROM pg_namespace WHERE nspname = 'pyreplica');
BEGIN
    IF (SELECT relowner FROM pg_class WHERE oid = 'pyreplica.table_states'::regclass) <> schema_owner THEN
        EXECUTE format('ALTER TABLE pyreplica.table_states OWNER TO %s', schema_owner);
    END IF;
END
$$;

-- Apply a chunk of statements in one round trip, checking each: an INSERT, UPDATE or DELETE must
-- touch exactly rows[i] rows (1 for one event; k for k merged events), else it is a conflict,
-- SQLSTATE PR001 (apply.py's ROW_COUNT_CONFLICT). A failure is returned as data, not raised: the
-- index of the failing statement with PostgreSQL's SQLSTATE, message, DETAIL and HINT; the block's
-- savepoint has undone the chunk's work and the caller's transaction is still usable. All NULL
-- when every statement succeeded.
DROP FUNCTION IF EXISTS pyreplica.apply_events(bigint[], text[], text[], text[]);
DROP FUNCTION IF EXISTS pyreplica.apply_events(bigint[], text[], text[], text[], int[]);
CREATE FUNCTION pyreplica.apply_events(ids bigint[], ops text[], rels text[], stmts text[], rows int[],
                                       OUT failed int, OUT code text, OUT message text,
                                       OUT detail text, OUT hint text)
LANGUAGE plpgsql
-- Its own expressions see pg_catalog only (no function or operator planted in public can stand in
-- for a built-in one here); the replayed statements run with public on the path, as on the master's
-- default one (extension types' operators live there), see REPLAY_PATH and docs/design.md §3.
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    i    int := 0;
    n    bigint;
    verb text;
BEGIN
    -- a WHILE loop, not FOR: a FOR loop's variable would hide i from the exception handler
    WHILE i < coalesce(pg_catalog.array_length(ids, 1), 0) LOOP
        i := i + 1;
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, public', true);  -- REPLAY_PATH
        EXECUTE stmts[i];
        GET DIAGNOSTICS n = ROW_COUNT;      -- (before any other statement: it reads the last one's)
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        IF ops[i] IN ('I', 'U', 'D') THEN
            IF n <> rows[i] THEN
                verb := CASE ops[i] WHEN 'I' THEN 'INSERT' WHEN 'U' THEN 'UPDATE' ELSE 'DELETE' END;
                RAISE EXCEPTION 'the % matched % rows on the slave, expected %', verb, n, rows[i]
                      USING ERRCODE = 'PR001', HINT = 'Make the row on the slave match the master''s, then replay resumes.';
            END IF;
        END IF;
    END LOOP;
EXCEPTION
    WHEN OTHERS THEN
        -- i still holds the failing statement's index
        failed := i;
        GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, message = MESSAGE_TEXT,
                                detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
        detail := nullif(detail, '');
        hint := nullif(hint, '');
END
$fn$;

-- apply.install() runs this script only when this marker (apply.py's SLAVE_SCHEMA_VERSION) is
-- missing: a role without CREATE can replicate once the schema is current.
COMMENT ON FUNCTION pyreplica.apply_events(bigint[], text[], text[], text[], int[]) IS 'pyreplica slave schema 5';
