"""`pyreplica service`: the replication service as a Unix daemon (docs/design.md §7), on python-daemon.

Start-up order matters and is chosen so that every mistake is reported to the terminal (or the
init script) with exit code 1 or 2 before anything detaches:
  1. as root: find the service user, create the log file(s) and the pid directory for it;
  2. drop to that user (so every later check sees what the daemon will really be allowed to do);
  3. check the interpreter, the conf directory, every conf, the log file and the pid file;
  4. fork; the child detaches through python-daemon's DaemonContext, takes the pid file, starts the
     workers (pyreplica.service) and says "ready" through a pipe; the parent waits for that word,
     so `pyreplica service` exits 0 only once the service really runs.
"""
import logging.handlers
import os
import pwd
import select
import signal
import stat
import sys

from . import config as configuration, log
from .config import EXIT_CONFIG, EXIT_FAIL, EXIT_OK

DEFAULT_CONF_DIR = "/etc/pyreplica"
DEFAULT_PIDFILE = "/run/pyreplica/pyreplica.pid"
DEFAULT_LOGFILE = "/var/log/pyreplica.log"
DEFAULT_USER = "pyreplica"
READY_TIMEOUT = 30.0


class ServiceError(Exception):
    """The service cannot start; the message says what to do. exit_code 1, or 2 for a bad config."""

    def __init__(self, message, exit_code=EXIT_FAIL):
        super().__init__(message)
        self.exit_code = exit_code


def add_arguments(parser):
    env = os.environ.get
    parser.add_argument("--conf-dir", default=env("PYREPLICA_CONF_DIR", DEFAULT_CONF_DIR),
                        help=f"one worker per DIR/*.conf (default {DEFAULT_CONF_DIR})")
    parser.add_argument("--pidfile", default=env("PYREPLICA_PIDFILE", DEFAULT_PIDFILE),
                        help=f"the service's pid file (default {DEFAULT_PIDFILE})")
    parser.add_argument("--logfile", default=env("PYREPLICA_LOGFILE", DEFAULT_LOGFILE),
                        help=f"the service's own log (default {DEFAULT_LOGFILE}); workers log to their LOGFILE")
    parser.add_argument("--user", default=env("PYREPLICA_USER", DEFAULT_USER),
                        help=f"OS user to run as when started as root (default {DEFAULT_USER})")
    parser.add_argument("--foreground", action="store_true", help="do not detach (debugging)")


# -- the pid file ----------------------------------------------------------------------------------
def service_process(pid, pidfile):
    """True when `pid` is a live `pyreplica service` using `pidfile`: a recycled pid, or a pid written by
    whoever can write the pid file's directory, names another process and is left alone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError:
        return False        # gone meanwhile, or no /proc: never take another process for ours
    if "service" not in argv:
        return False
    named = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--pidfile"]
    named += [a[len("--pidfile="):] for a in argv if a.startswith("--pidfile=")]
    if named:
        return os.path.abspath(named[-1]) == os.path.abspath(pidfile)
    return any("pyreplica" in a for a in argv)   # started with the default / environment's pid file


class PidFile:
    """The service's pid file. A file whose pid is not running (stale) is replaced."""

    def __init__(self, path):
        self.path = path

    def running_pid(self):
        try:
            with open(self.path) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid != os.getpid() and service_process(pid, self.path) else None

    def check(self):
        pid = self.running_pid()
        if pid is not None:
            raise ServiceError(f"already running (pid {pid}, pid file {self.path})")

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.fchmod(fd, 0o644)      # readable by monitoring whatever the umask
            except FileExistsError:
                self.check()
                os.unlink(self.path)      # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return self
        raise ServiceError(f"cannot create pid file {self.path}: another start is racing with this one")

    def __exit__(self, *exc):
        try:
            with open(self.path) as f:
                mine = f.read().split()[:1] == [str(os.getpid())]
            if mine:
                os.unlink(self.path)
        except OSError:
            pass


