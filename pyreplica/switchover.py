"""`pyreplica switchover MASTER SLAVE` (docs/design.md §8): a planned role swap, no transaction lost.

    check    both servers, superuser on both, the slave registered and holding every captured table,
             nothing in doubt: refused before anything changes
    fence    pyreplica.fence(true) on the master: once it committed, no write to a captured table
             commits there any more (it waited for the writers in flight)
    wait     until the slave's position (its daemon keeps running) covers F, the first master
             snapshot after the fence (pyreplica.fence_point, recorded once)
    seqs     the slave's sequences up to at least the master's
    reverse  master side on the slave; in ONE slave transaction: capture of the same tables, the
             slave unfenced (a node switched over before), the old master registered at that
             transaction's snapshot; slave side and position on the old master
    drop     the slave's old registration on the master (its old daemon stops: "not registered")

Every step is a no-op when already done, so a switchover interrupted anywhere is finished by
running it again; once done, running it again says so.
"""
import contextlib
import time

import psycopg2
import psycopg2.errors

from . import MASTER_INSTALL_SQL, apply, faults, master, sequences
from .apply import ApplyError
from .db import ConnectionLost, ReplicaError, connect, fetch_one, first_line, refusal, safe_dsn
from .sides import SLAVE_IDENTITY

IS_SUPERUSER = "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user"
HAS_FENCE = "SELECT pg_catalog.to_regprocedure('pyreplica.fence(boolean)') IS NOT NULL"
HAS_POSITION = "SELECT pg_catalog.to_regclass('pyreplica.position') IS NOT NULL"
TABLE_EXISTS = "SELECT pg_catalog.to_regclass(%s) IS NOT NULL"
# A batch stays prepared for milliseconds; one older than this is in doubt (a daemon died mid-batch).
IN_DOUBT_AFTER = "5 seconds"
IN_DOUBT = """
SELECT gid FROM pg_catalog.pg_prepared_xacts
 WHERE database = pg_catalog.current_database() AND gid LIKE 'pyreplica:%%'
   AND prepared < pg_catalog.now() - %s::interval
 ORDER BY prepared
"""
# (The next three run without parameters: their % are not doubled.)
# What would make master-install.sql refuse the slave (it checks the same, and more, itself).
PLPYTHON_AVAILABLE = "SELECT EXISTS (SELECT FROM pg_catalog.pg_available_extensions WHERE name = 'plpython3u')"
NOT_SUPERUSER_OWNED = """
SELECT pg_catalog.format('schema pyreplica (owner %s)', n.nspowner::regrole)
  FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner
 WHERE n.nspname = 'pyreplica' AND NOT r.rolsuper
UNION ALL
SELECT pg_catalog.format('%s (owner %s)', c.oid::regclass, c.relowner::regrole)
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_roles r ON r.oid = c.relowner
 WHERE n.nspname = 'pyreplica' AND NOT r.rolsuper
UNION ALL
SELECT pg_catalog.format('function %s (owner %s)', p.oid::regprocedure, p.proowner::regrole)
  FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
  JOIN pg_catalog.pg_roles r ON r.oid = p.proowner
 WHERE n.nspname = 'pyreplica' AND NOT r.rolsuper
"""
REGISTRATION = """
SELECT confirmed::text, batch_id, slave_system_id, slave_database
  FROM pyreplica.replica_slaves WHERE name = %s
"""
FENCE = "SELECT pyreplica.fence(%s::boolean)"
SET_LOCK_TIMEOUT = "SELECT pg_catalog.set_config('lock_timeout', %s, true)"
FENCE_POINT = "SELECT pyreplica.fence_point()::text"
IS_FENCED = "SELECT pyreplica.py_log_is_fenced()"
NUDGE = "SELECT pg_catalog.pg_notify(%s, '')"       # wakes the slave's sleeping daemon
CREATE_TG = "SELECT pyreplica.py_log_create_tg(%s)"
REQUESTED_SEQUENCES = """
SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
  FROM pyreplica.replica_sequences r
  JOIN pg_catalog.pg_class c ON c.oid = r.seq
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE r.rel = 0
"""
CREATE_SEQ = "SELECT pyreplica.py_log_create_seq(%s)"
WRITE_POSITION = """
INSERT INTO pyreplica.position AS p (slave, snapshot, batch_id, applied, updated_at)
VALUES (%s, %s::pg_snapshot, 0, 0, now())
ON CONFLICT (slave) DO UPDATE SET snapshot = EXCLUDED.snapshot, batch_id = 0, applied = 0, updated_at = now()
"""

