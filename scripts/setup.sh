#!/usr/bin/env bash
# make setup: install on a fresh Debian/Ubuntu, as root, whatever pyreplica's tests, demo and
# benchmarks need, and a virtualenv .venv with the project in it. Quick when nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_PGQ=${WITH_PGQ:-0}     # make bench asks for PgQ's C triggers as well

apt_updated=0
apt_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing Debian packages: $*; run 'make setup' as root (or apt-get install $*)" >&2
        exit 1
    fi
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    # Never an unasked-for server upgrade: apt restarts every cluster of the host when it upgrades
    # postgresql-NN (e.g. to match a newer plpython3); refused while a PostgreSQL server runs.
    local simulation
    simulation=$(mktemp)
    DEBIAN_FRONTEND=noninteractive apt-get -s install -y "$@" >"$simulation" 2>&1 || true
    if ! scripts/server-upgrade-guard.sh "$simulation" "$@"; then
        rm -f "$simulation"
        exit 3
    fi
    rm -f "$simulation"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }

pg_major() { ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1; }

if command -v apt-get >/dev/null; then
    if [ -z "$(pg_major)" ] || [ ! -x "/usr/lib/postgresql/$(pg_major)/bin/postgres" ]; then
        apt_install postgresql postgresql-contrib
    fi
    major=$(pg_major)
    # plpython3 must be built for the very same server version: installing it may make apt upgrade
    # postgresql-$major to match; apt_install refuses that while a server runs (see above).
    want=(postgresql-plpython3-"$major" libpq-dev python3-dev gcc)
    missing=()
    for p in "${want[@]}"; do have_pkg "$p" || missing+=("$p"); done
    if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
    # PgQ's C triggers are optional (make bench compares against them; its row says "skipped"
    # without them): a failure to install them is reported, never fatal.
    pgq=postgresql-"$major"-pgq3
    if [ "$WITH_PGQ" = 1 ] && ! have_pkg "$pgq"; then
        if [ "$(id -u)" != 0 ]; then
            echo "setup: $pgq is not installed (optional, for make bench): apt-get install $pgq as root" >&2
        elif ! (apt_install "$pgq") 2>/dev/null; then
            echo "setup: could not install $pgq (optional, for make bench): the benchmark skips PgQ" >&2
        fi
    fi
    if [ "$(id -u)" = 0 ] && ! id pyreplica >/dev/null 2>&1; then
        :   # the service's user is created by the administrator (README) or by the tests that need it
    fi
else
    echo "setup: not a Debian/Ubuntu system: install PostgreSQL, its plpython3 package and libpq by hand" >&2
fi

# The virtualenv: rebuilt only when the project's metadata changed since the last install.
stamp=.venv/.pyreplica-installed
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
