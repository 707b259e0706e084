"""Connections to the master and the slave, and the errors users see when they fail."""
import os
import re

import psycopg2
import psycopg2.extensions

class ReplicaError(Exception):
    """An error to show as one line (exit code 1); `side` says which server it concerns."""

    def __init__(self, message, side=None):
        super().__init__(message)
        self.side = side


class ConnectionLost(ReplicaError):
    """A server went away (or could not be reached): retried with backoff by the daemon."""


def safe_dsn(dsn):
    """The DSN with any password hidden, fit for a log line."""
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)


def first_line(error):
    text = (getattr(error, "pgerror", None) or str(error) or error.__class__.__name__).strip()
    return text.splitlines()[0] if text else repr(error)


# Pinned when a connection is opened (startup options, before psycopg2 chooses how it quotes), so
# that no database or role default can change how literals are read or text is encoded.
PINNED_SETTINGS = {"standard_conforming_strings": "on"}


def startup_options(dsn, settings=None):
    """The libpq `options` for dsn: the user's own (from the DSN, keyword or URI form, else
    PGOPTIONS, which libpq ignores once options are given) followed by ours, which win."""
    existing = psycopg2.extensions.parse_dsn(dsn).get("options", os.environ.get("PGOPTIONS", ""))
    ours = " ".join(f"-c {_escape_option(name)}={_escape_option(str(value))}"
                    for name, value in {**(settings or {}), **PINNED_SETTINGS}.items())
    return f"{existing} {ours}".strip()


def _escape_option(text):
    # libpq splits options on unescaped white space; a backslash escapes the next character
    return re.sub(r"([\\\s])", r"\\\1", text)


def connect(dsn, side, application_name="pyreplica", settings=None, **params):
    """Connect, or raise ConnectionLost with one line naming the side and what went wrong.

    settings: more server settings ({name: value}) for the session, given as startup options;
    params: more libpq parameters (keepalives, tcp_user_timeout).
    """
    try:
        conn = psycopg2.connect(dsn, application_name=application_name, connect_timeout=10,
                                client_encoding="UTF8", options=startup_options(dsn, settings), **params)
    except psycopg2.OperationalError as e:
        raise ConnectionLost(f"cannot connect to the {side} ({safe_dsn(dsn)}): {first_line(e)}", side) from e
    except psycopg2.ProgrammingError as e:  # malformed DSN
        raise ReplicaError(f"bad {side} connection string {safe_dsn(dsn)!r}: {first_line(e)}", side) from e
    return conn


def is_connection_error(error):
    """True when a psycopg2 error means the connection is gone (not a statement's failure)."""
    if isinstance(error, (psycopg2.InterfaceError, psycopg2.OperationalError)):
        code = getattr(error, "pgcode", None)
        # 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now, 08xxx connection
        return code is None or code.startswith(("08", "57P"))
    return False


def close_quietly(conn):
    if conn is not None:
        try:
            conn.close()
        except psycopg2.Error:
            pass


def fetch_one(conn, query, params=None):
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
        return row[0] if row else None
