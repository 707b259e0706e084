-- pyreplica: slave side, created by the daemon on its first start (idempotent).
-- The position lives here, and is updated in the same transaction as the changes it covers.

CREATE SCHEMA IF NOT EXISTS pyreplica;

CREATE TABLE IF NOT EXISTS pyreplica.position (
    slave      text        PRIMARY KEY,      -- this slave's name on the master
    snapshot   pg_snapshot NOT NULL,         -- master snapshot applied up to (docs/design.md §4)
    batch_id   bigint      NOT NULL,         -- last batch committed; names the 2PC transactions
    applied    bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Apply a chunk of statements in one round trip, checking each: an INSERT, UPDATE or DELETE must
-- touch exactly rows[i] rows (1 for one event; k for k consecutive INSERTs merged into one
-- multi-row INSERT), else it is a conflict. Any error names the (first) event of the statement.
DROP FUNCTION IF EXISTS pyreplica.apply_events(bigint[], text[], text[], text[]);
CREATE OR REPLACE FUNCTION pyreplica.apply_events(ids bigint[], ops text[], rels text[], stmts text[], rows int[])
RETURNS int
LANGUAGE plpgsql
AS $fn$
DECLARE
    i    int := 0;
    n    bigint;
    verb text;
BEGIN
    -- a WHILE loop, not FOR: a FOR loop's variable would hide i from the exception handler
    WHILE i < coalesce(array_length(ids, 1), 0) LOOP
        i := i + 1;
        EXECUTE stmts[i];
        IF ops[i] IN ('I', 'U', 'D') THEN
            GET DIAGNOSTICS n = ROW_COUNT;
            IF n <> rows[i] THEN
                verb := CASE ops[i] WHEN 'I' THEN 'INSERT' WHEN 'U' THEN 'UPDATE' ELSE 'DELETE' END;
                RAISE EXCEPTION 'conflict at event % (% on %): the % matched % rows on the slave, expected %',
                                ids[i], verb, rels[i], verb, n, rows[i]
                      USING ERRCODE = 'PR001', HINT = 'Make the row on the slave match the master''s, then replay resumes.';
            END IF;
        END IF;
    END LOOP;
    RETURN coalesce(array_length(ids, 1), 0);
EXCEPTION
    WHEN SQLSTATE 'PR001' THEN
        RAISE;
    WHEN OTHERS THEN
        -- i still holds the failing event's index: name it, keep PostgreSQL's message and code.
        RAISE EXCEPTION 'error at event % (% on %): %', ids[i],
                        CASE ops[i] WHEN 'I' THEN 'INSERT' WHEN 'U' THEN 'UPDATE' WHEN 'D' THEN 'DELETE'
                                    WHEN 'T' THEN 'TRUNCATE' ELSE 'SQL' END,
                        coalesce(rels[i], '-'), SQLERRM
              USING ERRCODE = SQLSTATE;
END
$fn$;
