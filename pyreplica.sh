#!/bin/sh
### BEGIN INIT INFO
# Provides:          pyreplica
# Required-Start:    $remote_fs $network $syslog
# Required-Stop:     $remote_fs $network $syslog
# Should-Start:      postgresql
# Should-Stop:       postgresql
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: pyreplica PostgreSQL master->slave replication
# Description:       Runs one replication worker per /etc/pyreplica/*.conf as the pyreplica user.
### END INIT INFO
#
# LSB init script for the pyreplica service. Install it as in the guide:
#   ln -sf /usr/local/pyreplica/pyreplica.sh /etc/init.d/pyreplica && update-rc.d pyreplica defaults
# Optional settings in /etc/default/pyreplica (shell syntax), with their defaults:
#   PYREPLICA=           the pyreplica command (default: the checkout's .venv/bin/pyreplica next to the
#                        real location of this script, else `pyreplica` on PATH or in /usr/local/bin)
#   PYREPLICA_CONF_DIR=/etc/pyreplica   PYREPLICA_PIDFILE=/run/pyreplica/pyreplica.pid
#   PYREPLICA_LOGFILE=/var/log/pyreplica.log   PYREPLICA_USER=pyreplica
# Exit codes are LSB's: status 0 running, 1 dead with a pid file left, 3 stopped; start 5 command
# not found, 6 bad config; reload 7 not running.
# The pid file's directory belongs to the pyreplica user, so its content is not trusted: a pid is
# signalled only when /proc/PID/cmdline is `... service ... --pidfile $PYREPLICA_PIDFILE`.

NAME=pyreplica
[ -r /etc/default/pyreplica ] && . /etc/default/pyreplica
: "${PYREPLICA_CONF_DIR:=/etc/pyreplica}"
: "${PYREPLICA_PIDFILE:=/run/pyreplica/pyreplica.pid}"
: "${PYREPLICA_LOGFILE:=/var/log/pyreplica.log}"
: "${PYREPLICA_USER:=pyreplica}"
STOP_TIMEOUT=60

# Where this script really lives: /etc/init.d/pyreplica is usually a symlink to a checkout.
HERE=$(dirname "$(readlink -f "$0")")

# Nothing is imported from the directory the script was started in: `python -m pyreplica.cli`
# would otherwise import a pyreplica or psycopg2 module planted there (PYTHONSAFEPATH: Python 3.11+).
cd / || exit 1
export PYTHONSAFEPATH=1

find_command() {
    if [ -n "$PYREPLICA" ]; then
        echo "$PYREPLICA"
    elif [ -x "$HERE/.venv/bin/pyreplica" ]; then
        echo "$HERE/.venv/bin/pyreplica"
    else
        PATH="$PATH:/usr/local/bin:/opt/pyreplica/venv/bin" command -v pyreplica
    fi
}

# The pid named by the pid file, whether or not it runs.
pidfile_pid() {
    [ -r "$PYREPLICA_PIDFILE" ] || return 1
    pid=$(head -n 1 "$PYREPLICA_PIDFILE" | tr -cd '0-9' | cut -c1-10)
    [ -n "$pid" ] && echo "$pid"
}

# True when process $1 is this service: its arguments hold "service" and "--pidfile <our pid file>".
is_service() {
    [ -r "/proc/$1/cmdline" ] || return 1
    tr '\0' '\n' <"/proc/$1/cmdline" | awk -v pidfile="$PYREPLICA_PIDFILE" '
        $0 == "service" { service = 1 }
        prev == "--pidfile" && $0 == pidfile { ours = 1 }
        $0 == "--pidfile=" pidfile { ours = 1 }
        { prev = $0 }
        END { exit !(service && ours) }'
}

running_pid() {
    pid=$(pidfile_pid) && kill -0 "$pid" 2>/dev/null && is_service "$pid" && echo "$pid"
}

# Says so when the pid file names a live process that is not the service (left alone).
not_ours() {
    if pid=$(pidfile_pid) && kill -0 "$pid" 2>/dev/null; then
        echo "$NAME is not running: its pid file $PYREPLICA_PIDFILE names pid $pid, which is not the pyreplica service (not signalled)" >&2
        return 0
    fi
    return 1
}

do_start() {
    if pid=$(running_pid); then
        echo "$NAME is already running (pid $pid)"
        return 0
    fi
    command=$(find_command) || { echo "$NAME: the pyreplica command was not found (set PYREPLICA in /etc/default/pyreplica)" >&2; return 5; }
    # $command is left unquoted on purpose: PYREPLICA may be "python3 -m pyreplica.cli"
    $command service --conf-dir "$PYREPLICA_CONF_DIR" --pidfile "$PYREPLICA_PIDFILE" \
        --logfile "$PYREPLICA_LOGFILE" --user "$PYREPLICA_USER"
    case $? in
        0) return 0 ;;
        2) return 6 ;;
        *) return 1 ;;
    esac
}

do_stop() {
    if ! pid=$(running_pid); then
        not_ours || echo "$NAME is not running"
        return 0
    fi
    echo "Stopping $NAME (pid $pid): workers finish or abandon their batch"
    kill -TERM "$pid"
    waited=0
    while kill -0 "$pid" 2>/dev/null && is_service "$pid"; do
        if [ "$waited" -ge "$STOP_TIMEOUT" ]; then
            echo "$NAME (pid $pid) did not stop within $STOP_TIMEOUT s" >&2
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    return 0
}

do_status() {
    if pid=$(running_pid); then
        echo "$NAME is running (pid $pid)"
        return 0
    fi
    if [ -e "$PYREPLICA_PIDFILE" ]; then
        echo "$NAME is not running, but its pid file $PYREPLICA_PIDFILE remains"
        return 1
    fi
    echo "$NAME is not running"
    return 3
}

do_reload() {
    if ! pid=$(running_pid); then
        not_ours || echo "$NAME is not running" >&2
        return 7
    fi
    echo "Reloading $NAME (pid $pid): re-reading $PYREPLICA_CONF_DIR"
    kill -HUP "$pid"
}

case "$1" in
    start) do_start ;;
    stop) do_stop ;;
    restart) do_stop && do_start ;;
    status) do_status ;;
    reload|force-reload) do_reload ;;
    *)
        echo "Usage: $0 {start|stop|restart|status|reload|force-reload}" >&2
        exit 2
        ;;
esac
