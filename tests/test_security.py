"""Security (issue 9, docs/design.md §3), tried as an attacker would on real clusters and real roles:
planted objects before and after install, a daemon with the least privileges on both sides."""
import contextlib
import os
import time
import uuid

import pytest
from psycopg2 import sql

import pyreplica
import pyreplica.apply
from replication import Daemon, create_on_both, run_cli, wait_identical, wait_until

# Named like pyreplica's functions (old and new), with the signatures its calls would match if they
# were not qualified and typed; each tries to make its owner superuser when run by a superuser.
PLANTS = [("py_log_capture_sql", "oid, \"char\""), ("py_log_capture_sql", "regclass, \"char\""),
          ("replica_confirm", "text, text, integer, integer"), ("confirm", "text, text, integer, integer"),
          ("register_slave", "text"), ("claim_slave", "text, text, text"), ("prune", "integer"),
          ("unapplied", "text"), ("captured_tables", ""), ("py_log_replica", "text"), ("touch", "text"),
          ("pg_current_snapshot", "text")]


class Attacker:
    """A login role with CREATE on schema public (as the PG 15 database owner has, or every role
    under the pre-15 ACL)."""

    def __init__(self, db):
        self.db = db
        self.name = f"mallory_{uuid.uuid4().hex[:8]}"
        db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(self.name)))
        db.execute(sql.SQL("GRANT CREATE, USAGE ON SCHEMA public TO {}").format(sql.Identifier(self.name)))

    def run(self, statement):
        with self.db.connect(user=self.name) as conn, conn.cursor() as cur:
            cur.execute(statement)

    def plant(self, schema="public", plants=PLANTS):
        for name, args in plants:
            self.run(f"""CREATE FUNCTION {schema}.{name}({args}) RETURNS text LANGUAGE plpgsql AS $$
                         BEGIN EXECUTE 'ALTER ROLE {self.name} SUPERUSER'; RETURN 'pwned'; END $$""")

    def is_superuser(self):
        return self.db.scalar("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (self.name,))

    def drop(self):
        self.db.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(self.name)))


@pytest.fixture
def attacker(bare_master):
    a = Attacker(bare_master)
    yield a
    a.drop()


def install(db, check=False):
    return db.psql("-f", pyreplica.MASTER_INSTALL_SQL, check=check)


def test_install_refuses_a_planted_log_or_schema_and_changes_nothing(bare_master, attacker):
    attacker.run("CREATE TABLE public.replica_log (id bigint, sql text)")
    result = install(bare_master)
    assert result.returncode != 0
    assert (f"pyreplica: refusing to install: relation public.replica_log (owner {attacker.name}) already exist(s) and "
            f"belong(s) to a role that is not a superuser") in result.stderr
    assert bare_master.scalar("SELECT to_regnamespace('pyreplica') IS NULL")
    attacker.run("DROP TABLE public.replica_log")
    bare_master.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
        sql.Identifier(bare_master.name), sql.Identifier(attacker.name)))
    attacker.run("CREATE SCHEMA pyreplica")
    result = install(bare_master)
    assert result.returncode != 0 and f"schema pyreplica (owner {attacker.name})" in result.stderr
    attacker.run("DROP SCHEMA pyreplica")
    attacker.plant(plants=[("py_log_create_tg", "oid")])
    result = install(bare_master)
    assert result.returncode != 0 and f"function public.py_log_create_tg(oid) (owner {attacker.name})" in result.stderr


def test_functions_planted_before_and_after_install_never_run_as_superuser(bare_master, slave, attacker):
    attacker.plant()                               # before install: names of internal functions
    assert install(bare_master).returncode == 0
    attacker.plant(schema="public", plants=[("py_log_create_tg", "oid"), ("py_log_create_tg", "name"),
                                            ("py_log_drop_tg", "varchar"), ("py_log_sql", "name")])
    master = bare_master
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    assert master.scalar("SELECT py_log_create_tg('t')") == "created trigger on t (id)"
    master.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b'); UPDATE t SET v = 'c' WHERE id = 1; DELETE FROM t WHERE id = 2")
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, ["t"])
    assert run_cli("status", master.dsn)[0] == 0
    assert run_cli("compare", master.dsn, slave.dsn, "--name", "s1")[0] == 0
    assert master.scalar("SELECT py_log_drop_tg('t')") == "dropped trigger on t"
    assert not attacker.is_superuser()


