"""Connections to the master and the slave, and the errors users see when they fail."""
import contextlib
import os
import re
import urllib.parse

import psycopg2
import psycopg2.extensions

class ReplicaError(Exception):
    """An error to show as one line (exit code 1); `side` says which server it concerns."""

    def __init__(self, message, side=None):
        super().__init__(message)
        self.side = side


class ConnectionLost(ReplicaError):
    """A server went away (or could not be reached): retried with backoff by the daemon."""


# Where a password can sit in a connection string (libpq reads both forms):
# keyword form: password=secret, password = 'a b' (also sslpassword, the client key's passphrase);
# URI form: postgresql://user:secret@host/db and ?password=secret in the query string.
# Each pattern errs on hiding too much: a malformed DSN must not show its password either.
def _uri_patterns(stop):
    """(userinfo password, up to the last '@'; query-string password), values ending at a `stop` char."""
    return (re.compile(rf"(postgres(?:ql)?://[^:@/{stop}]*:)([^{stop}]*)(?=@)", re.I),
            re.compile(rf"([?&](?:ssl)?password=)([^&{stop}]*)", re.I))


URI_IN_DSN = _uri_patterns(r"\n")
URI_IN_TEXT = _uri_patterns(r"\s\"'")       # a URI quoted in an error message ends at a space or quote
# an unquoted value runs to the next `key=`: libpq ends it at a space, but a password typed with a
# space in it must be hidden whole (libpq then quotes its second half: missing "=" after "...")
KEYWORD = re.compile(r"((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|.*?)(?=(?<!\\)\s+\w+\s*=|\s*$)", re.I | re.S)
MASK = "***"


def is_uri(dsn):
    return re.match(r"\s*postgres(?:ql)?://", dsn, re.I) is not None


def _password_matches(dsn):
    patterns = URI_IN_DSN if is_uri(dsn) else (KEYWORD,)
    return patterns, [m.group(2) for pattern in patterns for m in pattern.finditer(dsn)]


def safe_dsn(dsn):
    """The DSN (keyword or URI form, well-formed or not) with every password hidden, fit for a log line."""
    for pattern in _password_matches(dsn)[0]:
        dsn = pattern.sub(rf"\1{MASK}", dsn)
    return dsn


def safe_text(text, dsn=""):
    """An error text (libpq's, pg_dump's...) with the passwords of `dsn`, and of any URI it quotes, hidden.
    libpq quotes pieces of a DSN it cannot parse (`invalid percent-encoded token: "s3%zz"`)."""
    for pattern in URI_IN_TEXT:
        text = pattern.sub(rf"\1{MASK}", text)
    for secret in sorted(dsn_secrets(dsn), key=len, reverse=True):
        # whole tokens only: hiding a short password inside a longer word would reveal it
        text = re.sub(rf"(?<!\w){re.escape(secret)}(?!\w)", MASK, text)
    return text


def dsn_secrets(dsn):
    """Every string that may be (a piece of) a password in `dsn`: as typed, unquoted, percent-decoded."""
    values = _password_matches(dsn)[1]
    values += [urllib.parse.unquote(v) for v in values] + [re.sub(r"\\(.)", r"\1", v.strip("'")) for v in values]
    with contextlib.suppress(psycopg2.Error):      # what libpq itself reads, when it can parse the DSN
        parsed = psycopg2.extensions.parse_dsn(dsn)
        values += [parsed.get("password", ""), parsed.get("sslpassword", "")]
    pieces = [piece for value in values for piece in value.split()]
    return {v for v in values + pieces if v and v != MASK}


def split_password(dsn):
    """(the DSN without its password, the password or None), for client programs that must not get it
    on their command line. Raises ReplicaError for a DSN libpq cannot parse."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as e:
        raise ReplicaError(f"bad connection string {safe_dsn(dsn)!r}: {safe_text(first_line(e), dsn)}") from None
    password = params.pop("password", None)
    return psycopg2.extensions.make_dsn(**params), password


def refusal(error, side):
    """A ReplicaError carrying the message of an exception that pyreplica's SQL raised on purpose
    (RAISE EXCEPTION 'pyreplica: ...'), without PostgreSQL's "ERROR:" and our prefix."""
    return ReplicaError(server_message(error).removeprefix("pyreplica: "), side)


