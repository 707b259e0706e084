"""master-install.sql / master-uninstall.sql and the trigger management functions (docs/design.md §3),
against real servers."""
import contextlib
import os
import shutil
import tempfile
import uuid

import psycopg2
import psycopg2.errors
import pytest
from psycopg2 import sql

import pyreplica
from pyreplica.cluster import Cluster, bindir

GUIDE_QUERY = ("SELECT py_log_create_tg(relname::text) FROM pg_class WHERE relname !~ '^(pg_|sql_)' "
               "AND relkind = 'r' AND relname != 'replica_log' ;")
GUIDE_LINES = [
    "table t has no pk constraint (couldn't be replicated)!",
    "created trigger on tt (id1,id2)",
    "created trigger on student (id)",
]
GUIDE_TABLES = """
    CREATE TABLE t (a int, b text);
    CREATE TABLE tt (id1 int, id2 int, a text, PRIMARY KEY (id1, id2));
    CREATE TABLE student (id int PRIMARY KEY, name text);
"""

# Everything an install could leave behind, by name and definition (never by oid).
CATALOG_QUERIES = {
    "class": """SELECT n.nspname, c.relname, c.relkind::text, coalesce(c.relacl::text, '')
                  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname !~ '^pg_(toast|temp)' ORDER BY 1, 2""",
    "proc": """SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), p.prosrc,
                      coalesce(p.proconfig::text, ''), coalesce(p.proacl::text, ''), p.prosecdef
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace ORDER BY 1, 2, 3""",
    "trigger": """SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger ORDER BY 1, 2""",
    "event_trigger": "SELECT evtname, evtevent, evtfoid::regproc::text, evttags::text FROM pg_event_trigger ORDER BY 1",
    "extension": "SELECT extname, extversion FROM pg_extension ORDER BY 1",
    "language": "SELECT lanname FROM pg_language ORDER BY 1",
    "type": """SELECT n.nspname, t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                ORDER BY 1, 2""",
    "attribute": """SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                           pg_get_expr(d.adbin, d.adrelid)
                      FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                      JOIN pg_namespace n ON n.oid = c.relnamespace
                      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                     WHERE n.nspname = 'public' AND a.attnum > 0 AND NOT a.attisdropped ORDER BY 1, 2""",
    "description": "SELECT classoid::regclass::text, objsubid, description FROM pg_description "
                   "WHERE objoid >= 16384 ORDER BY 1, 2, 3",
}


def catalog(db):
    return {name: db.execute(query) for name, query in CATALOG_QUERIES.items()}


def uninstall(db):
    return db.psql("-f", pyreplica.MASTER_UNINSTALL_SQL)


def triggers_on(db, table):
    return db.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass ORDER BY 1", (table,))


@contextlib.contextmanager
def role(db, name_prefix, *privileges):
    """A login role (cluster-wide, so uniquely named) with privileges in db; gone afterwards."""
    name = f"{name_prefix}_{uuid.uuid4().hex[:8]}"
    db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    try:
        for grant in privileges:
            db.execute(sql.SQL(grant).format(role=sql.Identifier(name)))
        yield name
    finally:
        db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


# -- the install guide ---------------------------------------------------------------------------
def test_guide_query_verbatim_gives_the_guide_lines(master):
    master.execute(GUIDE_TABLES)
    # In SQL: exactly the three lines (pg_class order is not guaranteed, hence sorted).
    assert sorted(r[0] for r in master.execute(GUIDE_QUERY)) == sorted(GUIDE_LINES)
    assert triggers_on(master, "t") == []
    assert triggers_on(master, "tt") == [("tt_replica_tg",), ("tt_replica_tg_d",), ("tt_replica_tg_t",),
                                          ("tt_replica_tg_u",)]
    assert len(triggers_on(master, "student")) == 4
    assert triggers_on(master, "pyreplica.replica_log") == [] and triggers_on(master, "pyreplica.replica_slaves") == []


def test_guide_query_in_psql_prints_the_guide_lines(master):
    master.execute(GUIDE_TABLES)
    # (psql pads the header and lines with blanks to the column's width; the wiki page does not)
    out = [line.rstrip() for line in master.psql("-c", GUIDE_QUERY).stdout.splitlines()]
    # The guide's screen: header, rule, the three lines (in some order), "(3 rows)".
    assert out[0] == "                    py_log_create_tg"
    assert out[1] == "-" * 56
    assert sorted(out[2:5]) == sorted(" " + line for line in GUIDE_LINES)
    assert out[5:] == ["(3 rows)", ""]