@pytest.fixture
def slave_attacker(slave):
    a = Attacker(slave)
    a.run(f"CREATE TABLE public.{a.name}_ran (who text); GRANT INSERT ON public.{a.name}_ran TO PUBLIC")
    yield a
    a.drop()


def planted_body(attacker):
    """PL/pgSQL that makes the attacker superuser when a superuser runs it, and records who ran it."""
    return (f"BEGIN EXECUTE 'ALTER ROLE {attacker.name} SUPERUSER'; EXCEPTION WHEN others THEN NULL; END; "
            f"INSERT INTO public.{attacker.name}_ran VALUES (current_user);")


def who_ran(attacker):
    return [row[0] for row in attacker.db.execute(f"SELECT who FROM public.{attacker.name}_ran")]


def test_functions_and_operators_planted_in_the_slaves_public_never_run_in_replay(master, slave, slave_attacker):
    """In public, a better match than pg_catalog's polymorphic or cast-needing built-in would be
    chosen: array_length(bigint[], int) in apply_events, quote_ident(name) in the catalog lookup of
    a grouped chunk, and = on varchar in a replayed WHERE. The first two are never searched for;
    while the operator exists nothing is replayed, and replay resumes once it is dropped."""
    body = planted_body(slave_attacker)
    slave_attacker.run(f"""
        CREATE FUNCTION public.array_length(a bigint[], d int) RETURNS int LANGUAGE plpgsql
            AS $$ BEGIN {body} RETURN pg_catalog.array_length(a, d); END $$;
        CREATE FUNCTION public.quote_ident(n name) RETURNS text LANGUAGE plpgsql
            AS $$ BEGIN {body} RETURN pg_catalog.quote_ident(n::text); END $$;""")
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, v text); "
                                  "CREATE TABLE k (id varchar PRIMARY KEY, v text)", ["t", "k"])
    master.execute("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 40) g; "
                   "INSERT INTO k VALUES ('victim', 'keep me'), ('k', 'a')")
    with Daemon(master, slave, name="s1") as daemon:
        wait_identical(master, slave, ["t", "k"])
        master.execute("UPDATE t SET v = 'b'")      # 40 statements: grouped, its tables looked up
        wait_identical(master, slave, ["t"])
        slave_attacker.run(f"""
            CREATE FUNCTION public.evil_eq(a varchar, b varchar) RETURNS boolean LANGUAGE plpgsql
                AS $$ BEGIN {body} DELETE FROM public.k WHERE id::text = 'victim'; RETURN a::text = b::text; END $$;
            CREATE OPERATOR public.= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = public.evil_eq)""")
        master.execute("UPDATE k SET v = 'b' WHERE id = 'k'")
        daemon.wait_for_output("the slave has public.=(character varying,character varying) owned by "
                               f"{slave_attacker.name}: a replayed statement could run it as the daemon's role")
        assert slave.execute("SELECT id, v FROM k ORDER BY id") == [("k", "a"), ("victim", "keep me")]
        slave.execute("DROP OPERATOR public.= (varchar, varchar)")
        wait_identical(master, slave, ["t", "k"])
    assert who_ran(slave_attacker) == [] and not slave_attacker.is_superuser()


def test_a_slave_schema_planted_before_the_first_start_is_refused(master, slave, slave_attacker):
    """The slave's schema pyreplica made by an ordinary role, with a look-alike apply_events marked
    current: the daemon would call it. It refuses to use a schema anyone else than a superuser or
    its own role owns, and says what to do."""
    slave.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(slave.name),
                                                                       sql.Identifier(slave_attacker.name)))
    with open(os.path.join(pyreplica.SQL_DIR, "slave-install.sql")) as f:
        slave_attacker.run(f.read())
    slave_attacker.run(f"""CREATE OR REPLACE FUNCTION pyreplica.apply_events(ids bigint[], ops text[], rels text[],
                               stmts text[], rows int[], OUT failed int, OUT code text, OUT message text,
                               OUT detail text, OUT hint text) LANGUAGE plpgsql
                           AS $$ BEGIN {planted_body(slave_attacker)} END $$""")
    slave.execute(f"COMMENT ON FUNCTION pyreplica.apply_events(bigint[], text[], text[], text[], int[]) "
                  f"IS '{pyreplica.apply.SLAVE_SCHEMA_VERSION}'")
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, v text)", ["t"])
    master.execute("INSERT INTO t VALUES (1, 'a')")
    with Daemon(master, slave, name="s1") as daemon:
        daemon.wait_for_output(f"the slave's schema pyreplica holds schema pyreplica owned by {slave_attacker.name}; ")
    assert "DROP SCHEMA pyreplica CASCADE" in daemon.output
    assert who_ran(slave_attacker) == [] and not slave_attacker.is_superuser()
    slave.execute("DROP SCHEMA pyreplica CASCADE")
    with Daemon(master, slave, name="s1"):
        wait_identical(master, slave, ["t"])


