"""Property: replaying replica_log on a copy of the schema gives back the master's table (docs/design.md §3).

Hypothesis draws a table (mixed column types, odd identifiers, a primary key of one to three
columns of various types, maybe an identity and a generated column), runs a random sequence of
INSERT / UPDATE / DELETE / TRUNCATE on the master under random session settings, replays the logged
`sql` in id order in a database of the slave cluster whose session uses other settings and
standard_conforming_strings = off, and compares the two tables row by row.

The two databases are made once per module; each example drops and recreates its own schema.
"""
import contextlib
import datetime
import ipaddress
import json
import string

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from psycopg2 import sql

from conftest import fresh_db
from pyreplica import apply, db
from pyreplica.batch import Event

pytestmark = pytest.mark.usefixtures("group_small_chunks")

# -- session settings ---------------------------------------------------------------------------
TIMEZONES = ["UTC", "America/New_York", "Asia/Kolkata", "Pacific/Chatham", "Australia/Lord_Howe",
             "Europe/Moscow", "America/St_Johns", "Pacific/Kiritimati", "EST5EDT", "<+0330>-03:30"]
DATESTYLES = ["ISO, MDY", "ISO, DMY", "SQL, DMY", "SQL, MDY", "Postgres, MDY", "Postgres, DMY",
              "German", "ISO, YMD"]
INTERVALSTYLES = ["postgres", "postgres_verbose", "sql_standard", "iso_8601"]
FLOAT_DIGITS = list(range(-15, 4))

# What both sides use when the tables are compared.
COMPARE_SETTINGS = {"TimeZone": "UTC", "DateStyle": "ISO, YMD", "IntervalStyle": "postgres",
                    "extra_float_digits": "1", "bytea_output": "hex"}


def session_settings():
    return st.fixed_dictionaries({
        "TimeZone": st.sampled_from(TIMEZONES),
        "DateStyle": st.sampled_from(DATESTYLES),
        "IntervalStyle": st.sampled_from(INTERVALSTYLES),
        "extra_float_digits": st.sampled_from(FLOAT_DIGITS).map(str),
        # not pinned by the capture trigger: must not matter either
        "bytea_output": st.sampled_from(["hex", "escape"]),
        "standard_conforming_strings": st.sampled_from(["on", "off"]),
        "xmloption": st.sampled_from(["content", "document"]),
    })


def field_order(datestyle):
    return "DMY" if datestyle == "German" else datestyle.split(", ")[1]


def other_settings(master):
    """Settings that differ from the master's in every respect; the DateStyle reads day and month
    the other way round (so that a date rendered under the master's session would be misread)."""
    order = field_order(master["DateStyle"])
    return st.fixed_dictionaries({
        "TimeZone": st.sampled_from([z for z in TIMEZONES if z != master["TimeZone"]]),
        "DateStyle": st.sampled_from([d for d in DATESTYLES if field_order(d) not in (order, "YMD")]),
        "IntervalStyle": st.sampled_from([i for i in INTERVALSTYLES if i != master["IntervalStyle"]]),
        "extra_float_digits": st.sampled_from([str(f) for f in FLOAT_DIGITS if str(f) != master["extra_float_digits"]]),
    })


def apply_settings(cur, values):
    for name, value in values.items():
        cur.execute("SELECT set_config(%s, %s, false)", (name, value))


# -- identifiers --------------------------------------------------------------------------------
# Quotes, spaces, dots, mixed case, backslashes and non-ASCII; at most 63 bytes (NAMEDATALEN).
IDENT_CHARS = string.ascii_letters + string.digits + ' "._\\$-\'' + "éÜßжΩ漢😀"
identifiers = (st.text(alphabet=IDENT_CHARS, min_size=1, max_size=20)
               .filter(lambda s: len(s.encode()) <= 63 and not s.lower().startswith("pg_")
               and s not in ("pyreplica", "public")))

