"""pyreplica: PostgreSQL master -> slave asynchronous replication (PL/Python trigger + daemon, 2PC)."""
import os

__version__ = "2.0.0.dev0"

SQL_DIR = os.path.join(os.path.dirname(__file__), "sql")
MASTER_INSTALL_SQL = os.path.join(SQL_DIR, "master-install.sql")
MASTER_UNINSTALL_SQL = os.path.join(SQL_DIR, "master-uninstall.sql")