# -- user and files --------------------------------------------------------------------------------
def service_user(name):
    """The passwd entry to drop to, or None when not root (then we run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ServiceError(f"the OS user {name!r} does not exist: create it with "
                           f"`useradd --system --no-create-home {name}` (or choose one with --user)") from None


def worker_logfiles(conf_dir):
    """LOGFILE of every readable conf (bad confs are reported later, as the service user)."""
    found = set()
    for path in configuration.conf_paths(conf_dir):
        try:
            found.add(configuration.load(path, environ={"DSN0": "-", "DSN1": "-"}).LOGFILE)
        except configuration.ConfigError:
            pass
    return found


def writable_by_others(st):
    """A directory where a user other than root may add, rename or remove names."""
    return st.st_uid != 0 or st.st_mode & 0o022


def trusted_dir(path, hops=40):
    """`path` with every symbolic link resolved, when no name on the way to it can be swapped by a user
    other than root (a root-owned entry of a sticky directory such as /tmp cannot); else None.
    Root creates files only there, so a link planted by the service user is never followed."""
    current, parts = "/", [p for p in os.path.abspath(path).split("/") if p]
    while parts:
        name = parts.pop(0)
        entry = os.path.join(current, name)
        try:
            here, st = os.stat(current), os.lstat(entry)
        except OSError:
            return None
        if writable_by_others(here) and not (here.st_mode & stat.S_ISVTX and st.st_uid == 0):
            return None
        if stat.S_ISLNK(st.st_mode):
            hops -= 1
            if hops < 0:
                return None
            target = os.path.join(current, os.readlink(entry))   # an absolute target replaces current
            current, parts = "/", [p for p in os.path.normpath(target).split("/") if p] + parts
        elif stat.S_ISDIR(st.st_mode):
            current = entry
        else:
            return None
    return current


def create_for(user, path):
    """Create the missing file `path` for the service user (root's part of the start).

    Only in a directory reached without a name another user could swap, with an exclusive no-follow
    open (a link or file already there is left alone) and fchown on what was opened. Anything else is
    left to the service user, after the drop: what it cannot do then is reported."""
    parent = trusted_dir(os.path.dirname(os.path.abspath(path)))
    if parent is None:
        return
    try:
        fd = os.open(os.path.join(parent, os.path.basename(path)),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    except OSError:
        return      # exists (maybe as a link: not followed as root), or cannot be created
    try:
        os.fchown(fd, user.pw_uid, user.pw_gid)
    finally:
        os.close(fd)


def create_dir_for(user, path):
    """The pid directory, like create_for: made 0700 by root, then handed over only if what we
    open without following a link is still that empty root-owned directory."""
    parent = trusted_dir(os.path.dirname(path))
    if parent is None:
        return
    made = os.path.join(parent, os.path.basename(path))
    try:
        os.mkdir(made, 0o700)
        fd = os.open(made, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700 and st.st_nlink == 2:
            os.fchmod(fd, 0o755)
            os.fchown(fd, user.pw_uid, user.pw_gid)
    finally:
        os.close(fd)


def prepare_as_root(user, args):
    """Create what the service user must write but may not create: log files, the pid directory."""
    for path in sorted({args.logfile} | worker_logfiles(args.conf_dir)):
        create_for(user, path)
    create_dir_for(user, os.path.dirname(os.path.abspath(args.pidfile)))


def drop_privileges(user):
    os.initgroups(user.pw_name, user.pw_gid)
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    # libpq finds ~/.pgpass through HOME; the user's, not root's
    os.environ.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)


def cannot_write_log(path, who, error):
    if os.path.islink(path):
        # never advise a chown here: chown follows the link to whatever it names
        return (f"user {who} cannot write the log file {path}: it is a symbolic link to {os.readlink(path)} "
                f"({error.strerror}); remove the link, or set the log file to a path of your choosing")
    if not os.path.exists(path):
        return (f"user {who} cannot create the log file {path}: {error.strerror} (create it for that user "
                f"in a directory only root can write, e.g. `install -o {who} -m 0640 /dev/null {path}`)")
    return f"user {who} cannot write the log file {path}: {error.strerror} (chown {who} {path})"


def check_can_run(args, who):
    """Everything the detached service will need, checked while we can still tell the terminal."""
    if not os.access(sys.executable, os.X_OK):
        raise ServiceError(f"user {who} cannot run the Python interpreter {sys.executable}: install pyreplica "
                           f"where that user can read it (e.g. a virtualenv under /opt), or choose --user")
    if not os.path.isdir(args.conf_dir) or not os.access(args.conf_dir, os.R_OK | os.X_OK):
        raise ServiceError(f"cannot read the config directory {args.conf_dir} as user {who}")
    for path in configuration.conf_paths(args.conf_dir):
        try:
            configuration.load_worker(path)
        except configuration.ConfigError as e:
            raise ServiceError(str(e), EXIT_CONFIG) from None
    for path in sorted({args.logfile} | worker_logfiles(args.conf_dir)):
        try:
            open(path, "a").close()
        except OSError as e:
            raise ServiceError(cannot_write_log(path, who, e)) from None
    piddir = os.path.dirname(os.path.abspath(args.pidfile))
    if not os.access(piddir, os.W_OK | os.X_OK):
        raise ServiceError(f"user {who} cannot write pid files in {piddir}: use --pidfile "
                           f"/run/pyreplica/pyreplica.pid (created for it) or chown {who} {piddir}")
    PidFile(args.pidfile).check()


# -- the service's own log -------------------------------------------------------------------------
class ServiceLog:
    """The service's log file; reopen() after logrotate moved it (SIGHUP). Stray output of the
    service and its workers (fd 1 and 2) goes there too. In the foreground: the terminal."""

    def __init__(self, path, console=False):
        self.path, self.console = path, console

    def reopen(self):
        if self.console:
            log.setup("pyreplica", 1)
            return
        handler = logging.handlers.WatchedFileHandler(self.path)
        log.setup("pyreplica", 1, handler=handler)
        os.dup2(handler.stream.fileno(), 1)
        os.dup2(handler.stream.fileno(), 2)


# -- starting --------------------------------------------------------------------------------------
def main(args):
    """`pyreplica service`: returns the exit code (0 started, 1 failure, 2 bad config)."""
    try:
        user = service_user(args.user)
        if user is not None:
            prepare_as_root(user, args)
            drop_privileges(user)
        who = pwd.getpwuid(os.getuid()).pw_name
        check_can_run(args, who)
    except ServiceError as e:
        print(f"pyreplica: {e}", file=sys.stderr)
        return e.exit_code
    if args.foreground:
        return serve(args, ready=None, detach=False)
    return start_detached(args)


def start_detached(args):
    """Fork: the child becomes the daemon; we wait for its word so our exit code tells the truth."""
    read_fd, write_fd = os.pipe()
    if os.fork() == 0:
        os.close(read_fd)
        try:
            code = serve(args, ready=write_fd, detach=True)
        except BaseException as e:      # anything, so that the parent hears why
            report(write_fd, f"error {e}")
            code = EXIT_FAIL
        os._exit(code)
    os.close(write_fd)
    os.wait()       # the child exits as soon as it has detached (its own child is the daemon)
    answer = read_answer(read_fd)
    if answer.startswith("ready "):
        print(f"pyreplica service started (pid {answer.split()[1]}, log {args.logfile})")
        return EXIT_OK
    reason = answer[len("error "):] if answer.startswith("error ") else f"see {args.logfile}"
    print(f"pyreplica: the service did not start: {reason}", file=sys.stderr)
    return EXIT_FAIL


def read_answer(fd):
    chunks = []
    while select.select([fd], [], [], READY_TIMEOUT)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace").strip()


def report(fd, text):
    try:
        os.write(fd, text.encode() + b"\n")
        os.close(fd)
    except OSError:
        pass


def serve(args, ready, detach):
    """Run the supervisor inside the daemon context (pid file held until it returns)."""
    # imported here, not at the top: `pyreplica run` builds its parser from this module and should
    # not pay for the service's imports at every start (a catch-up is timed from the start)
    import daemon   # python-daemon: this module is pyreplica.daemon, so the name is free
    from .service import Supervisor
    service_log = ServiceLog(args.logfile, console=not detach)
    supervisor = Supervisor(args.conf_dir, service_log)
    logstream = open(args.logfile, "a")
    context = daemon.DaemonContext(
        detach_process=detach, pidfile=PidFile(args.pidfile), umask=0o027, working_directory="/",
        files_preserve=[fd for fd in (ready, logstream) if fd is not None],
        # detached: stray output to the log; in the foreground keep the terminal (else it is closed)
        stdin=None if detach else sys.stdin, stdout=logstream if detach else sys.stdout,
        stderr=logstream if detach else sys.stderr,
        signal_map={signal.SIGTERM: supervisor.request_stop, signal.SIGINT: supervisor.request_stop,
                    signal.SIGHUP: supervisor.request_reload, signal.SIGTSTP: None, signal.SIGTTIN: None,
                    signal.SIGTTOU: None})
    with context:
        service_log.reopen()
        logstream.close()

        def say_ready():
            if ready is not None:
                report(ready, f"ready {os.getpid()}")
        return supervisor.run(say_ready)
