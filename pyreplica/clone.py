"""`pyreplica clone` (docs/design.md §8): a new slave from one exported master snapshot, writers never stopped.

1. The slave is registered on the master (with its identity) at the current snapshot, and that
   registration is committed: from then on pruning keeps every event the slave may need.
2. A REPEATABLE READ transaction on the master exports its snapshot, taken after the
   registration's; pg_dump --snapshot dumps the schema and the replicated tables' data as of it.
3. pg_restore's script is fed to psql in ONE slave transaction, together with the slave's
   position (the exported snapshot, batch 0): a failed clone leaves the slave as it was.
4. The master's record moves up to the exported snapshot.
Events visible in the exported snapshot are in the copy; `run` replays every later one, nothing twice.
"""
import contextlib
import os
import re
import shutil
import subprocess
import tempfile

import psycopg2.extensions

from . import apply, log, master
from .db import ReplicaError, close_quietly, connect, fetch_one, safe_text, split_password, startup_options
from .filters import Pipeline
from .sides import SLAVE_IDENTITY

EXPORT_SNAPSHOT = "SELECT pg_catalog.pg_export_snapshot(), pg_catalog.pg_current_snapshot()::text"
TABLE_EXISTS = "SELECT pg_catalog.to_regclass(pg_catalog.format('%%I.%%I', %s::text, %s::text)) IS NOT NULL"
POSITION = """
INSERT INTO pyreplica.position (slave, snapshot, batch_id) VALUES ({slave}, {snapshot}::pg_snapshot, 0)
ON CONFLICT (slave) DO UPDATE SET snapshot = EXCLUDED.snapshot, batch_id = 0, applied = 0, updated_at = now();
"""

# master-install.sql's objects outside schema pyreplica (which pg_dump leaves out, -N), named in
# pg_restore's table of contents: the public entry points (py_log_*), the view, PL/Python.
OWN_NAMES = {"replica_log", "plpython3u"}
OWN_TRIGGER = re.compile(r"_replica_tg(_[udt])?$")


def is_pyreplica_object(desc, rest):
    tokens = [token.split("(", 1)[0] for token in rest.split(" ")]
    if desc == "TRIGGER" and any(OWN_TRIGGER.search(token) for token in tokens):
        return True
    return any(token in OWN_NAMES or token.startswith("py_log_") for token in tokens)


TOC_LINE = re.compile(r"^(\d+); \d+ \d+ (?P<desc>TABLE DATA|SEQUENCE SET|SEQUENCE OWNED BY|FK CONSTRAINT|"
                      r"EVENT TRIGGER|DEFAULT ACL|MATERIALIZED VIEW DATA|[A-Z]+) (?P<rest>.*)$")


CLIENT_ROOT = "/usr/lib/postgresql"      # Debian's layout: one bin directory per installed major version


def tool(name):
    """The path of a PostgreSQL client program: the newest version installed, else pg_config's, else PATH."""
    for directory in [*version_bindirs(), pg_config_bindir()]:
        if directory and os.access(os.path.join(directory, name), os.X_OK):
            return os.path.join(directory, name)
    found = shutil.which(name)
    if found is None:
        raise ReplicaError(f"{name} not found (in {CLIENT_ROOT}/*/bin, pg_config --bindir or PATH): install the "
                           f"PostgreSQL client programs of the master's major version NN or newer (Debian/Ubuntu: "
                           f"apt-get install postgresql-client-NN, or postgresql-client)")
    return found


def version_bindirs():
    """CLIENT_ROOT/<version>/bin, newest version first."""
    try:
        versions = [v for v in os.listdir(CLIENT_ROOT) if re.fullmatch(r"\d+(\.\d+)?", v)]
    except OSError:
        return []
    versions.sort(key=lambda v: tuple(int(part) for part in v.split(".")), reverse=True)
    return [os.path.join(CLIENT_ROOT, v, "bin") for v in versions]