# -- values -------------------------------------------------------------------------------------
NO_NUL_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                      max_size=30)
QUOTEY_TEXT = st.one_of(NO_NUL_TEXT, st.sampled_from(["'", "''", "\\", "\\'", "a\\nb", "E'x'", "NULL", "",
                                                        "$$", "\"", "{}", "()", " lead", "trail "]))


class Expr:
    """A value given as an SQL expression with its own parameters."""

    def __init__(self, template, params=()):
        self.template, self.params = template, list(params)


def numeric_text():
    digits = st.text(alphabet=string.digits, min_size=1, max_size=40)
    finite = st.builds(lambda sign, i, f, e: f"{sign}{i}{'.' + f if f else ''}{'e' + str(e) if e else ''}",
                       st.sampled_from(["", "-"]), digits, st.one_of(st.just(""), digits),
                       st.one_of(st.just(0), st.integers(-900, 900)))
    return st.one_of(finite, st.sampled_from(["NaN", "0", "-0.000", "1e-1000", "9" * 100]))


def float_text(width):
    return st.floats(width=width).map(
        lambda f: "NaN" if f != f else ("Infinity" if f == float("inf") else
                                        "-Infinity" if f == float("-inf") else repr(f)))


offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: datetime.timezone(datetime.timedelta(minutes=m)))


def timetz_text(t, off):
    minutes = int(off.utcoffset(None).total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    return f"{t.isoformat()}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def array_text(elements, quote):
    """An array literal, sometimes with a lower bound other than 1."""
    return st.builds(
        lambda items, lower: (f"[{lower}:{lower + len(items) - 1}]=" if lower is not None and items else "")
        + "{" + ",".join("NULL" if e is None else quote(e) for e in items) + "}",
        st.lists(st.one_of(st.none(), elements), max_size=5),
        st.one_of(st.none(), st.integers(-5, 5)))


def quote_elem(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
    | NO_NUL_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NO_NUL_TEXT, inner, max_size=3),
    max_leaves=6)
json_text = st.builds(lambda v, ascii: json.dumps(v, ensure_ascii=ascii), json_values, st.booleans())


def inet_text(cidr):
    def make(ip, bits):
        prefix = bits % (ip.max_prefixlen + 1)
        if cidr:
            return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
        return f"{ip}/{prefix}"
    return st.builds(make, st.ip_addresses(), st.integers(0, 128))


def money_text(cents):
    return f"{'-' if cents < 0 else ''}{abs(cents) // 100}.{abs(cents) % 100:02d}"


ENUM_LABELS = ["sad", "it's", "a b", "ÜBER", 'x"y', "back\\slash", ""]


class ColType:
    def __init__(self, name, ddl, values, pk=False):
        self.name = name        # a short name for reports
        self.ddl = ddl          # function(schema) -> sql.Composable type name
        self.values = values    # strategy of non-NULL values (str / bytes / Expr)
        self.pk = pk            # usable in a primary key


def builtin(type_sql):
    return lambda schema: sql.SQL(type_sql)


def schema_type(name):
    return lambda schema: sql.Identifier(schema, name)


def interval_expr(y, mo, d, h, mi, s):
    return Expr("make_interval(%s, %s, 0, %s, %s, %s, %s)", [y, mo, d, h, mi, s])


def composite_expr(a, b, c):
    return Expr("ROW(%s::integer, %s::text, %s::numeric)::{type}", [a, b, c])