def test_an_advisory_lock_any_role_may_take_stops_no_prune(master, slave):
    """The prune of the log was serialised by an advisory lock, which any role may take and hold
    for ever: the log then grew without a word. Holding that key now stops nothing."""
    attacker = Attacker(master)
    try:
        create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY)", ["t"])
        with contextlib.closing(attacker.db.connect(user=attacker.name)) as hold, hold.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(hashtext('pyreplica prune'))")
            with Daemon(master, slave, name="s1", keepalive=1):
                master.execute("INSERT INTO t SELECT generate_series(1, 10)")
                wait_identical(master, slave, ["t"])
                wait_until(lambda: master.scalar("SELECT count(*) FROM pyreplica.log_pruned") == 1,
                           timeout=30, message="a prune")
    finally:
        attacker.drop()


def test_compare_and_repair_never_run_a_cast_the_owner_of_a_type_made(master, slave):
    """The owner of a replicated table's type may CREATE CAST (type AS text) WITH FUNCTION: `::text`
    in compare's and repair's queries ran it as whoever compares or repairs (a superuser, often).
    Values go through their type's output now: bool, inet, a composite of NULLs and NULL repair exactly."""
    attacker = Attacker(master)
    master.execute(f"CREATE TABLE public.{attacker.name}_ran (who text); "
                   f"GRANT INSERT ON public.{attacker.name}_ran TO PUBLIC")
    ddl = ("CREATE TYPE public.mood AS ENUM ('sad', 'ok'); CREATE TYPE public.pair AS (a int, b text); "
           "CREATE TABLE public.moods (id public.mood PRIMARY KEY, v text, f bool, ip inet, p public.pair)")
    try:
        create_on_both(master, slave, ddl, ["moods"])
        master.execute(sql.SQL("ALTER TYPE public.mood OWNER TO {0}; ALTER TABLE public.moods OWNER TO {0}")
                       .format(sql.Identifier(attacker.name)))
        attacker.run(f"""CREATE FUNCTION public.mood_text(m public.mood) RETURNS text LANGUAGE plpgsql AS $$
                             BEGIN INSERT INTO public.{attacker.name}_ran VALUES (current_user);
                                   RETURN pg_catalog.format('%s', m); END $$;
                         CREATE CAST (public.mood AS text) WITH FUNCTION public.mood_text(public.mood)""")
        master.execute("INSERT INTO moods VALUES ('ok', 'x', true, '10.0.0.1', ROW(NULL, NULL)), "
                       "('sad', NULL, false, '10.0.0.0/8', NULL)")
        with Daemon(master, slave, name="s1"):
            wait_identical(master, slave, ["moods"])
        slave.execute("UPDATE moods SET v = 'diverged', f = NULL, ip = NULL, p = ROW(1, 'x'); DELETE FROM moods WHERE id = 'sad'")
        assert run_cli("compare", master.dsn, slave.dsn, "--name", "s1")[0] != 0
        code, out, err = run_cli("repair", master.dsn, slave.dsn, "public.moods", "--name", "s1")
        assert code == 0, (out, err)
        same = "SELECT format('%s', id), v, f, host(ip), masklen(ip), p IS NULL, (p).a, (p).b FROM moods ORDER BY id"
        assert slave.execute(same) == master.execute(same)
        assert run_cli("compare", master.dsn, slave.dsn, "--name", "s1")[0] == 0
        assert master.execute(f"SELECT who FROM public.{attacker.name}_ran") == []
    finally:
        master.execute("DROP CAST IF EXISTS (public.mood AS text)")
        attacker.drop()


