"""Start-up (docs/design.md §6): the daemon's connections, the checks, recovery, the position.

    listener  master, autocommit: LISTEN, registry calls, pruning
    reader    master, REPEATABLE READ: one batch's snapshot and events; then, in a transaction of its
              own, the master's record of the batch, prepared with the batch
    spare     master, as reader, opened at the first catch-up step: the two take turns, one reading
              the next step ahead while the other's step is applied and committed
    slave     slave: the replayed changes and the slave's position, prepared with the batch
"""
import psycopg2

from . import apply, master, twophase
from .db import ReplicaError, close_quietly, connect, fetch_one, fetch_row, refusal

# A slave's position ahead of every transaction the master ever started: another server (a dump
# restored elsewhere starts its transaction ids anew), whose events would all look applied.
MASTER_BEHIND = ("SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()) "
                 "OPERATOR(pg_catalog.<) pg_catalog.pg_snapshot_xmax(%s::pg_catalog.pg_snapshot)")
# Of the names a slave database holds positions for, those the master registers for that database.
REGISTERED_AS = """
SELECT name FROM pyreplica.replica_slaves
 WHERE name = ANY (%s::text[]) AND slave_system_id = %s AND slave_database = %s ORDER BY name
"""
# One daemon per slave: a second one would apply the same batches again.
SLAVE_LOCK = "SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtext('pyreplica slave ' || %s::text))"
SLAVE_IDENTITY = ("SELECT system_identifier::text, pg_catalog.current_database()::text "
                  "FROM pg_catalog.pg_control_system()")
SLAVE_COLUMNS = """
SELECT array_agg(a.attname::text) FROM pg_catalog.pg_attribute a
 WHERE a.attrelid = pg_catalog.to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
"""


class SlaveBusy(ReplicaError):
    """Another session holds the slave's lock: another daemon, or this daemon's own earlier
    connection that vanished (a partition), which the slave drops within about PEER_TIMEOUT."""


def keepalive_settings(peer_timeout):
    """libpq and server settings that notice a vanished peer within about peer_timeout seconds."""
    idle = max(1, int(peer_timeout / 3))
    interval = max(1, int(peer_timeout / 6))
    client = {"keepalives": 1, "keepalives_idle": idle, "keepalives_interval": interval,
              "keepalives_count": 3, "tcp_user_timeout": int(peer_timeout * 1000)}
    # the daemon's own backends drop a half-open client quickly, releasing its locks
    server = {"tcp_keepalives_idle": idle, "tcp_keepalives_interval": interval, "tcp_keepalives_count": 3,
              "tcp_user_timeout": int(peer_timeout * 1000),
              "client_connection_check_interval": int(peer_timeout * 1000 / 3)}
    return client, server