COL_TYPES = [
    ColType("int", builtin("integer"), st.integers(-2**31, 2**31 - 1).map(str), pk=True),
    ColType("bigint", builtin("bigint"), st.integers(-2**63, 2**63 - 1).map(str), pk=True),
    ColType("smallint", builtin("smallint"), st.integers(-2**15, 2**15 - 1).map(str)),
    ColType("numeric", builtin("numeric"), numeric_text(), pk=True),
    ColType("numeric(30,7)", builtin("numeric(30,7)"),
            st.decimals(min_value=-10**22, max_value=10**22, places=9, allow_nan=False).map(str)),
    ColType("float4", builtin("real"), float_text(32)),
    ColType("float8", builtin("double precision"), float_text(64)),
    ColType("text", builtin("text"), QUOTEY_TEXT, pk=True),
    ColType("varchar", builtin("varchar(12)"), st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                                                               blacklist_characters="\x00"),
                                                       max_size=12)),
    ColType("char", builtin("char(5)"), st.text(alphabet="ab c'\\é", max_size=5), pk=True),
    ColType("char[]", builtin("char(3)[]"), array_text(st.text(alphabet="ab c'\\é", max_size=3), quote_elem)),
    ColType("bit", builtin("bit(5)"), st.text(alphabet="01", min_size=5, max_size=5), pk=True),
    ColType("bytea", builtin("bytea"), st.binary(max_size=20)),
    ColType("bool", builtin("boolean"), st.sampled_from(["true", "false"])),
    ColType("date", builtin("date"),
            st.one_of(st.dates().map(lambda d: d.isoformat()),
                      st.sampled_from(["infinity", "-infinity", "0044-03-15 BC"])), pk=True),
    ColType("timestamp", builtin("timestamp"),
            st.one_of(st.datetimes().map(lambda d: d.isoformat()),
                      st.sampled_from(["infinity", "-infinity", "0044-03-15 12:34:56.789 BC"]))),
    ColType("timestamptz", builtin("timestamptz"),
            st.one_of(st.builds(lambda d, tz: d.replace(tzinfo=tz).isoformat(), st.datetimes(), offsets),
                      st.sampled_from(["infinity", "-infinity"])), pk=True),
    ColType("time", builtin("time"), st.times().map(lambda t: t.isoformat())),
    ColType("timetz", builtin("timetz"), st.builds(timetz_text, st.times(), offsets)),
    ColType("interval", builtin("interval"),
            st.builds(interval_expr, st.integers(-200, 200), st.integers(-30, 30), st.integers(-400, 400),
                      st.integers(-100, 100), st.integers(-100, 100),
                      st.floats(-10**6, 10**6).map(lambda s: round(s, 6)))),
    ColType("uuid", builtin("uuid"), st.uuids().map(str), pk=True),
    ColType("json", builtin("json"), json_text),
    ColType("jsonb", builtin("jsonb"), json_text),
    ColType("int[]", builtin("integer[]"), array_text(st.integers(-2**31, 2**31 - 1), str)),
    ColType("text[]", builtin("text[]"), array_text(QUOTEY_TEXT, quote_elem)),
    ColType("inet", builtin("inet"), inet_text(cidr=False)),
    ColType("cidr", builtin("cidr"), inet_text(cidr=True)),
    ColType("money", builtin("money"), st.integers(-10**15, 10**15).map(money_text)),
    ColType("enum", schema_type("mood"), st.sampled_from(ENUM_LABELS), pk=True),
    ColType("domain", schema_type("short text"), QUOTEY_TEXT.filter(lambda s: len(s) <= 20)),
    ColType("composite", schema_type("Pair"),
            st.builds(composite_expr, st.one_of(st.none(), st.integers(-100, 100)),
                      st.one_of(st.none(), QUOTEY_TEXT), st.one_of(st.none(), numeric_text()))),
]
PK_TYPES = [t for t in COL_TYPES if t.pk]
INTEGER_TYPES = {"int", "bigint", "smallint"}


class Column:
    def __init__(self, name, coltype, identity=None, generated_from=None):
        self.name, self.type = name, coltype
        self.identity = identity            # None, 'ALWAYS' or 'BY DEFAULT'
        self.generated_from = generated_from  # the column a STORED generated column is computed from

    @property
    def writable(self):
        """Whether INSERT and UPDATE may give it a value."""
        return self.generated_from is None and self.identity != "ALWAYS"