FENCE_ATTEMPTS = 5          # a writer holding one captured table and wanting another may deadlock the fence
NUDGE_EVERY = 2.0           # seconds: a NOTIFY the daemon consumed mid-batch must not leave it asleep
PROGRESS_EVERY = 5.0
DROP_LOCK_WAIT = "5s"


def switchover(config, name, new_name, wait):
    with two_sides(config) as (old, new):
        with failing_as("nothing was changed"):
            done = check(old, new, name, new_name)
        if done:
            print(f"switchover already done: slave {new_name} (the old master) is registered on the new master "
                  f"and {name} no longer on the old one")
            print_next_steps(config, name, new_name)
            return 0
        with failing_as("fencing the master failed, nothing was changed; run switchover again"):
            fence(old, wait)
        faults.point("switchover_after_fence")
        with failing_as(f"the master stays fenced (read-only): run switchover again, or undo the fence: "
                        f"psql {old.info.dbname} -c 'SELECT pyreplica.fence(false)'"):
            point = fetch_one(old, FENCE_POINT)
            print(f"master fenced: its captured tables are read-only; waiting for slave {name} to apply every "
                  f"transaction up to {point}", flush=True)
            wait_until_applied(old, new, name, point, wait)
            moved = raise_sequences(old, new)
        print(f"slave {name} has every transaction of the master; {len(moved)} sequence(s) moved up to the "
              f"master's", flush=True)
        # from here on the slave may be set up as the master already: the fence must stay
        with failing_as("the master stays fenced and the direction may be half reversed: run switchover again "
                        "to finish it (do not undo the fence)"):
            reverse(old, new, new_name)
            drop_old_registration(old, name, wait)
    print(f"switchover done: the slave is the master now, the old master its slave {new_name} (fenced: its own "
          f"writes fail)")
    print_next_steps(config, name, new_name)
    return 0


@contextlib.contextmanager
def failing_as(state):
    """A server's error (or a lost connection) during a step becomes one line that says what state
    things are in and what to run."""
    try:
        yield
    except (psycopg2.Error, ApplyError) as e:
        raise ReplicaError(f"{first_line(e) if isinstance(e, psycopg2.Error) else e}: {state}") from None
    except ConnectionLost as e:
        raise ReplicaError(f"{e}: {state}") from None


@contextlib.contextmanager
def two_sides(config):
    """Autocommit connections to the master and the slave, every name qualified (pinned path)."""
    with contextlib.closing(connect(config.DSN0, "master", settings={"search_path": master.SEARCH_PATH})) as old:
        old.autocommit = True
        with contextlib.closing(connect(config.DSN1, "slave", settings={"search_path": master.SEARCH_PATH})) as new:
            new.autocommit = True
            yield old, new


# -- check ------------------------------------------------------------------------------------------
def check(old, new, name, new_name):
    """Refuse, changing nothing, what switchover cannot finish. True when it is done already."""
    check_superusers(old, new)
    master.require_installed(old)
    if not fetch_one(old, HAS_FENCE):
        raise ReplicaError(f"the master's pyreplica install predates switchover: run `psql {old.info.dbname} -f "
                           f"master-install.sql` on it as a superuser, then run switchover again", "master")
    if check_registrations(old, new, name, new_name):
        return True
    if not fetch_one(new, HAS_POSITION):
        raise ReplicaError(f"the slave has no pyreplica position: its daemon never ran; start `pyreplica run` for "
                           f"slave {name} first", "slave")
    check_nothing_in_doubt(old, new, name)
    if not fetch_one(new, HAS_FENCE):
        check_master_install(new)
    missing = [t.qualified for t in captured_roots(old) if not fetch_one(new, TABLE_EXISTS, (t.qualified,))]
    if missing:
        raise ReplicaError(f"the slave lacks {', '.join(missing[:5])}, which the master captures: switchover needs "
                           f"every captured table on the slave (create it there, or stop capturing it)", "slave")
    return False


def check_superusers(old, new):
    for conn, side in ((old, "master"), (new, "slave")):
        if not fetch_one(conn, IS_SUPERUSER):
            raise ReplicaError(f"switchover needs a superuser on both servers (it fences the master and installs "
                               f"the master side on the slave): role {conn.info.user} on the {side} is not one; "
                               f"connect as postgres", side)


