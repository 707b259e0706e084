"""The apply planner (docs/design.md §6) without a server: merging, parsing, the UPDATE fast path's SQL."""
from pyreplica.apply import (Statement, UpdateRun, merge_inserts, merge_truncates, merge_updates, parse_update,
                             plan)
from pyreplica.batch import Event

TYPES = {"public.t": {"id": "integer", "v": "text", "c": "bpchar"}}


def column_types(relname):
    return TYPES.get(relname)


def ev(id, op, sql, relname="public.t", txid="100"):
    return Event(id, txid, relname, op, sql, "postgres")


def st(id, op, sql, relname="public.t", rows=1):
    return Statement(id, op, relname, sql, rows)


# -- merge_inserts --------------------------------------------------------------------------------

def test_consecutive_inserts_with_the_same_head_become_one_statement():
    statements = [st(1, "I", "INSERT INTO public.t (id, v) VALUES (1, 'a')"),
                  st(2, "I", "INSERT INTO public.t (id, v) VALUES (2, 'it''s')"),
                  st(3, "I", "INSERT INTO public.t (id, v) OVERRIDING SYSTEM VALUE VALUES (3, 'c')"),
                  st(4, "I", "INSERT INTO public.t (id, v) OVERRIDING SYSTEM VALUE VALUES (4, 'd')"),
                  st(5, "I", "INSERT INTO public.t (id) VALUES (5)"),
                  st(6, "D", "DELETE FROM public.t WHERE id = '5'"),
                  st(7, "I", "INSERT INTO public.t (id) VALUES (6)")]
    assert merge_inserts(statements) == [
        st(1, "I", "INSERT INTO public.t (id, v) VALUES (1, 'a'), (2, 'it''s')", rows=2),
        st(3, "I", "INSERT INTO public.t (id, v) OVERRIDING SYSTEM VALUE VALUES (3, 'c'), (4, 'd')", rows=2),
        st(5, "I", "INSERT INTO public.t (id) VALUES (5)"),
        st(6, "D", "DELETE FROM public.t WHERE id = '5'"),
        st(7, "I", "INSERT INTO public.t (id) VALUES (6)")]


def test_inserts_into_other_tables_or_odd_identifiers_merge_only_with_their_own_head():
    odd = 'INSERT INTO "my ""s"""."T, x" ("a, b", "VALUES (") VALUES (1, \'VALUES (\')'
    statements = [st(1, "I", odd, relname='"my ""s"""."T, x"'),
                  st(2, "I", odd.replace("(1,", "(2,"), relname='"my ""s"""."T, x"'),
                  st(3, "I", "INSERT INTO public.t (id) VALUES (1)")]
    merged = merge_inserts(statements)
    assert [(s.first_event, s.rows) for s in merged] == [(1, 2), (3, 1)]
    assert merged[0].sql == odd + ", (2, 'VALUES (')"
    assert merged[0].merged and not merged[1].merged


# -- parse_update ---------------------------------------------------------------------------------

def test_parse_update_reads_escaped_literals_quotes_separators_and_null():
    sql = ('UPDATE public."a ""b""" SET "x, AND y" = E\'back\\\\slash \'\' , AND z = \'\'w\'\'\', '
           'n = NULL, "q" = \'\' WHERE "k""" = \'a, AND b = \'\'c\'\'\' AND id = \'5\'')
    assert parse_update(sql) == (
        'public."a ""b"""',
        (('"x, AND y"', "E'back\\\\slash '' , AND z = ''w'''"), ("n", "NULL"), ('"q"', "''")),
        (('"k"""', "'a, AND b = ''c'''"), ("id", "'5'")))


def test_parse_update_refuses_what_the_capture_does_not_write():
    assert parse_update("UPDATE public.t SET v = 'a' WHERE id = '1' OR true") is None
    assert parse_update("UPDATE public.t SET v = now() WHERE id = '1'") is None
    assert parse_update("UPDATE public.t SET v = 'unterminated WHERE id = '1'") is None


# -- merge_updates / UpdateRun ----------------------------------------------------------------------

