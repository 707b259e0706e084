"""The apply planner (docs/design.md §6) without a server: grouping, parsing, the grouped statements' SQL."""
import pytest

from pyreplica import apply
from pyreplica.apply import Statement, Table, group, merge_truncates, parse_update, plan, values_sql
from pyreplica.batch import Event

pytestmark = pytest.mark.usefixtures("group_small_chunks")

TABLES = {"public.t": Table({"id": "integer", "v": "text", "c": "bpchar"}, ("id",), True),
          "public.u": Table({"id": "integer", "v": "text"}, ("id",), True),
          # a rule or a trigger enabled in replica mode: its events never move past others
          "public.strict": Table({"id": "integer", "v": "text"}, ("id",), False)}


def tables(relname):
    return TABLES.get(relname)


def ev(id, op, sql, relname="public.t", txid="100"):
    return Event(id, txid, relname, op, sql, "postgres")


def st(id, op, sql, relname="public.t", rows=1):
    return Statement(id, op, relname, sql, rows)


def ins(id, key, value="'x'", table="public.t"):
    return st(id, "I", f"INSERT INTO {table} (id, v) VALUES ('{key}', {value})", relname=table)


def upd(id, key, value="'x'", column="v", table="public.t"):
    return st(id, "U", f"UPDATE {table} SET {column} = {value} WHERE id = '{key}'", relname=table)


def dele(id, key, table="public.t"):
    return st(id, "D", f"DELETE FROM {table} WHERE id = '{key}'", relname=table)


def shape(statements):
    return [(s.first_event, s.op, s.relname, s.rows) for s in statements]


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


# -- group ----------------------------------------------------------------------------------------

def test_interleaved_events_on_distinct_rows_become_one_statement_per_table_operation_and_shape():
    statements = [ins(1, 10), upd(2, 1), ins(3, 11, "E'it''s \\\\'"), dele(4, 2), upd(5, 3), dele(6, 4),
                  ins(7, 20, table="public.u"), upd(8, 5, column="c"), ins(9, 21, table="public.u")]
    planned = group(statements, tables)
    assert shape(planned) == [(1, "I", "public.t", 2), (2, "U", "public.t", 2), (4, "D", "public.t", 2),
                              (7, "I", "public.u", 2), (8, "U", "public.t", 1)]
    assert planned[0].sql == "INSERT INTO public.t (id, v) VALUES ('10', 'x'), ('11', E'it''s \\\\')"
    assert "(VALUES (1, '1', 'x'), (2, '3', 'x'))" in planned[1].sql
    assert "USING (VALUES (1, '2'), (2, '4'))" in planned[2].sql
    assert planned[4] == statements[7]      # alone in its group: as it came
    assert all(s.merged for s in planned[:4]) and not planned[4].merged


def test_an_event_on_a_row_the_segment_touched_starts_a_new_segment_so_its_order_holds():
    # key 1: inserted, updated, updated, deleted, inserted again; key 2 twice
    statements = [ins(1, 1), upd(2, 2), upd(3, 1), ins(4, 5), upd(5, 1, "'y'"), upd(6, 2), dele(7, 1), ins(8, 1)]
    planned = group(statements, tables)
    assert shape(planned) == [(1, "I", "public.t", 1), (2, "U", "public.t", 1),    # segment 1: keys 1, 2
                              (3, "U", "public.t", 1), (4, "I", "public.t", 1),    # segment 2: keys 1, 5
                              (5, "U", "public.t", 2),                            # segment 3: keys 1, 2
                              (7, "D", "public.t", 1), (8, "I", "public.t", 1)]    # segments 4 and 5
    assert planned[0] == statements[0] and planned[-1] == statements[-1]
    assert "(VALUES (1, '1', 'y'), (2, '2', 'x'))" in planned[4].sql


def test_a_key_change_a_truncate_another_form_or_a_missing_table_is_a_barrier_replayed_as_it_came():
    barriers = [st(3, "U", "UPDATE public.t SET id = '9' WHERE id = '3'"),
                st(6, "T", "TRUNCATE public.u", relname="public.u"),
                st(9, "U", "UPDATE public.t SET v = upper(v) WHERE id = '9'"),     # a filter's rewrite
                st(12, "U", "UPDATE public.gone SET v = 'x' WHERE id = '1'", relname="public.gone")]
    statements = []
    for barrier in barriers:
        first = barrier.first_event - 2
        statements += [upd(first, first), upd(first + 1, first + 1), barrier]
    planned = group(statements, tables)
    assert shape(planned) == [(1, "U", "public.t", 2), (3, "U", "public.t", 1), (4, "U", "public.t", 2),
                              (6, "T", "public.u", 1), (7, "U", "public.t", 2), (9, "U", "public.t", 1),
                              (10, "U", "public.t", 2), (12, "U", "public.gone", 1)]
    assert [planned[i] for i in (1, 3, 5, 7)] == barriers


def test_from_an_administrators_statement_on_every_event_runs_as_it_came():
    """The slave's table facts are read before the chunk runs; ALTER TABLE may change them."""
    alter = st(3, "S", "ALTER TABLE public.t ENABLE ALWAYS TRIGGER audit", relname=None)
    statements = [upd(1, 1), upd(2, 2), alter, upd(4, 3), upd(5, 4)]
    assert shape(group(statements, tables)) == [(1, "U", "public.t", 2), (3, "S", None, 1),
                                                (4, "U", "public.t", 1), (5, "U", "public.t", 1)]