@st.composite
def tables(draw):
    names = draw(st.lists(identifiers, min_size=17, max_size=17, unique=True))
    schema, table, *colnames = names
    # a random selection of the types (a permutation's head, so that every type comes up often)
    ordinary = draw(st.permutations(COL_TYPES))[:draw(st.integers(4, 10))]
    keytypes = draw(st.lists(st.sampled_from(PK_TYPES), min_size=1, max_size=3))
    columns = [Column(colnames.pop(), t) for t in keytypes]
    pk = list(columns)
    if draw(st.booleans()):   # an identity column, sometimes in the key
        ident = Column(colnames.pop(), COL_TYPES[1], identity=draw(st.sampled_from(["ALWAYS", "BY DEFAULT"])))
        columns.append(ident)
        if draw(st.booleans()):
            pk = [ident] + pk[:1]
    columns += [Column(colnames.pop(), t) for t in ordinary[:len(colnames) - 1]]
    base = [c for c in columns if c.type.name in ("int", "smallint") and c.identity is None]
    if base and draw(st.booleans()):   # a STORED generated column
        columns.append(Column(colnames.pop(), COL_TYPES[1], generated_from=base[0]))
    columns = draw(st.permutations(columns))
    return schema, table, columns, pk


def column_ddl(schema, col):
    parts = [sql.Identifier(col.name), col.type.ddl(schema)]
    if col.identity:
        parts.append(sql.SQL("GENERATED {} AS IDENTITY").format(sql.SQL(col.identity)))
    if col.generated_from is not None:
        parts.append(sql.SQL("GENERATED ALWAYS AS ({}::bigint * 2 + 1) STORED")
                     .format(sql.Identifier(col.generated_from.name)))
    return sql.SQL(" ").join(parts)


def schema_ddl(schema, table, columns, pk):
    """The statements that make the schema, its types and the table (the same on both sides)."""
    s = sql.Identifier(schema)
    return [
        sql.SQL("CREATE SCHEMA {}").format(s),
        sql.SQL("CREATE TYPE {} AS ENUM ({})").format(sql.Identifier(schema, "mood"),
                                                     sql.SQL(", ").join(map(sql.Literal, ENUM_LABELS))),
        sql.SQL("CREATE DOMAIN {} AS text CHECK (VALUE <> 'forbidden')").format(sql.Identifier(schema, "short text")),
        sql.SQL("CREATE TYPE {} AS (a integer, b text, c numeric)").format(sql.Identifier(schema, "Pair")),
        sql.SQL("CREATE TABLE {} ({}, PRIMARY KEY ({}))").format(
            sql.Identifier(schema, table),
            sql.SQL(", ").join(column_ddl(schema, c) for c in columns),
            sql.SQL(", ").join(sql.Identifier(c.name) for c in pk)),
    ]


def value_sql(schema, col, value):
    """(SQL, params) of one value for a column."""
    if value is None:
        return sql.SQL("NULL"), []
    if isinstance(value, Expr):
        return sql.SQL(value.template).format(type=sql.Identifier(schema, "Pair")), value.params
    if isinstance(value, bytes):
        return sql.SQL("%s::bytea"), [psycopg2.Binary(value)]
    return sql.SQL("%s::") + col.type.ddl(schema), [value]


def values_for(draw, col, in_key):
    # (key and identity columns are NOT NULL)
    values = col.type.values if in_key or col.identity else st.one_of(st.none(), col.type.values)
    return draw(values)


# -- the operations ------------------------------------------------------------------------------
def pick_rows(target, limit, offset):
    """A WHERE clause choosing `limit` rows from `offset` in a stable order, and its parameters."""
    return (sql.SQL(" WHERE ctid = ANY (ARRAY(SELECT ctid FROM {} t ORDER BY t::text LIMIT %s OFFSET %s))")
            .format(target), [limit, offset])