def pg_config_bindir():
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def client_dsn(dsn, directory, side):
    """The DSN to give a client program on its command line (seen by every local user in `ps`): without its
    password, which goes into a passfile (mode 0600, in the clone's private temporary directory), and
    with the session settings of pyreplica's own connections (db.startup_options: a slave whose
    database default is read-only, or a short statement_timeout, is restored all the same)."""
    bare, password = split_password(dsn)
    extra = {"options": startup_options(dsn)}
    if password is not None:
        extra["passfile"] = os.path.join(directory, f"{side}.pgpass")
        fd = os.open(extra["passfile"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("*:*:*:*:" + password.replace("\\", "\\\\").replace(":", "\\:") + "\n")
    return psycopg2.extensions.make_dsn(bare, **extra)


def clone(config, name):
    logger = log.get()
    conn = connect(config.DSN0, "master", settings={"search_path": master.SEARCH_PATH})
    registered = False
    try:
        conn.autocommit = True
        master.require_installed(conn)
        tables = replicated_tables(conn, Pipeline(config.TABLES))
        identity = check_slave_empty(config.DSN1, tables)
        master.register(conn, name, None, identity)
        registered = True
        conn.autocommit = False
        conn.set_session(isolation_level="REPEATABLE READ")
        with conn.cursor() as cur:
            cur.execute(EXPORT_SNAPSHOT)
            exported, snapshot = cur.fetchone()
        logger.info("Cloning %s table(s) from the master at snapshot %s", len(tables), snapshot)
        with tempfile.TemporaryDirectory(prefix="pyreplica-clone-") as tmp:
            dump = os.path.join(tmp, "master.dump")
            run_tool([tool("pg_dump"), "-Fc", "--no-owner", "--no-privileges", f"--snapshot={exported}",
                      "--exclude-schema=pyreplica", "-f", dump, "-d", client_dsn(config.DSN0, tmp, "master")],
                     "pg_dump of the master")
            conn.rollback()       # pg_dump has imported the snapshot: the export can end
            listing = os.path.join(tmp, "restore.list")
            write_restore_list(dump, listing, tables)
            logger.info("Restoring into the slave (one transaction)")
            restore(dump, listing, client_dsn(config.DSN1, tmp, "slave"), slave_epilogue(name, snapshot))
        conn.autocommit = True
        with conn.cursor() as cur:
            master.confirm(cur, name, snapshot, 0, 0, identity)
        logger.info("Clone done: slave %s registered at snapshot %s; start `pyreplica run` for it", name, snapshot)
        return 0
    except BaseException:
        if registered:
            unregister(config.DSN0, name)
        raise
    finally:
        close_quietly(conn)


def replicated_tables(conn, pipeline):
    """(schema, table) of every captured table this slave takes, partitions included (their data)."""
    tables = [(t.schema, t.name) for t in master.captured_tables(conn) if pipeline.wants_table(t.qualified)]
    if not tables:
        raise ReplicaError("the master replicates no table: run py_log_create_tg on the tables first", "master")
    return tables


def check_slave_empty(slave_dsn, tables):
    """Refuse a slave that has any of the tables already; returns the slave's identity."""
    with contextlib.closing(connect(slave_dsn, "slave", settings={"search_path": master.SEARCH_PATH})) as slave:
        slave.autocommit = True
        present = [f"{s}.{t}" for s, t in tables if fetch_one(slave, TABLE_EXISTS, (s, t))]
        if fetch_one(slave, "SELECT pg_catalog.to_regclass('pyreplica.position') IS NOT NULL"):
            present.append("pyreplica.position")
        with slave.cursor() as cur:
            cur.execute(SLAVE_IDENTITY)
            identity = cur.fetchone()
    if present:
        raise ReplicaError(f"the slave is not empty: it already has {', '.join(present[:5])}; clone needs a "
                           f"new database (createdb) or these dropped", "slave")
    return identity


def unregister(master_dsn, name):
    with contextlib.suppress(Exception), contextlib.closing(
            connect(master_dsn, "master", settings={"search_path": master.SEARCH_PATH})) as conn:
        conn.autocommit = True
        master.drop_slave(conn, name)


def run_tool(cmd, what):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ReplicaError(f"{what} failed: {safe_text(result.stderr.strip()[-800:])}")
    return result.stdout


def write_restore_list(dump, listing, tables):
    """Keep the schema minus pyreplica's own objects, and the data of the replicated tables only."""
    wanted_data = {f"{schema} {table}" for schema, table in tables}
    kept = []
    for line in run_tool([tool("pg_restore"), "-l", dump], "pg_restore -l").splitlines():
        match = TOC_LINE.match(line)
        if match is None:
            kept.append(line)
            continue
        if is_pyreplica_object(match["desc"], match["rest"]):
            continue
        if match["desc"] == "TABLE DATA" and match["rest"].rsplit(" ", 1)[0] not in wanted_data:
            continue
        kept.append(line)
    with open(listing, "w") as f:
        f.write("\n".join(kept) + "\n")


def slave_epilogue(name, snapshot):
    """What the restore's transaction ends with: the slave's schema and its position."""
    from psycopg2.extensions import QuotedString
    with open(os.path.join(os.path.dirname(apply.__file__), "sql", "slave-install.sql")) as f:
        slave_schema = f.read()
    position = POSITION.format(slave=QuotedString(name).getquoted().decode(),
                               snapshot=QuotedString(snapshot).getquoted().decode())
    return slave_schema + "\n" + position


def restore(dump, listing, slave_dsn, epilogue=""):
    """pg_restore's script for the listed entries, then `epilogue`, in one psql transaction."""
    script = subprocess.Popen([tool("pg_restore"), "-L", listing, "-f", "-", dump],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    psql = subprocess.Popen([tool("psql"), "-X", "-q", "-1", "-v", "ON_ERROR_STOP=1", "-d", slave_dsn],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        shutil.copyfileobj(script.stdout, psql.stdin)
        psql.stdin.write(epilogue.encode())
        psql.stdin.close()
    except BrokenPipeError:
        script.kill()       # psql stopped at an error: its stderr says which
    restore_err = script.stderr.read().decode()
    if script.wait() != 0 or psql.wait() != 0:
        raise ReplicaError(f"restore into the slave failed (nothing was kept): "
                           f"{safe_text((psql.stderr.read().decode() or restore_err).strip()[-800:])}", "slave")