def test_guide_query_covers_every_schema_and_odd_names(master):
    # The query passes pg_class.relname as it is: mixed case, spaces and dots must work too.
    master.execute("""
        CREATE SCHEMA "Other Schema";
        CREATE TABLE "Other Schema"."Mixed Case" (id int PRIMARY KEY);
        CREATE TABLE public."a.b" (id text PRIMARY KEY);
        CREATE TABLE public."UPPER" (k uuid PRIMARY KEY);
    """)
    assert sorted(r[0] for r in master.execute(GUIDE_QUERY)) == [
        'created trigger on "Other Schema"."Mixed Case" (id)', 'created trigger on "UPPER" (k)',
        'created trigger on "a.b" (id)']
    for table in ('"Other Schema"."Mixed Case"', 'public."a.b"', 'public."UPPER"'):
        assert len(triggers_on(master, table)) == 4


# -- install / uninstall -------------------------------------------------------------------------
def test_install_twice_changes_nothing_and_keeps_the_log(master):
    master.execute(GUIDE_TABLES)
    master.execute("SELECT py_log_create_tg('student')")
    master.execute("INSERT INTO student VALUES (1, 'ann'), (2, 'bob')")
    log = master.execute("SELECT id, sql, txid::text, op FROM replica_log ORDER BY id")
    assert len(log) == 2
    before = catalog(master)

    master.install_master()

    assert catalog(master) == before
    assert master.execute("SELECT id, sql, txid::text, op FROM replica_log ORDER BY id") == log
    # ... and capture still works, the ids going on from the same sequence.
    master.execute("INSERT INTO student VALUES (3, 'cy')")
    assert master.execute("SELECT id, sql FROM replica_log WHERE id > %s", (log[-1][0],)) == [
        (log[-1][0] + 1, "INSERT INTO public.student (id, name) VALUES ('3', 'cy')")]


def test_a_daemon_older_than_the_install_is_told_so_at_its_confirm(master):
    """The confirm without the slave's identity (pyreplica before it was checked) is refused with
    words that say what to do, also for the least-privileged daemon role, not 'does not exist'."""
    master.execute("SELECT pyreplica.register_slave('old')")
    master.execute("CREATE ROLE old_daemon LOGIN IN ROLE pyreplica_daemon")
    try:
        conn = psycopg2.connect(master.cluster.dsn(master.name, user="old_daemon"))
        with pytest.raises(psycopg2.errors.RaiseException) as raised, conn.cursor() as cur:
            cur.execute("SELECT pyreplica.confirm('old', pg_current_snapshot(), 1, 0)")
        conn.close()
    finally:
        master.execute("DROP ROLE old_daemon")
    assert "this daemon is older than the master's pyreplica install" in str(raised.value)
    assert raised.value.diag.message_hint == "Upgrade pyreplica where the daemon runs, then restart it."
    assert master.scalar("SELECT batch_id FROM pyreplica.replica_slaves WHERE name = 'old'") == 0


def test_uninstall_removes_all_it_made_and_nothing_else(bare_master):
    bare_master.execute(GUIDE_TABLES + """
        CREATE SCHEMA "My Schema";
        CREATE TABLE "My Schema"."My Table" (id int PRIMARY KEY, v text);
        CREATE FUNCTION public.user_fn() RETURNS int LANGUAGE sql AS 'SELECT 1';
        CREATE FUNCTION public.user_tg() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
        CREATE TRIGGER user_trigger BEFORE INSERT ON student FOR EACH ROW EXECUTE FUNCTION public.user_tg();
        INSERT INTO student VALUES (1, 'ann');
    """)
    before = catalog(bare_master)
    assert "plpython3u" not in str(before["extension"])

    bare_master.install_master()
    assert catalog(bare_master) != before
    bare_master.execute(GUIDE_QUERY)
    bare_master.execute("""SELECT py_log_create_tg('"My Schema"."My Table"')""")
    bare_master.execute("""
        INSERT INTO student VALUES (2, 'bob');
        UPDATE student SET name = 'ANN' WHERE id = 1;
        INSERT INTO tt VALUES (1, 2, 'x');
        INSERT INTO "My Schema"."My Table" VALUES (1, 'v');
        ALTER TABLE tt ADD COLUMN extra int;
    """)
    data = {t: bare_master.table_rows(t) for t in ("t", "tt", "student", '"My Schema"."My Table"')}

    result = uninstall(bare_master)

    assert result.returncode == 0, result.stderr
    after = catalog(bare_master)
    # The user's own column added while installed stays; everything else is as before.
    before["attribute"] = sorted(before["attribute"] + [("tt", "extra", "integer", None)])
    for name in CATALOG_QUERIES:
        assert after[name] == before[name], name
    assert {t: bare_master.table_rows(t) for t in data} == data