class Sides:
    """The connections of one replication (master -> slave), opened and checked in order."""

    def __init__(self, config, name, pipeline, log, may_register=True):
        self.config, self.name, self.pipeline, self.log = config, name, pipeline, log
        self.may_register = may_register    # recover: an unregistered name is a mistake, not a new slave
        self.listener = self.reader = self.slave = None
        self.spare = None           # a second reader, for a catch-up step read ahead (opened at first use)
        self.token = None
        self.identity = None        # (system identifier, database) of the slave
        self.position = None        # (snapshot, batch_id) committed on the slave
        self.cascading = False      # the slave is itself a master: wake its own daemons after a batch
        self.sequences = {}         # sequence -> value this daemon last brought the slave to
        self.new_slave_schema = False   # the slave had no pyreplica schema: it never replicated

    def other_reader(self, busy):
        """The reader connection `busy` is not: sides.reader, or the spare one (connected here the
        first time it is needed), for a catch-up step read ahead while another is applied."""
        if busy is not self.reader:
            return self.reader
        if self.spare is None:
            self.spare = self._open_reader()
        return self.spare

    def drop_spare(self):
        """Close the spare reader (it failed): the next catch-up step opens a new one."""
        close_quietly(self.spare)
        self.spare = None

    def _open_reader(self):
        # autocommit: a batch opens its transactions itself (twophase.BEGIN)
        reader = self._connect(self.config.DSN0, "master", master.SEARCH_PATH)
        try:
            reader.autocommit = True
            master.prepare_batch_start(reader)
        except BaseException:
            close_quietly(reader)
            raise
        return reader

    def _connect(self, dsn, side, search_path):
        client, server = keepalive_settings(self.config.PEER_TIMEOUT)
        return connect(dsn, side, settings=dict(server, search_path=search_path), **client)

    def open(self):
        """Connect, check, settle in-doubt batches, find the position. Raises ReplicaError."""
        self.log.info("Opening origin (master) connection")
        self.listener = self._connect(self.config.DSN0, "master", master.SEARCH_PATH)
        self.listener.autocommit = True
        master.require_installed(self.listener)
        twophase.require_two_phase_commit(self.listener, "master")
        self.reader = self._open_reader()

        self.log.info("Opening replica (slave) connection")
        self.slave = self._connect(self.config.DSN1, "slave", master.SEARCH_PATH)
        self.slave.autocommit = True
        twophase.require_two_phase_commit(self.slave, "slave")
        if not fetch_one(self.slave, SLAVE_LOCK, (self.name,)):
            raise SlaveBusy(f"another pyreplica is already replicating into this slave as {self.name}: "
                            f"stop it first (one daemon per slave)", "slave")
        self.new_slave_schema = apply.install(self.slave)
        self.cascading = bool(fetch_one(self.slave, master.INSTALLED))
        with self.slave.cursor() as cur:
            apply.start_session(cur)
        apply.prepare_batch_state(self.slave)
        self.log.info("Encoding for this connections are %s %s", self.listener.encoding, self.slave.encoding)
        identity = self.identity = tuple(fetch_row(self.slave, SLAVE_IDENTITY))
        self.token = twophase.identity_token(identity)

        with self.listener.cursor() as cur:
            cur.execute(f"LISTEN {master.CHANNEL}")
        record = self._claim(identity)
        position = apply.read_position(self.slave, self.name)
        twophase.recover(self.listener, self.slave, self.name, self.token,
                         position[1] if position else None, record[1] if record else None)
        self.position = self.find_position(identity)
        apply.record_tables(self.slave, self.name, self.pipeline.tables)
        self.check_slave_tables()
        return self

    def _claim(self, identity):
        try:
            return master.claim(self.listener, self.name, identity)
        except psycopg2.Error as e:
            if getattr(e, "pgcode", None) == "PR002":
                raise refusal(e, "master") from e
            raise

    def check_slave_tables(self):
        """Every captured table (that this slave takes) must exist on the slave with its columns,
        unless an administrator's statement still to be replayed may create them (py_log_sql)."""
        problems = []
        held = apply.held_tables(self.slave, self.name)     # add-table creates them
        with self.slave.cursor() as cur:
            for table in master.captured_tables(self.listener):
                if not self.pipeline.wants_table(table.qualified) or table.qualified in held:
                    continue
                cur.execute(SLAVE_COLUMNS, (table.qualified,))
                present = cur.fetchone()[0]
                if present is None:
                    problems.append(f"the slave has no table {table.qualified}, which the master replicates: create "
                                    f"it on the slave (pg_dump -s -t '{table.qualified}' master | psql slave) or use "
                                    f"pyreplica clone")
                    continue
                missing = [c for c in table.written_columns if c not in present]
                if missing:
                    problems.append(f"the slave's table {table.qualified} lacks column(s) {', '.join(missing)} that "
                                    f"the master has: ALTER TABLE it on the slave to match the master")
        if not problems:
            return
        pending = fetch_one(self.listener, master.PENDING_ADMIN_SQL, (self.position[0],))
        if not pending:
            raise ReplicaError(problems[0], "slave")
        for problem in problems:
            self.log.warning("%s, unless one of the %s administrator statement(s) still to be replayed does it "
                             "(replay stops at the first event that needs it otherwise)", problem, pending)

    def find_position(self, identity):
        """The slave's position, after making the master's record agree with it (docs/design.md §5)."""
        position = apply.read_position(self.slave, self.name)
        record = self._claim(identity)      # again: recovery may have moved it
        if position is None:
            if record is None or record[1] == 0:
                return self._first_position(record, identity)
            if record[1] > 1 or self.new_slave_schema:
                raise ReplicaError(
                    f"the master records slave {self.name} at batch {record[1]}, but this slave database has no "
                    f"position for it (recreated, or restored without its pyreplica schema?): its rows are not "
                    f"known to be the replicated ones. Rebuild it with pyreplica clone (pyreplica drop-slave "
                    f"{self.name} MASTER first)", "slave")
            # the slave never committed a batch, but the master records its first (settled by hand):
            # the slave's real position is its registration
            position = (record[2], 0)
        if record is None:
            raise ReplicaError(f"slave {self.name} has a position but is not registered on the master (dropped "
                               f"with drop-slave?): events it needs may be gone; rebuild it with pyreplica clone",
                               "master")
        (snapshot, batch_id), recorded = position, record[1]
        with self.listener.cursor() as cur:
            cur.execute(MASTER_BEHIND, (snapshot,))
            if cur.fetchone()[0]:
                raise ReplicaError(
                    f"the master's transaction ids are behind slave {self.name}'s position: it is not the server "
                    f"this slave replicated from (restored from a dump, or another cluster?), and its new "
                    f"transactions would be taken for applied ones. Rebuild the slave with pyreplica clone "
                    f"(pyreplica drop-slave {self.name} MASTER first)", "master")
            if recorded != batch_id:
                # Both ways through rewind_slave, which first checks that the log still holds every
                # event the slave needs: the record may be a registration newer than the slave
                # (drop-slave, a prune, register again), not only one left behind by hand.
                self.log.warning("The master's record of slave %s is at batch %s, the slave at %s: "
                                 "recording the slave's position", self.name, recorded, batch_id)
                try:
                    master.rewind(cur, self.name, snapshot, batch_id)
                except psycopg2.Error as e:
                    if getattr(e, "pgcode", None) != "PR003":
                        raise
                    raise ReplicaError(f"slave {self.name} is at batch {batch_id} but the master has it at batch "
                                       f"{recorded} and has pruned events it needs (was the slave restored from "
                                       f"an older backup, or dropped with drop-slave and registered again?): "
                                       f"rebuild it with pyreplica clone", "slave") from e
        return snapshot, batch_id

    def _first_position(self, record, identity):
        if record is not None:
            self.log.info("Slave %s starts at its registration on the master", self.name)
            return record[0], record[1]
        known = self._known_as(identity)
        if known:
            raise ReplicaError(f"slave {self.name} is not registered on the master, but this slave database already "
                               f"replicates from it as {', '.join(known)}: give that name (--name {known[0]}, or "
                               f"the config's SLAVE_FIELD/NAME)", "slave")
        if not self.may_register:
            others = sorted({x["slave"] for x in twophase.in_doubt(self.listener, "master") if x["slave"]})
            raise ReplicaError(f"slave {self.name} is not registered on the master: it has nothing to settle"
                               + (f"; batches in doubt on the master are slave(s) {', '.join(others)}'s: pyreplica "
                                  f"recover MASTER SLAVE --name {others[0]}" if others else ""), "master")
        start = master.log_start(self.listener)
        if start is None:
            raise ReplicaError(f"slave {self.name} is not registered on the master and the master's log has been "
                               f"pruned since it was installed, so events this slave needs may be gone: register "
                               f"it before copying the data (pyreplica register {self.name} MASTER) or use "
                               f"pyreplica clone", "master")
        snapshot = master.register(self.listener, self.name, start, identity)
        self.log.info("New slave %s registered on the master, starting at the oldest logged event", self.name)
        return snapshot, 0

    def _known_as(self, identity):
        """The names this slave database holds positions for that the master registers for it."""
        with self.slave.cursor() as cur:
            cur.execute("SELECT array_agg(slave ORDER BY slave) FROM pyreplica.position")
            names = cur.fetchone()[0] or []
        with self.listener.cursor() as cur:
            cur.execute(REGISTERED_AS, (names, *identity))
            return [row[0] for row in cur.fetchall()]

    def close(self):
        for conn in (self.reader, self.spare, self.slave, self.listener):
            close_quietly(conn)
        self.listener = self.reader = self.spare = self.slave = None