@st.composite
def operations(draw, schema, table, columns, pk):
    target = sql.Identifier(schema, table)
    keyset = {c.name for c in pk}
    writable = [c for c in columns if c.writable]
    ops = []
    for _ in range(draw(st.integers(1, 20))):
        kind = draw(st.sampled_from(["insert", "insert_multi", "insert_multi", "update", "update", "update_pk",
                                     "update_shift", "delete", "delete", "commit", "commit", "insert", "truncate"]))
        if kind in ("insert", "insert_multi"):
            nrows = 1 if kind == "insert" else draw(st.integers(2, 4))
            rows, params = [], []
            for _ in range(nrows):
                items = []
                for c in writable:
                    q, p = value_sql(schema, c, values_for(draw, c, c.name in keyset))
                    items.append(q)
                    params += p
                rows.append(sql.SQL("({})").format(sql.SQL(", ").join(items)))
            stmt = sql.SQL("INSERT INTO {} ({}) VALUES {}").format(
                target, sql.SQL(", ").join(sql.Identifier(c.name) for c in writable), sql.SQL(", ").join(rows))
            ops.append(("write", stmt, params))
        elif kind in ("update", "update_pk"):
            pool = writable if kind == "update_pk" else [c for c in writable if c.name not in keyset]
            if not pool:
                continue
            cols = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique_by=lambda c: c.name))
            sets, params = [], []
            for c in cols:
                q, p = value_sql(schema, c, values_for(draw, c, c.name in keyset))
                sets.append(sql.SQL("{} = {}").format(sql.Identifier(c.name), q))
                params += p
            where, wparams = pick_rows(target, 1 if kind == "update_pk" else draw(st.integers(1, 4)),
                                       draw(st.integers(0, 4)))
            ops.append(("write", sql.SQL("UPDATE {} SET {}").format(target, sql.SQL(", ").join(sets)) + where,
                        params + wparams))
        elif kind == "update_shift":
            # A primary-key change of many rows in one statement.
            keycol = next((c for c in pk if c.writable and c.type.name in INTEGER_TYPES | {"numeric", "text"}), None)
            if keycol is None:
                continue
            if keycol.type.name == "text":
                change, p = sql.SQL("{} || %s").format(sql.Identifier(keycol.name)), [draw(QUOTEY_TEXT)]
            else:
                change, p = sql.SQL("{} + %s").format(sql.Identifier(keycol.name)), [draw(st.sampled_from([1, -1, 2, 1000003]))]
            where, wparams = pick_rows(target, draw(st.integers(2, 6)), 0)
            ops.append(("write", sql.SQL("UPDATE {} SET {} = {}").format(target, sql.Identifier(keycol.name), change)
                        + where, p + wparams))
        elif kind == "delete":
            where, wparams = pick_rows(target, draw(st.integers(1, 3)), draw(st.integers(0, 4)))
            ops.append(("write", sql.SQL("DELETE FROM {}").format(target) + where, wparams))
        elif kind == "truncate":
            ops.append(("write", sql.SQL("TRUNCATE {}").format(target), []))
        else:
            ops.append(("commit", None, None))
    return ops


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dbs(master_cluster, slave_cluster):
    """One master database (pyreplica installed) and one replay database, for the whole module."""
    master = fresh_db(master_cluster, "prop_m")
    master.install_master()
    replay = fresh_db(slave_cluster, "prop_s")
    with contextlib.closing(db.connect(replay.dsn, "slave")) as conn:
        conn.autocommit = True
        apply.install(conn)
    yield master, replay
    master_cluster.dropdb(master.name)
    slave_cluster.dropdb(replay.name)


def reset(conn, schema, statements):
    with conn.cursor() as cur:
        cur.execute("SELECT nspname FROM pg_namespace WHERE nspname !~ '^(pg_|information_schema$|public$|pyreplica$)'")
        for (old,) in cur.fetchall():
            cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(old)))
        for stmt in statements:
            cur.execute(stmt)


def table_text(conn, target):
    with conn.cursor() as cur:
        apply_settings(cur, COMPARE_SETTINGS)
        cur.execute(sql.SQL("SELECT t::text FROM {} t ORDER BY 1").format(target))
        return [r[0] for r in cur.fetchall()]


def log_count(cur):
    cur.execute("SELECT count(*) FROM public.replica_log")
    return cur.fetchone()[0]