def check_registrations(old, new, name, new_name):
    """`name` registered on the master for this slave, `new_name` free on the slave (or this old
    master's). True when the switchover is done: `name` gone, `new_name` registered."""
    new_registration = registration(new, new_name) if fetch_one(new, HAS_FENCE) else None
    if new_registration and tuple(new_registration[2:]) not in ((None, None), identity(old)):
        raise ReplicaError(f"slave name {new_name} is already registered on the slave for another database "
                           f"({new_registration[3]} of server {new_registration[2]}): give the old master another "
                           f"name with --new-name", "slave")
    old_registration = registration(old, name)
    if old_registration is None:
        if new_registration is not None:
            return True
        raise ReplicaError(f"no slave named {name} is registered on the master: give the slave's name with --name "
                           f"(pyreplica status MASTER lists them)", "master")
    if tuple(old_registration[2:]) not in ((None, None), identity(new)):
        raise ReplicaError(f"slave {name} on the master is database {old_registration[3]} of server "
                           f"{old_registration[2]}, not this SLAVE: check the connection string or --name", "slave")
    return False


def check_nothing_in_doubt(old, new, name):
    """A running daemon's batch is prepared for milliseconds; one prepared for longer is in doubt."""
    for conn, side in ((old, "master"), (new, "slave")):
        in_doubt = [row[0] for row in rows(conn, IN_DOUBT, (IN_DOUBT_AFTER,))]
        if in_doubt:
            raise ReplicaError(f"pyreplica transaction {in_doubt[0]} is prepared (in doubt) on the {side}: settle "
                               f"it first (pyreplica recover MASTER SLAVE --name {name}), then run switchover "
                               f"again", side)


def check_master_install(new):
    """What master-install.sql would refuse on the slave, said before the master is fenced."""
    if not fetch_one(new, PLPYTHON_AVAILABLE):
        raise ReplicaError("the slave's server has no PL/Python (plpython3u), which the master side needs: install "
                           "postgresql-plpython3-NN there, then run switchover again", "slave")
    foreign = [row[0] for row in rows(new, NOT_SUPERUSER_OWNED)]
    if foreign:
        raise ReplicaError(f"master-install.sql would refuse the slave: {', '.join(foreign)} belong(s) to a role "
                           f"that is not a superuser (a least-privilege slave); hand them to a superuser first "
                           f"(ALTER ... OWNER TO postgres, then GRANT the daemon's role what it needs: README "
                           f"\"Switchover\"), then run switchover again", "slave")


def identity(conn):
    return tuple(rows(conn, SLAVE_IDENTITY)[0])


def registration(conn, name):
    """(confirmed snapshot, batch, system id, database) of slave `name` in conn's registry, or None."""
    found = rows(conn, REGISTRATION, (name,))
    return found[0] if found else None


def captured_roots(conn):
    """The captured tables, partitions left out (capturing the root captures them)."""
    return [t for t in master.captured_tables(conn) if not t.is_partition]


@contextlib.contextmanager
def transaction(conn):
    """One transaction on an autocommit connection: committed, or rolled back on any error."""
    conn.autocommit = False
    try:
        with conn, conn.cursor() as cur:
            yield cur
    finally:
        conn.autocommit = True


def rows(conn, query, params=None):
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall()


# -- fence, wait, sequences ---------------------------------------------------------------------------
def fence(old, wait):
    """Fence the master, waiting at most `wait` seconds for the writers in flight."""
    for attempt in range(FENCE_ATTEMPTS):
        try:
            with transaction(old) as cur:
                cur.execute(SET_LOCK_TIMEOUT, (f"{int(wait * 1000)}ms",))
                cur.execute(FENCE, (True,))
            return
        except psycopg2.errors.DeadlockDetected:
            continue        # a writer held one captured table and wanted another we had locked: again
        except psycopg2.errors.LockNotAvailable:
            raise ReplicaError(f"fencing the master waited {wait:g} s for a transaction writing a captured table: "
                               f"end it (pg_stat_activity shows it) and run switchover again; nothing was changed",
                               "master") from None
    raise ReplicaError("fencing the master deadlocked with writers every time: run switchover again; nothing was "
                       "changed", "master")


def wait_until_applied(old, new, name, point, wait):
    """Until slave `name`'s position covers `point`, nudging its daemon; raises after `wait` seconds."""
    started = time.monotonic()
    last_nudge = last_progress = -NUDGE_EVERY
    while True:
        position = apply.read_position(new, name)
        if position and fetch_one(old, master.COVERS, (position[0], point)):
            return
        elapsed = time.monotonic() - started
        if elapsed >= wait:
            raise ReplicaError(
                f"slave {name} has not applied the master's last transactions within {wait:g} s (is its daemon "
                f"running? pyreplica status MASTER): the master stays fenced, its captured tables read-only. Start "
                f"the slave's daemon and run switchover again, or undo the fence: "
                f"psql {old.info.dbname} -c 'SELECT pyreplica.fence(false)'", "slave")
        if elapsed - last_nudge >= NUDGE_EVERY:
            last_nudge = elapsed
            fetch_one(old, NUDGE, (master.CHANNEL,))
        if elapsed - last_progress >= PROGRESS_EVERY and elapsed > 0:
            last_progress = elapsed
            behind = fetch_one(old, master.BEHIND, {"since": position[0]}) if position else "?"
            print(f"waiting for slave {name}: {behind} event(s) to apply ({elapsed:.0f} s of {wait:g})", flush=True)
        time.sleep(0.2)