def test_uninstall_keeps_a_plpython_that_was_there_before(bare_master):
    bare_master.execute("CREATE EXTENSION plpython3u")
    bare_master.execute("CREATE FUNCTION mine() RETURNS int LANGUAGE plpython3u AS 'return 7'")
    bare_master.install_master()
    assert uninstall(bare_master).returncode == 0
    assert bare_master.scalar("SELECT mine()") == 7
    assert bare_master.scalar("SELECT count(*) FROM pg_proc WHERE proname ~ '^(py_log|replica_)'") == 0


def test_uninstall_without_install_is_harmless(bare_master):
    before = catalog(bare_master)
    result = uninstall(bare_master)
    assert result.returncode == 0, result.stderr
    assert catalog(bare_master) == before


def test_install_by_non_superuser_fails_clearly_and_leaves_nothing(bare_master):
    before = catalog(bare_master)
    with role(bare_master, "installer", "GRANT CREATE ON SCHEMA public TO {role}") as name:
        dsn = bare_master.cluster.dsn(bare_master.name, user=name)
        result = bare_master.cluster.psql(bare_master.name, "-d", dsn, "-f", pyreplica.MASTER_INSTALL_SQL,
                                          check=False)
        assert result.returncode != 0
        assert (f'ERROR:  pyreplica: master-install.sql must be run by a superuser (role "{name}" is not one)'
                in result.stderr)
        assert "HINT:  Run it as postgres, e.g.: sudo -u postgres psql somedb -f master-install.sql" in result.stderr
        assert catalog(bare_master) == before


@pytest.fixture(scope="module")
def cluster_without_plpython():
    """A PostgreSQL server whose installation lacks PL/Python, as on a machine without the
    postgresql-plpython3-NN package: a copy of the installed server whose share directory has
    everything but plpython3u's extension files. PostgreSQL finds its share and lib directories
    relative to its binaries, so the copy uses that share directory."""
    real_bin = bindir()
    real_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(real_bin))))  # /usr
    major = os.path.basename(os.path.dirname(real_bin))
    share = os.path.join(real_root, "share", "postgresql", major)
    if not real_bin.startswith(os.path.join(real_root, "lib", "postgresql")) or not os.path.isdir(share):
        pytest.skip(f"not a Debian-layout PostgreSQL installation ({real_bin})")
    top = tempfile.mkdtemp(prefix="pyreplica-noplpython-")
    os.chmod(top, 0o755)
    try:
        lib = os.path.join(top, "lib", "postgresql", major)
        os.makedirs(lib)
        shutil.copytree(real_bin, os.path.join(lib, "bin"), symlinks=True)   # real files: see above
        os.symlink(os.path.join(os.path.dirname(real_bin), "lib"), os.path.join(lib, "lib"))
        myshare = os.path.join(top, "share", "postgresql", major)
        os.makedirs(os.path.join(myshare, "extension"))
        for entry in os.listdir(share):
            if entry != "extension":
                os.symlink(os.path.join(share, entry), os.path.join(myshare, entry))
        for entry in os.listdir(os.path.join(share, "extension")):
            if "plpython" not in entry:
                os.symlink(os.path.join(share, "extension", entry), os.path.join(myshare, "extension", entry))
        for dirpath, dirnames, _ in os.walk(top):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
        cluster = Cluster("noplpython")
        cluster.bin = os.path.join(lib, "bin")
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.destroy()
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_install_without_plpython_says_which_package_to_install(cluster_without_plpython):
    cluster = cluster_without_plpython
    assert cluster.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'plpython3u'") == [(0,)]
    cluster.createdb("nopy")
    major = cluster.execute("SELECT current_setting('server_version_num')::int / 10000")[0][0]
    result = cluster.psql("nopy", "-f", pyreplica.MASTER_INSTALL_SQL, check=False)
    assert result.returncode != 0
    assert "ERROR:  pyreplica: PL/Python (plpython3u) is not available on this server" in result.stderr
    assert (f"HINT:  Install the package postgresql-plpython3-{major} "
            f"(apt-get install postgresql-plpython3-{major}) and run this script again.") in result.stderr
    assert cluster.execute("SELECT count(*) FROM pg_class WHERE relname ~ '^replica_'", dbname="nopy") == [(0,)]
    assert cluster.execute("SELECT count(*) FROM pg_proc WHERE proname ~ '^(py_log|replica_)'",
                           dbname="nopy") == [(0,)]


