"""Configuration: every key declared once, with its type, default and one line of help.

Parsing, the error for a bad key, and sample.conf's comments all come from KEYS.
A config file is INI with sections [MAIN] and [SMTP] (the original PyReplica's keys keep their
names); DSN0/DSN1 may also come from the environment, as in the original console run.
"""
import configparser
import glob
import os
import re
import stat
from dataclasses import dataclass, field

import psycopg2.extensions

from .db import dsn_secrets

# Exit codes of every pyreplica command, the service and its workers (systemd's unit and the init
# script map them: 2 is a bad config that retrying cannot fix).
EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


class ConfigError(Exception):
    """A config that cannot be used. The message names the file, the key and what is allowed."""


def _bool(text):
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _keepalive(text):
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return 60
    if low in ("false", "no", "off", "0"):
        return 0
    if not low.isdigit():
        raise ValueError("expected a number of seconds >= 0, or true (= 60)")
    return int(low)


def _debug_level(text):
    if text.strip() not in ("0", "1", "2", "3"):
        raise ValueError("expected 0, 1, 2 or 3")
    return int(text)


def _positive(text):
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds > 0") from None
    if value <= 0:
        raise ValueError("expected a number of seconds > 0")
    return value


def _whole(minimum):
    """A whole number >= minimum; the error says what is allowed."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected a whole number >= {minimum}") from None
        if value < minimum:
            raise ValueError(f"expected a whole number >= {minimum}")
        return value
    parse.__name__ = f"whole number >= {minimum}"
    return parse


def _list(separator):
    def parse(text):
        return [item.strip() for item in text.split(separator) if item.strip()]
    parse.__name__ = f"list separated by {separator!r}"
    return parse


SLAVE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")


def _slave_name(text):
    if text and not SLAVE_NAME_RE.match(text):
        raise ValueError("expected 1-63 letters, digits, '_', '.' or '-'")
    return text


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    parse: object
    default: object
    help: str
    example: str = ""       # shown in sample.conf when the default is empty


KEYS = [
    Key("MAIN", "NAME", str, "", "Replica set name: the first field of each log line (default: the slave's name)", "somedb"),
    Key("MAIN", "DSN0", str, "", "Master (origin) connection string; the environment's DSN0 if unset",
        "dbname=somedb host=master.example.com user=pyreplica"),
    Key("MAIN", "DSN1", str, "", "Slave (replica) connection string; the environment's DSN1 if unset",
        "dbname=somedb host=localhost user=pyreplica"),
    Key("MAIN", "SLAVE_FIELD", _slave_name, "", "This slave's name on the master (default: NAME, else the slave's database name)"),
    Key("MAIN", "SKIP_USER", str, "", "Events written by this PostgreSQL user are not replayed (multi-master: the replication user)"),
    Key("MAIN", "KEEPALIVE", _keepalive, 60, "Seconds without NOTIFY after which the log is checked anyway (true = 60, 0 = never)"),
    Key("MAIN", "DEBUG_LEVEL", _debug_level, 1, "0 warnings and errors, 1 connections and batches, 2 every statement, 3 tracebacks too"),
    Key("MAIN", "LOGFILE", str, "/var/log/pyreplica.log",
        "Log file of this worker under the service (`pyreplica run` logs to the terminal / journal)"),
    Key("MAIN", "PIDFILE", str, "", "Pid file of this worker under the service, removed when it stops; empty = none", "/run/pyreplica/somedb.pid"),
    Key("MAIN", "FILTERS", _list(","), [], "Python callables module:function, comma-separated, that may drop or rewrite each event"),
    Key("MAIN", "TABLES", _list(","), [], "Replicate only these tables (schema.table, * and ? patterns); empty = all"),
    Key("MAIN", "BATCH_EVENTS", _whole(1), 5000, "Events sent to the slave per round trip"),
    Key("MAIN", "BATCH_BYTES", _whole(1), 8 << 20, "Bytes of SQL sent to the slave per round trip (at most)"),
    Key("MAIN", "CATCHUP_EVENTS", _whole(1), 50000,
        "A backlog larger than this is applied in committed steps of about this many events (ending at master ticks)"),
    Key("MAIN", "PEER_TIMEOUT", _positive, 30.0,
        "Seconds after which a server that stopped answering (network cut, half-open connection) is given up and retried"),
    Key("MAIN", "RETRY_MAX", _positive, 60.0, "Longest wait in seconds between retries after an error or a lost connection"),
    Key("SMTP", "SERVER", str, "", "SMTP server host[:port] for notifications; empty = no mail", "localhost:25"),
    Key("SMTP", "USERNAME", str, "", "SMTP login (optional; STARTTLS is used when the server offers it)"),
    Key("SMTP", "PASSWORD", str, "", "SMTP password (the file must then not be world-readable: chmod 640)"),
    Key("SMTP", "TLS_VERIFY", _bool, True, "Check the SMTP server's certificate and host name on STARTTLS "
        "(false = accept any certificate: a man in the middle gets the mails and the password)"),
    Key("SMTP", "CA_FILE", str, "", "CA certificate(s) (PEM) that sign the SMTP server's certificate; "
        "empty = the system's CA store", "/etc/pyreplica/smtp-ca.pem"),
    Key("SMTP", "FROM_ADDR", str, "pyreplica@localhost", "Sender address"),
    Key("SMTP", "TO_ADDRS", _list(";"), [], "Recipients, ';'-separated", "dba@example.com;ops@example.com"),
    Key("SMTP", "START_SUBJECT", str, "pyreplica %(name)s started", "Subject of the start mail (%(name)s is NAME)"),
    Key("SMTP", "STOP_SUBJECT", str, "pyreplica %(name)s stopped", "Subject of the stop mail"),
    Key("SMTP", "ERROR_SUBJECT", str, "pyreplica %(name)s ERROR", "Subject of the error mail (one per outage)"),
    Key("SMTP", "WARNING_SUBJECT", str, "pyreplica %(name)s conflict", "Subject of the conflict-warning mail"),
]
KEYS_BY_NAME = {(k.section, k.name): k for k in KEYS}


@dataclass
class Config:
    """The settings of one replication worker (one slave)."""
    source: str = "<command line>"
    values: dict = field(default_factory=dict)

    def __getattr__(self, name):
        for section in ("MAIN", "SMTP"):
            if (section, name.upper()) in KEYS_BY_NAME:
                return self.values[(section, name.upper())]
        raise AttributeError(name)

    def get(self, section, name):
        return self.values[(section, name)]


def defaults():
    return {(k.section, k.name): k.default for k in KEYS}


def load(path, environ=os.environ):
    """Read a config file; raise ConfigError naming file, key and what is allowed."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str.upper      # key names are case-insensitive, as in the original
    try:
        with open(path) as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except configparser.Error as e:
        raise ConfigError(f"{path}: not a valid config file: {_one_line(e)}") from None
    values = defaults()
    for section in parser.sections():
        if section not in ("MAIN", "SMTP"):
            raise ConfigError(f"{path}: unknown section [{section}] (allowed: [MAIN], [SMTP])")
        for name, raw in parser.items(section):
            key = KEYS_BY_NAME.get((section, name))
            if key is None:
                allowed = ", ".join(k.name for k in KEYS if k.section == section)
                raise ConfigError(f"{path}: unknown key {name} in [{section}] (allowed: {allowed})")
            values[(section, name)] = _parse(path, key, raw)
    check_mode(path, mode, holds_password(values))
    return finish(Config(path, values), environ)