def replay_through_apply(replay, replay_settings, events, target, precise):
    """The table after apply.apply_chunk replays the events on the daemon's kind of connection
    (rolled back afterwards, so the raw replay below starts from the same empty table)."""
    with contextlib.closing(db.connect(replay.dsn, "slave")) as conn, conn.cursor() as cur:
        apply.start_session(cur)
        apply_settings(cur, replay_settings)
        if events:
            apply.apply_chunk(cur, events, precise=precise)
        rows = table_text(conn, target)
        conn.rollback()
        return rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_replayed_log_rebuilds_the_table(dbs, data):
    master, replay = dbs
    schema, table, columns, pk = data.draw(tables(), label="table")
    ops = data.draw(operations(schema, table, columns, pk), label="operations")
    master_settings = data.draw(session_settings(), label="master settings")
    replay_settings = data.draw(other_settings(master_settings), label="replay settings")
    target = sql.Identifier(schema, table)
    ddl = schema_ddl(schema, table, columns, pk)

    mconn = master.connect()
    rconn = replay.connect()
    try:
        reset(mconn, schema, ddl)
        reset(rconn, schema, ddl)
        with mconn.cursor() as cur:
            cur.execute("TRUNCATE pyreplica.replica_log")
            arg = target.as_string(mconn)   # '"my schema"."My Table"'
            cur.execute("SELECT CASE WHEN %(s)s = 'public' THEN quote_ident(%(t)s) "
                        "ELSE format('%%I.%%I', %(s)s::text, %(t)s::text) END", {"s": schema, "t": table})
            shown = cur.fetchone()[0]       # the answer line names it qualified, quoted only where needed
            cur.execute("SELECT py_log_create_tg(%s)", (arg,))
            assert cur.fetchall() == [(f"created trigger on {shown} ({','.join(c.name for c in pk)})",)]

        # The master's writes, under its own session settings, each in a savepoint: a statement
        # that fails (duplicate key, the domain's CHECK, overflow) leaves no trace, in the log too.
        mconn.autocommit = False
        with mconn.cursor() as cur:
            apply_settings(cur, master_settings)
            for kind, stmt, params in ops:
                if kind == "commit":
                    mconn.commit()
                    continue
                cur.execute("SAVEPOINT op")
                try:
                    cur.execute(stmt, params)
                except psycopg2.Error:
                    cur.execute("ROLLBACK TO SAVEPOINT op")
                else:
                    cur.execute("RELEASE SAVEPOINT op")
            # An UPDATE that changes nothing logs nothing.
            before = log_count(cur)
            cur.execute(sql.SQL("UPDATE {} SET {}").format(target, sql.SQL(", ").join(
                sql.SQL("{0} = {0}").format(sql.Identifier(c.name)) for c in columns if c.writable)))
            assert log_count(cur) == before
        mconn.commit()
        mconn.autocommit = True

        with mconn.cursor() as cur:
            cur.execute("SELECT id, txid::text, relname, op::text, sql, username::text FROM public.replica_log ORDER BY id")
            events = [Event(*row) for row in cur.fetchall()]
            log = [(e.sql, e.relname, e.op) for e in events]
            cur.execute("SELECT CASE WHEN %(s)s = 'public' THEN quote_ident(%(t)s) "
                        "ELSE format('%%I.%%I', %(s)s::text, %(t)s::text) END", {"s": schema, "t": table})
            relname = cur.fetchone()[0]
        assert {(r, op in "IUDT") for _, r, op in log} <= {(relname, True)}

        expected = table_text(mconn, target)
        # The daemon's own apply path: its connection, session and planner, merged and precise.
        for precise in (False, True):
            assert replay_through_apply(replay, replay_settings, events, target, precise) == expected, precise

        # Replay under different settings, with standard_conforming_strings off.
        rconn.autocommit = False
        with rconn.cursor() as cur:
            apply_settings(cur, replay_settings)
            cur.execute("SET standard_conforming_strings = off")
            cur.execute("SET escape_string_warning = off")
            for statement, _, _ in log:
                cur.execute(statement)
        rconn.commit()
        rconn.autocommit = True

        assert table_text(rconn, target) == expected
    finally:
        mconn.close()
        rconn.close()