# -- py_log_create_tg / py_log_drop_tg -------------------------------------------------------------
@pytest.fixture
def schemas(master):
    master.execute("""
        CREATE TABLE public.student (id int PRIMARY KEY, name text);
        CREATE SCHEMA "My Schema";
        CREATE TABLE "My Schema"."My Table" ("Id" int PRIMARY KEY, v text);
        CREATE SCHEMA s1;
        CREATE SCHEMA s2;
        CREATE TABLE s1.dup (id int PRIMARY KEY);
        CREATE TABLE s2.dup (id int PRIMARY KEY);
        CREATE SCHEMA offpath;
        CREATE TABLE offpath.only_here (k text PRIMARY KEY);
        CREATE VIEW public.a_view AS SELECT 1 AS x;
    """)
    return master


def create_tg(db, name):
    return [r[0] for r in db.execute("SELECT py_log_create_tg(%s)", (name,))]


def drop_tg(db, name):
    return db.scalar("SELECT py_log_drop_tg(%s)", (name,))


def test_create_tg_schema_qualified(schemas):
    # the answer names the table as the install guide does: bare in schema public, qualified elsewhere
    assert create_tg(schemas, "public.student") == ["created trigger on student (id)"]
    assert len(triggers_on(schemas, "public.student")) == 4


def test_create_tg_quoted_mixed_case(schemas):
    name = '"My Schema"."My Table"'
    assert create_tg(schemas, name) == [f"created trigger on {name} (Id)"]
    assert triggers_on(schemas, name) == [("My Table_replica_tg",), ("My Table_replica_tg_d",),
                                          ("My Table_replica_tg_t",), ("My Table_replica_tg_u",)]


def test_create_tg_problems_are_lines_not_errors(schemas):
    assert create_tg(schemas, "nosuch") == ["table nosuch does not exist (couldn't be replicated)!"]
    assert create_tg(schemas, "s9.nosuch") == ["table s9.nosuch does not exist (couldn't be replicated)!"]
    assert create_tg(schemas, "a_view") == ["table a_view does not exist (couldn't be replicated)!"]
    assert create_tg(schemas, "a.b.c") == ["table a.b.c: expected name or schema.name (couldn't be replicated)!"]
    assert create_tg(schemas, "dup") == [
        "table dup is ambiguous: it could be s1.dup or s2.dup; give it as schema.name with quotes, e.g. s1.dup"]
    assert triggers_on(schemas, "s1.dup") == [] and triggers_on(schemas, "s2.dup") == []
    assert create_tg(schemas, "s2.dup") == ["created trigger on s2.dup (id)"]


def test_create_tg_bare_name_off_the_search_path(schemas):
    assert create_tg(schemas, "only_here") == ["created trigger on offpath.only_here (k)"]
    assert len(triggers_on(schemas, "offpath.only_here")) == 4


def test_create_tg_twice_is_harmless(schemas):
    for _ in range(3):
        assert create_tg(schemas, "student") == ["created trigger on student (id)"]
    assert len(triggers_on(schemas, "student")) == 4
    schemas.execute("INSERT INTO student VALUES (1, 'ann')")
    assert schemas.execute("SELECT sql FROM replica_log") == [
        ("INSERT INTO public.student (id, name) VALUES ('1', 'ann')",)]


def test_create_tg_never_on_pyreplicas_own_tables(schemas):
    for name in ("replica_log", "replica_slaves", "pyreplica.replica_log", "pyreplica.replica_slaves",
                 "pyreplica.log_pruned"):
        assert create_tg(schemas, name) == []
    assert triggers_on(schemas, "pyreplica.replica_log") == [] and triggers_on(schemas, "pyreplica.replica_slaves") == []