def holds_password(values):
    return bool(values[("SMTP", "PASSWORD")] or any(dsn_secrets(values[("MAIN", k)]) for k in ("DSN0", "DSN1")))


def check_mode(path, mode, with_password):
    """Refuse a conf that others may change (it says where pyreplica connects and which filters it loads),
    or read while it holds a password. Group-readable stays allowed: the service's workers read root's
    confs as group pyreplica."""
    writable = stat.S_IWGRP | stat.S_IWOTH
    if mode & writable:
        problem = "writable by users other than its owner"
    elif with_password and mode & stat.S_IROTH:
        problem = "readable by every user and holds a password"
    else:
        return
    fixed = mode & ~writable & ~(stat.S_IROTH if with_password else 0)
    raise ConfigError(f"{path}: refused: the file is {problem} (mode {mode:04o}): chmod {fixed:03o} {path}")


def _one_line(error):
    return " ".join(str(error).split())


def _parse(path, key, raw):
    try:
        return key.parse(raw)
    except ValueError as e:
        raise ConfigError(f"{path}: bad value {raw!r} for {key.name} in [{key.section}]: {e}") from None


def from_args(master_dsn, slave_dsn, environ=os.environ, **overrides):
    """A config for the console run: DSNs from the arguments (or environment), defaults elsewhere."""
    values = defaults()
    values[("MAIN", "DSN0")] = master_dsn or ""
    values[("MAIN", "DSN1")] = slave_dsn or ""
    for name, value in overrides.items():
        if value is not None:
            values[("MAIN", name.upper())] = value
    return finish(Config("<command line>", values), environ)


