#!/usr/bin/env bash
# Used by setup.sh before any apt-get install: refuses an install that would make apt upgrade or
# remove an installed PostgreSQL server package while a PostgreSQL server of this host runs (the
# package's upgrade restarts every cluster; a throw-away server's binaries change under it).
#   scripts/server-upgrade-guard.sh SIMULATION PACKAGE...
# SIMULATION: the output of `apt-get -s install PACKAGE...`. Exit 0: go ahead; 3: refused, and why
# on stderr. PYREPLICA_ALLOW_SERVER_UPGRADE=1 lets the install go ahead anyway.
# Sourced (tests), it only defines the functions below.

# "package old -> new" (or "package old -> removed") for each server package apt would change.
# `Inst P [OLD] (NEW ...)` upgrades an installed P (a new install has no [OLD]); `Remv/Purg P [OLD]`.
server_changes() {
    awk '
        function server(p) { sub(/:.*/, "", p); return p ~ /^postgresql-[0-9]+$/ || p == "postgresql-common" }
        function postgres(p) { sub(/:.*/, "", p); return p ~ /^(postgresql|libpq)/ }
        $1 == "Inst" && $3 ~ /^\[/ && server($2) {
            old = $3; gsub(/[][]/, "", old); new = $4; sub(/^\(/, "", new)
            print $2 " " old " -> " new
        }
        ($1 == "Remv" || $1 == "Purg") && postgres($2) {
            old = $3; gsub(/[][]/, "", old)
            print $2 " " old " -> removed"
        }' "$1"
}

# One line per PostgreSQL server running on this host: Debian clusters that pg_lsclusters says are
# online, and every other postmaster (a postgres process whose parent is not a postgres process).
running_servers() {
    if command -v pg_lsclusters >/dev/null; then
        pg_lsclusters -h 2>/dev/null | awk '$4 ~ /^online/ { print "cluster " $1 "/" $2 " (port " $3 ")" }'
    fi
    ps -e -o pid= -o ppid= -o comm= -o args= 2>/dev/null | awk '
        { pid[NR] = $1; ppid[NR] = $2; comm[$1] = $3; line = $0
          sub(/^ *[0-9]+ +[0-9]+ +[^ ]+ +/, "", line); args[NR] = line }
        END { for (i = 1; i <= NR; i++)
                  if (comm[pid[i]] == "postgres" && comm[ppid[i]] != "postgres")
                      print "postgres server pid " pid[i] " (" args[i] ")" }' |
        # a cluster pg_lsclusters listed is named once
        while read -r line; do
            case "$line" in *" -D /var/lib/postgresql/"*) command -v pg_lsclusters >/dev/null && continue ;; esac
            echo "$line"
        done
}

# decide CHANGES RUNNING PACKAGE...: 0 go ahead, 3 refused with one line saying what and what to do.
decide() {
    local changes=$1 running=$2
    shift 2
    if [ -z "$changes" ] || [ -z "$running" ] || [ "${PYREPLICA_ALLOW_SERVER_UPGRADE:-0}" = 1 ]; then
        return 0
    fi
    echo "setup: installing $* would make apt change PostgreSQL server packages ($(echo "$changes" | paste -sd, - | sed 's/,/, /g')), which restarts the clusters of this host, and PostgreSQL is running ($(echo "$running" | paste -sd';' - | sed 's/;/; /g')). Nothing was installed: stop those servers first, or when a restart is acceptable run: PYREPLICA_ALLOW_SERVER_UPGRADE=1 make setup" >&2
    return 3
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    simulation=$1
    shift
    decide "$(server_changes "$simulation")" "$(running_servers)" "$@"
fi