def test_drop_tg(schemas):
    create_tg(schemas, "student")
    create_tg(schemas, '"My Schema"."My Table"')
    assert drop_tg(schemas, "student") == "dropped trigger on student"
    assert triggers_on(schemas, "student") == []
    assert drop_tg(schemas, "student") == "table student had no replica trigger"
    assert drop_tg(schemas, "nosuch") == "table nosuch does not exist (couldn't be replicated)!"
    # the other table is still replicated, the dropped one no more
    schemas.execute("""INSERT INTO student VALUES (1, 'a'); INSERT INTO "My Schema"."My Table" VALUES (1, 'b')""")
    assert schemas.execute("SELECT relname FROM replica_log") == [('"My Schema"."My Table"',)]


def test_long_table_names_get_four_distinct_triggers(master):
    name = "a_table_name_that_is_rather_long_" + "é" * 15   # 63 bytes
    master.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(sql.Identifier(name)))
    assert create_tg(master, name) == [f'created trigger on "{name}" (id)']
    names = [r[0] for r in triggers_on(master, sql.Identifier(name).as_string(master.connect()))]
    assert len(set(names)) == 4
    assert all(n.endswith(("_replica_tg", "_replica_tg_u", "_replica_tg_d", "_replica_tg_t")) for n in names)


# -- security ---------------------------------------------------------------------------------------
def test_application_role_writes_replicated_table_but_cannot_touch_pyreplica(master):
    master.execute("CREATE TABLE student (id int PRIMARY KEY, name text)")
    create_tg(master, "student")
    with role(master, "app", "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON student TO {role}") as app:
        with contextlib.closing(master.connect(user=app)) as conn, conn.cursor() as cur:   # over TCP
            cur.execute("INSERT INTO student VALUES (1, 'ann'), (2, 'bob')")
            cur.execute("UPDATE student SET name = 'ANN' WHERE id = 1")
            cur.execute("DELETE FROM student WHERE id = 2")
            cur.execute("TRUNCATE student")

            denied = {
                "SELECT * FROM replica_log": "permission denied for view replica_log",
                "INSERT INTO replica_log (sql) VALUES ('DROP TABLE student')": "permission denied for view replica_log",
                "SELECT * FROM pyreplica.replica_log": "permission denied for schema pyreplica",
                "DELETE FROM pyreplica.replica_log": "permission denied for schema pyreplica",
                "SELECT * FROM pyreplica.replica_slaves": "permission denied for schema pyreplica",
                "SELECT nextval('pyreplica.replica_log_id_seq')": "permission denied for schema pyreplica",
                "SELECT py_log_create_tg('student')": "permission denied for function py_log_create_tg",
                "SELECT py_log_drop_tg('student')": "permission denied for function py_log_drop_tg",
                "SELECT py_log_sql('DROP TABLE student')": "permission denied for function py_log_sql",
                "SELECT pyreplica.register_slave('x')": "permission denied for schema pyreplica",
                "SELECT pyreplica.prune()": "permission denied for schema pyreplica",
            }
            for statement, message in denied.items():
                with pytest.raises(psycopg2.errors.InsufficientPrivilege) as err:
                    cur.execute(statement)
                assert str(err.value).startswith(message), statement
        # whatever pyreplica adds later: none of its functions is executable by PUBLIC
        assert master.execute("""
            SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname IN ('pyreplica', 'public')
               AND obj_description(p.oid, 'pg_proc') LIKE 'pyreplica:%%'
               AND has_function_privilege('public', p.oid, 'EXECUTE')""") == []
        assert master.scalar("SELECT count(*) FROM pg_proc WHERE pronamespace = 'pyreplica'::regnamespace") >= 20
        assert master.execute("SELECT username, op, sql FROM replica_log ORDER BY id") == [
            (app, "I", "INSERT INTO public.student (id, name) VALUES ('1', 'ann')"),
            (app, "I", "INSERT INTO public.student (id, name) VALUES ('2', 'bob')"),
            (app, "U", "UPDATE public.student SET name = 'ANN' WHERE id = '1'"),
            (app, "D", "DELETE FROM public.student WHERE id = '2'"),
            (app, "T", "TRUNCATE public.student"),
        ]