def server_message(error):
    """The first line of a server's error, without its "ERROR:"."""
    return first_line(error).removeprefix("ERROR:").strip()


def first_line(error):
    text = (getattr(error, "pgerror", None) or str(error) or error.__class__.__name__).strip()
    return text.splitlines()[0] if text else repr(error)


# Pinned when a connection is opened (startup options, before psycopg2 chooses how it quotes), so
# that no database or role default can change how literals are read (array_nulls = off reads a NULL
# array element as the string 'NULL'), how names are quoted, or how text is encoded.
PINNED_SETTINGS = {"standard_conforming_strings": "on", "array_nulls": "on", "quote_all_identifiers": "off"}
# A DBA's guards against runaway application sessions, set as a database or role default, would
# cancel a batch that takes longer, or end the master session left idle in its transaction while the
# slave applies, at every retry (replication stuck for good), and cut off the listener asleep between
# NOTIFYs; a slave kept read-only for its applications would refuse every batch. Like autovacuum
# (for the timeouts), pyreplica's sessions run without them (docs/design.md §6). A caller's own settings
# (a command's lock_timeout) still win, and every bounded wait of pyreplica's sets its own.
SESSION_DEFAULTS = {"statement_timeout": "0", "lock_timeout": "0", "idle_in_transaction_session_timeout": "0",
                    "idle_session_timeout": "0", "default_transaction_read_only": "off"}
# The same guards that only newer servers know ({name: (server_version_num from which, value)}): a
# startup option naming a parameter fails the connection on a server that does not know it, so these
# are set once connected.
NEWER_SESSION_DEFAULTS = {"transaction_timeout": (170000, "0")}
SET_FOR_SESSION = "SELECT pg_catalog.set_config(%s, %s, false)"


def startup_options(dsn, settings=None):
    """The libpq `options` for dsn: the user's own (from the DSN, keyword or URI form, else
    PGOPTIONS, which libpq ignores once options are given) followed by ours, which win."""
    existing = psycopg2.extensions.parse_dsn(dsn).get("options", os.environ.get("PGOPTIONS", ""))
    ours = " ".join(f"-c {_escape_option(name)}={_escape_option(str(value))}"
                    for name, value in {**SESSION_DEFAULTS, **(settings or {}), **PINNED_SETTINGS}.items())
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
        # libpq's text may quote parts of the DSN; `from None`: a logged traceback must not show it raw
        raise ConnectionLost(f"cannot connect to the {side} ({safe_dsn(dsn)}): "
                             f"{safe_text(first_line(e), dsn)}", side) from None
    except psycopg2.ProgrammingError as e:  # malformed DSN
        raise ReplicaError(f"bad {side} connection string {safe_dsn(dsn)!r}: "
                           f"{safe_text(first_line(e), dsn)}", side) from None
    try:
        _set_newer_session_defaults(conn, settings or {})
    except psycopg2.Error as e:
        close_quietly(conn)
        raise ConnectionLost(f"lost the {side} ({safe_dsn(dsn)}) while setting up the session: "
                             f"{safe_text(first_line(e), dsn)}", side) from None
    return conn


def _set_newer_session_defaults(conn, settings):
    due = [(name, value) for name, (version, value) in NEWER_SESSION_DEFAULTS.items()
           if conn.server_version >= version and name not in settings]
    if due:
        with conn.cursor() as cur:
            for name, value in due:
                cur.execute(SET_FOR_SESSION, (name, value))
        conn.commit()


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


def abandon_and_close(*conns):
    """Roll back whatever each connection has open, then close it; never raises (cleanup paths)."""
    for conn in conns:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.rollback()
        close_quietly(conn)


def fetch_row(conn, query, params=None):
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchone()


def fetch_one(conn, query, params=None):
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
        return row[0] if row else None
