"""Real throw-away PostgreSQL servers for the suite (docs/design.md §9).

Two clusters are started once per session (`master_cluster`, `slave_cluster`); each test gets fresh
databases in them (`master`, `slave`), so tests are isolated and the suite stays fast. Clusters are
always stopped, also on failure or Ctrl-C (session fixture finalizers + atexit).
"""
import atexit
import itertools
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import pyreplica  # noqa: E402
from pyreplica import apply  # noqa: E402
from pyreplica.cluster import Cluster  # noqa: E402

_counter = itertools.count()
_started = []


def _stop_all():
    for cluster in _started:
        cluster.destroy()


atexit.register(_stop_all)


def start_cluster(name, **settings):
    cluster = Cluster(name, settings=settings)
    _started.append(cluster)
    return cluster.start()


@pytest.fixture(scope="session")
def master_cluster():
    cluster = start_cluster("master")
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def slave_cluster():
    cluster = start_cluster("slave")
    yield cluster
    cluster.destroy()


class Database:
    """A database in a cluster: what the tests need to talk to it."""

    def __init__(self, cluster, name):
        self.cluster, self.name = cluster, name

    @property
    def dsn(self):
        return self.cluster.dsn(self.name)

    def connect(self, autocommit=True, **extra):
        return self.cluster.connect(self.name, autocommit=autocommit, **extra)

    def execute(self, sql, params=None):
        return self.cluster.execute(sql, params, dbname=self.name)

    def scalar(self, sql, params=None):
        return self.execute(sql, params)[0][0]

    def psql(self, *args, **kw):
        return self.cluster.psql(self.name, *args, **kw)

    def install_master(self):
        return self.psql("-f", pyreplica.MASTER_INSTALL_SQL)

    def table_rows(self, table):
        """Every row of a table as text, in primary-key order: what "identical" means in tests."""
        return self.execute(f"SELECT t::text FROM {table} t ORDER BY 1")

    def __repr__(self):
        return f"<Database {self.name} on port {self.cluster.port}>"


def fresh_db(cluster, prefix):
    name = f"{prefix}{next(_counter)}_{os.getpid()}"
    cluster.createdb(name)
    return Database(cluster, name)


def database(cluster, prefix, install=False):
    """Fixture body: a fresh database in `cluster` (master-installed if asked), dropped afterwards."""
    db = fresh_db(cluster, prefix)
    if install:
        db.install_master()
    yield db
    cluster.dropdb(db.name)


@pytest.fixture
def master(master_cluster):
    """A fresh database with master-install.sql applied."""
    yield from database(master_cluster, "m", install=True)


@pytest.fixture
def master2(master_cluster):
    """A second master database (another replica set)."""
    yield from database(master_cluster, "m", install=True)


@pytest.fixture
def bare_master(master_cluster):
    """A fresh database without pyreplica installed."""
    yield from database(master_cluster, "b")


@pytest.fixture
def slave(slave_cluster):
    yield from database(slave_cluster, "s")


@pytest.fixture
def slave2(slave_cluster):
    yield from database(slave_cluster, "s")


@pytest.fixture
def slave3(slave_cluster):
    yield from database(slave_cluster, "s")


@pytest.fixture(scope="module")
def group_small_chunks():
    """In-process apply groups chunks from two statements on (the daemon only from apply.GROUP_FROM),
    so that tests of grouped replay can use a few events. Module-scoped: hypothesis's tests use it."""
    saved, apply.GROUP_FROM = apply.GROUP_FROM, 2
    yield
    apply.GROUP_FROM = saved


def pytest_addoption(parser):
    parser.addoption("--soak-seconds", type=float, default=20.0,
                     help="length of the soak test's write load (default 20; the issue's full run is 60)")


@pytest.fixture
def soak_seconds(request):
    return request.config.getoption("--soak-seconds")
