"""Throw-away local PostgreSQL clusters (initdb + pg_ctl on a free loopback port).

Used by the test suite, `pyreplica demo` and `bench/`. PostgreSQL refuses to run as root, so when
we are root the cluster's files belong to, and its server runs as, the `postgres` OS user.
"""
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

import psycopg2

SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_prepared_transactions": "20",
    "max_connections": "60",
    "fsync": "off",                # throw-away data: speed over durability
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "128MB",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
    "logging_collector": "off",
}

HBA = """\
# pyreplica throw-away cluster: loopback only
local all all trust
host all pyreplica_pw 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
"""


def bindir():
    """The newest installed PostgreSQL server's bin directory (Debian layout), else PATH."""
    root = "/usr/lib/postgresql"
    if os.path.isdir(root):
        versions = sorted((d for d in os.listdir(root) if d.isdigit()), key=int)
        for v in reversed(versions):
            path = os.path.join(root, v, "bin")
            if os.path.exists(os.path.join(path, "postgres")):
                return path
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(found)
    raise RuntimeError("no PostgreSQL server found: run `make setup` (or apt-get install postgresql)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user():
    """(uid, gid) to run the server as: ourselves, or `postgres` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("running as root needs the `postgres` OS user for the test servers "
                           "(apt-get install postgresql creates it)") from None
    return pw.pw_uid, pw.pw_gid


class Cluster:
    """One PostgreSQL server in a temporary directory. Use as a context manager, or start()/stop()."""

    def __init__(self, name="pg", settings=None, base_dir=None):
        self.name = name
        self.settings = dict(SERVER_SETTINGS, **(settings or {}))
        self.bin = bindir()
        self.user = _server_user()
        self.dir = tempfile.mkdtemp(prefix=f"pyreplica-{name}-", dir=base_dir)
        self.datadir = os.path.join(self.dir, "data")
        self.logfile = os.path.join(self.dir, "server.log")
        self.port = None
        if self.user:
            os.chmod(self.dir, 0o755)
            os.chown(self.dir, *self.user)

    # -- processes -------------------------------------------------------------------------
    def _run(self, *args, check=True, **kw):
        cmd = [os.path.join(self.bin, args[0]), *args[1:]]
        extra = {"user": self.user[0], "group": self.user[1], "extra_groups": []} if self.user else {}
        return subprocess.run(cmd, check=check, capture_output=True, text=True, cwd=self.dir,
                              **extra, **kw)

    def initdb(self):
        self._run("initdb", "-D", self.datadir, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C.UTF-8", "--no-sync")
        with open(os.path.join(self.datadir, "postgresql.conf"), "a") as conf:
            conf.write("\n# pyreplica test cluster\n")
            conf.write(f"unix_socket_directories = '{self.dir}'\n")
            for key, value in self.settings.items():
                conf.write(f"{key} = {value}\n")
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w") as hba:
            hba.write(HBA)

    def start(self):
        if not os.path.exists(self.datadir):
            self.initdb()
        for attempt in range(5):
            self.port = free_port()
            result = self._run("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w", "-t", "60",
                               "-o", f"-p {self.port}", "start", check=False)
            if result.returncode == 0:
                return self
            time.sleep(0.2)   # port taken between free_port() and bind: try another
        raise RuntimeError(f"cluster {self.name} failed to start:\n{result.stderr}\n{self.server_log()}")

    def stop(self, mode="fast"):
        if os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            self._run("pg_ctl", "-D", self.datadir, "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self):
        self.stop()
        result = self._run("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w", "-t", "60",
                           "-o", f"-p {self.port}", "start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"cluster {self.name} failed to restart:\n{self.server_log()}")

    def destroy(self):
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def server_log(self):
        with contextlib.suppress(OSError), open(self.logfile) as f:
            return f.read()[-4000:]
        return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.destroy()

    # -- clients -----------------------------------------------------------------------------
    def dsn(self, dbname="postgres", user="postgres", **extra):
        parts = {"host": "127.0.0.1", "port": self.port, "dbname": dbname, "user": user, **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def connect(self, dbname="postgres", autocommit=True, **extra):
        conn = psycopg2.connect(self.dsn(dbname, **extra))
        conn.autocommit = autocommit
        return conn

    def execute(self, sql, params=None, dbname="postgres"):
        """Run one statement in autocommit; returns all rows, or None for a statement without."""
        with contextlib.closing(self.connect(dbname)) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else None

    def createdb(self, dbname):
        from psycopg2 import sql
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))

    def dropdb(self, dbname):
        from psycopg2 import sql
        # a prepared transaction would block DROP DATABASE: a test that failed may have left one
        for (gid,) in self.execute("SELECT gid FROM pg_prepared_xacts WHERE database = %s", (dbname,)) or []:
            self.execute("ROLLBACK PREPARED %s", (gid,), dbname=dbname)
        self.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))

    def psql(self, dbname, *args, input=None, check=True):
        """Run psql against a database of this cluster (as the invoking OS user, over TCP)."""
        cmd = [os.path.join(self.bin, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
               "-d", self.dsn(dbname), *args]
        return subprocess.run(cmd, input=input, capture_output=True, text=True, check=check)