def test_a_strict_tables_events_group_only_while_consecutive():
    statements = [ins(1, 1, table="public.strict"), ins(2, 2, table="public.strict"), upd(3, 1, table="public.strict"),
                  ins(4, 3, table="public.strict"), ins(5, 1), upd(6, 4, table="public.strict"),
                  upd(7, 5, table="public.strict")]
    assert shape(group(statements, tables)) == [
        (1, "I", "public.strict", 2), (3, "U", "public.strict", 1), (4, "I", "public.strict", 1),
        (5, "I", "public.t", 1), (6, "U", "public.strict", 2)]


def test_values_sql_casts_to_types_without_modifier_and_counts_each_event_once():
    types = TABLES["public.t"].types
    assert values_sql("U", "public.t", ("v", "c"), ("id",), [("'1'", "'a'", "NULL"), ("'2'", "E'b\\\\'", "'xy'")],
                      types) == (
        "WITH pyreplica_u AS (UPDATE public.t AS pyreplica_t SET v = pyreplica_v.p1::text, "
        "c = pyreplica_v.p2::bpchar FROM (VALUES (1, '1', 'a', NULL), (2, '2', E'b\\\\', 'xy')) "
        "AS pyreplica_v(n, p0, p1, p2) WHERE pyreplica_t.id = pyreplica_v.p0::integer RETURNING pyreplica_v.n) "
        "SELECT n FROM pyreplica_u GROUP BY n HAVING count(*) = 1")
    assert values_sql("D", "public.t", (), ("id", "c"), [("'1'", "'a'"), ("'2'", "'b'")], types) == (
        "WITH pyreplica_u AS (DELETE FROM public.t AS pyreplica_t USING (VALUES (1, '1', 'a'), (2, '2', 'b')) "
        "AS pyreplica_v(n, p0, p1) WHERE pyreplica_t.id = pyreplica_v.p0::integer "
        "AND pyreplica_t.c = pyreplica_v.p1::bpchar RETURNING pyreplica_v.n) "
        "SELECT n FROM pyreplica_u GROUP BY n HAVING count(*) = 1")


def test_inserts_with_odd_identifiers_or_overriding_group_only_with_their_own_head():
    odd = 'INSERT INTO "my ""s"""."T, x" ("a, b", "VALUES (") VALUES (\'1\', \'VALUES (\')'
    TABLES['"my ""s"""."T, x"'] = Table({'"a, b"': "text", '"VALUES ("': "text"}, ('"a, b"',), True)
    try:
        statements = [st(1, "I", odd, relname='"my ""s"""."T, x"'),
                      st(2, "I", "INSERT INTO public.t (id, v) OVERRIDING SYSTEM VALUE VALUES ('1', 'c')"),
                      st(3, "I", odd.replace("('1',", "('2',"), relname='"my ""s"""."T, x"'),
                      st(4, "I", "INSERT INTO public.t (id, v) VALUES ('2', 'd')"),
                      st(5, "I", "INSERT INTO public.t (id, v) OVERRIDING SYSTEM VALUE VALUES ('3', 'e')")]
        planned = group(statements, tables)
    finally:
        del TABLES['"my ""s"""."T, x"']
    assert shape(planned) == [(1, "I", '"my ""s"""."T, x"', 2), (2, "I", "public.t", 2), (4, "I", "public.t", 1)]
    assert planned[0].sql == odd + ", ('2', 'VALUES (')"
    assert planned[1].sql == "INSERT INTO public.t (id, v) OVERRIDING SYSTEM VALUE VALUES ('1', 'c'), ('3', 'e')"


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
    assert plan(events, tables, precise=True) == expected
    assert not expected[0].merged


def test_plan_groups_only_when_not_precise():
    events = [ev(1, "I", "INSERT INTO public.t (id) VALUES ('1')"), ev(2, "U", "UPDATE public.t SET v = 'a' WHERE id = '2'"),
              ev(3, "I", "INSERT INTO public.t (id) VALUES ('3')"),
              ev(4, "U", "UPDATE public.t SET v = 'b' WHERE id = '4'")]
    assert [(s.first_event, s.rows) for s in plan(events, tables)] == [(1, 2), (2, 2)]
    assert plan(events, tables, precise=True) == [st(e.id, e.op, e.sql) for e in events]


def test_a_chunk_of_few_statements_is_not_grouped_and_looks_up_no_table(monkeypatch):
    """What a daemon that keeps up applies: a lookup round trip would cost more than it saves."""
    monkeypatch.setattr(apply, "GROUP_FROM", 16)

    def no_lookup(relname):
        raise AssertionError(f"looked up {relname}")
    few = [ev(i, "I", f"INSERT INTO public.t (id) VALUES ('{i}')") for i in range(1, 16)]
    assert plan(few, no_lookup) == [st(e.id, e.op, e.sql) for e in few]
    many = few + [ev(16, "I", "INSERT INTO public.t (id) VALUES ('16')")]
    assert [(s.first_event, s.rows) for s in plan(many, tables)] == [(1, 16)]