def raise_sequences(old, new):
    """Every followed sequence on the slave at least at the master's value (never moved back)."""
    with old.cursor() as cur:
        values = master.sequence_values(cur)
    with new.cursor() as cur:
        return sequences.catch_up(cur, values, {})


# -- reverse ------------------------------------------------------------------------------------------
def reverse(old, new, new_name):
    """The slave becomes the master of the old master (each part skipped when done already)."""
    install_master_side(new)
    if registration(new, new_name) is None:
        capture_and_register(old, new, new_name)
        faults.point("switchover_after_register")
        print(f"the slave captures the master's tables and has the old master registered as slave {new_name}")
    apply.install(old, check_owners=False)
    snapshot, batch_id = registration(new, new_name)[:2]
    if batch_id == 0:       # its daemon never confirmed a batch: the position is still ours to write
        with old.cursor() as cur:
            cur.execute(WRITE_POSITION, (new_name, snapshot))
    faults.point("switchover_after_position")


def install_master_side(new):
    """master-install.sql on the slave (one transaction; it refuses while a batch is prepared there,
    which the slave's old daemon does for milliseconds at a time: tried again)."""
    if fetch_one(new, HAS_FENCE):
        return
    with open(MASTER_INSTALL_SQL) as f:
        script = "\n".join(line for line in f.read().splitlines() if not line.startswith("\\"))
    for attempt in range(3):
        try:
            with new.cursor() as cur:
                cur.execute(script)
            return
        except psycopg2.Error as e:
            with new.cursor() as cur:       # the script's own transaction, aborted
                cur.execute("ROLLBACK")
            if "is prepared (in doubt)" not in str(e) or attempt == 2:
                raise ReplicaError(f"installing the master side on the slave failed (nothing was kept): "
                                   f"{refusal(e, 'slave')}", "slave") from None
            time.sleep(1)


def capture_and_register(old, new, new_name):
    """One slave transaction: capture every table the master captures (the follow-on sequences too),
    unfence the slave, register the old master at this transaction's snapshot. Writers on the slave
    wait for the capture triggers' locks, so every write the registration's snapshot does not
    contain is captured: nothing falls between."""
    tables = [t.qualified for t in captured_roots(old)]
    requested = [row[0] for row in rows(old, REQUESTED_SEQUENCES)]
    old_identity = identity(old)
    with transaction(new) as cur:
        for table in tables:
            cur.execute(CREATE_TG, (table,))
            lines = [row[0] for row in cur.fetchall()]
            if not any(line.startswith("created trigger") for line in lines):
                raise ReplicaError(f"capturing {table} on the slave failed: {'; '.join(lines)}; nothing was "
                                   f"changed there (the master stays fenced)", "slave")
        for seq in requested:
            cur.execute(CREATE_SEQ, (seq,))
        if fetch_one(new, IS_FENCED):
            cur.execute(FENCE, (False,))
        master.register(new, new_name, None, old_identity)


def drop_old_registration(old, name, wait):
    """Forget the slave on the old master: its old daemon stops at its next batch ("not registered").
    A batch of it prepared for a moment holds the row: tried again until `wait`."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with transaction(old) as cur:
                cur.execute(SET_LOCK_TIMEOUT, (DROP_LOCK_WAIT,))
                master.drop_slave(old, name)
            return
        except psycopg2.errors.LockNotAvailable:
            if time.monotonic() >= deadline:
                raise ReplicaError(f"slave {name}'s registration on the old master is locked by a batch prepared "
                                   f"(in doubt) there: settle it (pyreplica recover MASTER SLAVE --name {name}) and "
                                   f"run switchover again", "master") from None


def print_next_steps(config, name, new_name):
    print("Next:")
    print(f"  1. stop the old daemon (pyreplica run ... --name {name}, or its service config); if it still runs it "
          f"stops by itself at its next batch: slave \"{name}\" is not registered")
    print("  2. point the applications at the new master")
    print(f"  3. start the new daemon: pyreplica run '{safe_dsn(config.DSN1)}' '{safe_dsn(config.DSN0)}' "
          f"--name {new_name}   (or a config file with DSN0 and DSN1 swapped)")