def upd(id, key, value, column="v"):
    return st(id, "U", f"UPDATE public.t SET {column} = {value} WHERE id = {key}")


def test_updateRun_sql_casts_to_types_and_numbers_the_rows():
    run = UpdateRun(upd(1, "'1'", "'a'"), "public.t", ("v", "c"), ("id",))
    run.add(("'1'",), ("'a'", "NULL"))
    run.add(("'2'",), ("E'b\\\\'", "'xy'"))
    assert run.sql(TYPES["public.t"]) == (
        "WITH pyreplica_u AS (UPDATE public.t AS pyreplica_t SET v = pyreplica_v.p1::text, "
        "c = pyreplica_v.p2::bpchar FROM (VALUES (1, '1', 'a', NULL), (2, '2', E'b\\\\', 'xy')) "
        "AS pyreplica_v(n, p0, p1, p2) WHERE pyreplica_t.id = pyreplica_v.p0::integer RETURNING pyreplica_v.n) "
        "SELECT n FROM pyreplica_u GROUP BY n HAVING count(*) = 1")


def test_updates_of_distinct_keys_merge_and_a_repeated_key_or_other_columns_start_a_new_run():
    statements = [upd(1, "'1'", "'a'"), upd(2, "'2'", "'b'"), upd(3, "'1'", "'c'"),   # key 1 again
                  upd(4, "'3'", "'d'", column="c"), upd(5, "'4'", "'e'", column="c"),
                  upd(6, "'5'", "'f'")]
    merged = merge_updates(statements, column_types)
    assert [(s.first_event, s.op, s.rows) for s in merged] == [(1, "U", 2), (3, "U", 1), (4, "U", 2), (6, "U", 1)]
    assert merged[1] == statements[2] and merged[3] == statements[5]
    assert "(VALUES (1, '1', 'a'), (2, '2', 'b'))" in merged[0].sql


def test_a_key_change_or_a_table_the_slave_lacks_is_replayed_as_it_came():
    key_change = st(1, "U", "UPDATE public.t SET id = '9' WHERE id = '1'")
    statements = [key_change, upd(2, "'2'", "'b'"),
                  st(3, "U", "UPDATE public.gone SET v = 'x' WHERE id = '1'", relname="public.gone"),
                  st(4, "U", "UPDATE public.gone SET v = 'y' WHERE id = '2'", relname="public.gone")]
    assert merge_updates(statements, column_types) == statements


# -- TRUNCATE -------------------------------------------------------------------------------------

def test_truncates_of_one_transaction_are_one_statement_without_cascade():
    events = [ev(1, "T", 'TRUNCATE public.a CASCADE', relname="public.a"),
              ev(2, "T", 'TRUNCATE public."B" CASCADE', relname='public."B"'),
              ev(3, "T", 'TRUNCATE public.c', relname="public.c", txid="101"),   # another transaction
              ev(4, "I", "INSERT INTO public.t (id) VALUES (1)"),
              ev(5, "T", 'TRUNCATE public.a', relname="public.a", txid="101")]
    expected = [st(1, "T", 'TRUNCATE public.a, public."B"', relname='public.a, public."B"', rows=2),
                st(3, "T", "TRUNCATE public.c", relname="public.c"),
                st(4, "I", "INSERT INTO public.t (id) VALUES (1)"),
                st(5, "T", "TRUNCATE public.a", relname="public.a")]
    assert merge_truncates(events) == expected
    # not a speed-up but what the master did: also when replaying precisely
    assert plan(events, column_types, precise=True) == expected
    assert not expected[0].merged


def test_plan_merges_only_when_not_precise():
    events = [ev(1, "I", "INSERT INTO public.t (id) VALUES (1)"), ev(2, "I", "INSERT INTO public.t (id) VALUES (2)"),
              ev(3, "U", "UPDATE public.t SET v = 'a' WHERE id = '1'"),
              ev(4, "U", "UPDATE public.t SET v = 'b' WHERE id = '2'")]
    assert [(s.first_event, s.rows) for s in plan(events, column_types)] == [(1, 2), (3, 2)]
    assert plan(events, column_types, precise=True) == [st(e.id, e.op, e.sql) for e in events]