def finish(config, environ):
    for key in ("DSN0", "DSN1"):
        if not config.values[("MAIN", key)]:
            config.values[("MAIN", key)] = environ.get(key, "")
    for key, side in (("DSN0", "master"), ("DSN1", "slave")):
        if not config.values[("MAIN", key)]:
            raise ConfigError(f"{config.source}: missing {key} (the {side}'s connection string) in [MAIN] "
                              f"and in the environment")
    return config


def slave_name(config, override=None):
    """This slave's name on the master: `override` (--name), else SLAVE_FIELD, NAME, the slave's dbname."""
    name = override or config.SLAVE_FIELD or config.NAME
    if not name:
        try:
            name = psycopg2.extensions.parse_dsn(config.DSN1).get("dbname")
        except psycopg2.ProgrammingError:
            name = None
    if not name:
        raise ConfigError(f"{config.source}: cannot tell this slave's name: give --name or SLAVE_FIELD")
    if not SLAVE_NAME_RE.match(name):
        raise ConfigError(f"slave name {name!r} is not allowed: use 1-63 letters, digits, '_', '.' or '-' (--name)")
    return name


def conf_paths(conf_dir):
    """The service's confs: one worker per CONF_DIR/*.conf, in a stable order."""
    return sorted(glob.glob(os.path.join(glob.escape(conf_dir), "*.conf")))


def load_worker(path):
    """(config, slave name) of a service worker, exactly as `pyreplica run -c PATH` would get them."""
    config = load(path)
    return config, slave_name(config)


def sample_conf():
    """The text of sample.conf: every key, its default and one line of meaning."""
    lines = ["# pyreplica: one file per slave, e.g. /etc/pyreplica/somedb.conf (generated from pyreplica/config.py)",
             "# Every key with its default; uncomment and edit what you need. Key names are case-insensitive.",
             "# DSN0 and DSN1 are required (here, or DSN0/DSN1 in the environment).", ""]
    for section in ("MAIN", "SMTP"):
        lines.append(f"[{section}]")
        for key in (k for k in KEYS if k.section == section):
            lines.extend(_sample_lines(key))
        lines.append("")
    return "\n".join(lines)


def _sample_lines(key):
    default = key.default
    if isinstance(default, list):
        default = (";" if key.name == "TO_ADDRS" else ",").join(default)
    if key.name in ("DSN0", "DSN1", "NAME"):
        return [f"# {key.help}", f"{key.name} = {key.example}"]
    if isinstance(default, bool):
        default = str(default).lower()
    if key.example and default in ("", None):
        # commented out: the example is not the default (which is empty)
        return [f"# {key.help} (default: empty)", f"#{key.name} = {key.example}"]
    return [f"# {key.help}", f"#{key.name} = {default}".rstrip()]