def test_a_relname_with_a_dot_never_captures_another_table(master):
    master.execute("""CREATE SCHEMA evil; CREATE TABLE public.accounts (id int PRIMARY KEY);
                      CREATE TABLE evil."public.accounts" (id int PRIMARY KEY)""")
    line = master.scalar("SELECT py_log_create_tg('public.accounts')")
    assert line.startswith("table public.accounts is ambiguous: it could be ")
    assert 'evil."public.accounts"' in line and "accounts" in line
    assert master.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE '%replica_tg%'") == 0
    assert master.scalar("""SELECT py_log_create_tg('"public.accounts"')""") == 'created trigger on evil."public.accounts" (id)'


def test_case_only_change_under_a_nondeterministic_collation_is_logged(master, slave):
    ddl = """CREATE COLLATION IF NOT EXISTS ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
             CREATE TABLE t (id int PRIMARY KEY, name text COLLATE ci)"""
    create_on_both(master, slave, ddl, ["t"])
    master.execute("INSERT INTO t VALUES (1, 'abc'); UPDATE t SET name = 'ABC' WHERE id = 1")
    assert master.scalar("SELECT sql FROM replica_log WHERE op = 'U'") == "UPDATE public.t SET name = 'ABC' WHERE id = '1'"


LEAST_PRIVILEGE_SLAVE = """
CREATE ROLE {role} LOGIN;
CREATE SCHEMA pyreplica AUTHORIZATION {role};
GRANT SET ON PARAMETER session_replication_role TO {role};
GRANT USAGE ON SCHEMA public TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON public.t TO {role};
"""


def test_least_privilege_daemon_replicates_and_a_check_function_cannot_run_programs(master, slave, tmp_path):
    """The daemon as a plain login role on both sides; a slave CHECK function trying COPY TO PROGRAM
    (what a hostile table owner could ship) fails for lack of rights, and replay stops saying so."""
    role = f"repl_{uuid.uuid4().hex[:8]}"
    flag = tmp_path / "pwned"
    os.chmod(tmp_path, 0o777)
    master.execute("CREATE FUNCTION evil(text) RETURNS boolean LANGUAGE sql AS 'SELECT true'")
    slave.execute(f"""CREATE FUNCTION evil(v text) RETURNS boolean LANGUAGE plpgsql AS $$
                      BEGIN IF v = 'boom' THEN COPY (SELECT 1) TO PROGRAM 'touch {flag}'; END IF; RETURN true; END $$""")
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY, v text CHECK (evil(v)))", ["t"])
    master.execute(sql.SQL("CREATE ROLE {} LOGIN; GRANT pyreplica_daemon TO {}").format(
        sql.Identifier(role), sql.Identifier(role)))
    slave.execute(sql.SQL(LEAST_PRIVILEGE_SLAVE).format(role=sql.Identifier(role)))

    class As:
        def __init__(self, db):
            self.dsn = db.cluster.dsn(db.name, user=role)
    try:
        master.execute("INSERT INTO t VALUES (1, 'fine'), (2, 'also fine')")
        with Daemon(As(master), As(slave), name="lp") as daemon:
            try:
                wait_identical(master, slave, ["t"])
            except AssertionError as e:
                raise AssertionError(f"{e}\n{daemon.output}") from None
            master.execute("INSERT INTO t VALUES (3, 'boom')")
            daemon.wait_for_output("pg_execute_server_program")
            assert not flag.exists()
            slave.execute("ALTER TABLE t DROP CONSTRAINT t_v_check")
            wait_identical(master, slave, ["t"])
        assert not flag.exists()
        assert master.scalar("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)) is False
    finally:
        for db in (master, slave):
            db.execute(sql.SQL("DROP OWNED BY {0}").format(sql.Identifier(role)))
        slave.execute("DROP SCHEMA IF EXISTS pyreplica CASCADE")
        for db in (master, slave):
            db.execute(sql.SQL("DROP ROLE IF EXISTS {0}").format(sql.Identifier(role)))


def test_two_slaves_with_one_name_the_second_is_refused(master, slave, slave2):
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY)", ["t"])
    slave2.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with Daemon(master, slave, name="shop"):
        wait_until(lambda: master.scalar("SELECT count(slave_system_id) FROM pyreplica.replica_slaves"),
                   message="the name claimed")
    rc, out, err = run_cli("run", master.dsn, slave2.dsn, "--name", "shop")
    assert rc == 1
    assert (f'slave name "shop" belongs to another slave (database {slave.name} of server ' in err
            and f"not to this one (database {slave2.name} of server" in err), err
    master.execute("INSERT INTO t VALUES (1)")
    with Daemon(master, slave, name="shop"):
        wait_identical(master, slave, ["t"])


@pytest.mark.parametrize("register, refusal", [
    ("SELECT pyreplica.register_slave('shop', NULL, 'another server', 'another database')",
     'slave name "shop" belongs to another slave (database another database of server another server), '
     'not to this one'),
    ("SELECT pyreplica.register_slave('shop')",     # `pyreplica register`, before a dump
     'slave name "shop" was registered again (drop-slave, then register) while this daemon ran'),
])
def test_a_running_daemon_whose_name_was_dropped_and_given_to_another_slave_never_moves_its_record(
        master, slave, register, refusal):
    """drop-slave while the daemon still runs, then the name registered for another slave (a clone
    of a new slave under the old name, or `register` before a dump): the old daemon's next batch must
    not write its position into the new slave's record, which pruning trusts."""
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY)", ["t"])
    with Daemon(master, slave, name="shop") as daemon:
        daemon.wait_for_output("Waiting for 'NOTIFY'")
        master.execute("SELECT pyreplica.drop_slave('shop')")
        master.execute(register)
        registered = master.execute("SELECT confirmed::text, batch_id FROM pyreplica.replica_slaves")
        master.execute("INSERT INTO t VALUES (1)")
        wait_until(lambda: daemon.proc.poll() is not None, timeout=30, message="the old daemon to stop")
        assert daemon.proc.returncode == 1
        assert refusal in daemon.output, daemon.output
    assert master.execute("SELECT confirmed::text, batch_id FROM pyreplica.replica_slaves") == registered
    assert slave.scalar("SELECT count(*) FROM t") == 0, "the batch is rolled back on the slave too"
    for db in (master, slave):
        assert db.scalar("SELECT count(*) FROM pg_prepared_xacts") == 0


def test_unregistered_slave_refuses_once_the_log_was_pruned(master, slave, slave2):
    create_on_both(master, slave, "CREATE TABLE t (id int PRIMARY KEY)", ["t"])
    slave2.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with Daemon(master, slave, name="first", keepalive=1):
        master.execute("INSERT INTO t SELECT generate_series(1, 10)")
        wait_identical(master, slave, ["t"])
        wait_until(lambda: master.scalar("SELECT count(*) FROM pyreplica.log_pruned") == 1, message="a prune")
    rc, out, err = run_cli("run", master.dsn, slave2.dsn, "--name", "late")
    assert rc == 1 and "slave late is not registered on the master and the master's log has been pruned" in err
    assert "pyreplica register late MASTER" in err
    assert run_cli("register", "late", master.dsn)[0] == 0
    master.execute("INSERT INTO t VALUES (11)")
    slave2.execute("INSERT INTO t SELECT generate_series(1, 10)")    # the copy made by hand
    with Daemon(master, slave2, name="late"):
        wait_identical(master, slave2, ["t"])


def test_conflict_lines_and_mails_carry_no_row_values_at_the_default_debug_level(master, slave):
    card = "4111111111111111"
    create_on_both(master, slave, "CREATE TABLE cards (id int PRIMARY KEY, number text NOT NULL CHECK (number <> 'x'))",
                   ["cards"])
    slave.execute("ALTER TABLE cards DROP CONSTRAINT cards_number_check; "
                  "ALTER TABLE cards ADD CONSTRAINT no_visa CHECK (number NOT LIKE '4%')")
    master.execute("INSERT INTO cards VALUES (7, %s)", (card,))
    event = master.scalar("SELECT max(id) FROM replica_log")
    with Daemon(master, slave, name="c1") as daemon:
        daemon.wait_for_output(f"at event {event} (INSERT on public.cards)")
        time.sleep(0.5)
        quiet = daemon.output
    assert card not in quiet, quiet
    assert 'violates check constraint "no_visa"' in quiet and "(primary key: id)" in quiet
    with Daemon(master, slave, "--debug-level", "2", name="c1") as daemon:
        daemon.wait_for_output("Failing row contains")
        assert card in daemon.output        # asked for: every statement and row
