"""`make setup` never upgrades a PostgreSQL server under running clusters (scripts/server-upgrade-guard.sh):
the decision from real `apt-get -s` output shapes and a real running throw-away server; nothing is
installed or upgraded here."""
import os
import shutil
import subprocess

import pytest

from replication import ROOT

GUARD = os.path.join(ROOT, "scripts", "server-upgrade-guard.sh")
# `apt-get -s install postgresql-plpython3-15` on a host whose server is older than the archive's
SIMULATION = """\
NOTE: This is only a simulation!
Reading package lists...
The following additional packages will be installed:
  libpq5 postgresql-15 postgresql-client-15
The following NEW packages will be installed:
  postgresql-plpython3-15
The following packages will be upgraded:
  libpq5 postgresql-15 postgresql-client-15
3 upgraded, 1 newly installed, 0 to remove and 130 not upgraded.
Inst libpq5 [15.5-0+deb12u1] (15.20-0+deb12u1 Debian:12.12/oldstable [amd64])
Inst postgresql-client-15 [15.5-0+deb12u1] (15.20-0+deb12u1 Debian:12.12/oldstable [amd64])
Inst postgresql-15 [15.5-0+deb12u1] (15.20-0+deb12u1 Debian:12.12/oldstable [amd64])
Inst postgresql-plpython3-15 (15.20-0+deb12u1 Debian:12.12/oldstable [amd64])
Conf libpq5 (15.20-0+deb12u1 Debian:12.12/oldstable [amd64])
Conf postgresql-client-15 (15.20-0+deb12u1 Debian:12.12/oldstable [amd64])
Conf postgresql-15 (15.20-0+deb12u1 Debian:12.12/oldstable [amd64])
Conf postgresql-plpython3-15 (15.20-0+deb12u1 Debian:12.12/oldstable [amd64])
"""
# the same on a fresh machine, or once the server is current: only new packages
FRESH = """\
NOTE: This is only a simulation!
0 upgraded, 1 newly installed, 0 to remove and 130 not upgraded.
Inst postgresql-plpython3-15 (15.20-0+deb12u1 Debian:12.12/oldstable [amd64])
Conf postgresql-plpython3-15 (15.20-0+deb12u1 Debian:12.12/oldstable [amd64])
"""
HINT = ("Nothing was installed: stop those servers first, or when a restart is acceptable run: "
        "PYREPLICA_ALLOW_SERVER_UPGRADE=1 make setup\n")


def guard_function(*call, env=None):
    """Call one function of the guard script, sourced: (exit code, stdout, stderr)."""
    script = f'. "{GUARD}"; "$@"'
    result = subprocess.run(["bash", "-c", script, "guard", *call], capture_output=True, text=True,
                            env=dict(os.environ, **(env or {})), timeout=60)
    return result.returncode, result.stdout, result.stderr


def simulation_file(tmp_path, text):
    path = tmp_path / "simulation"
    path.write_text(text)
    return str(path)


def postmaster_pid(cluster):
    with open(os.path.join(cluster.datadir, "postmaster.pid")) as f:
        return int(f.readline())


def test_server_changes_names_upgraded_and_removed_server_packages(tmp_path):
    removal = "Remv postgresql-15 [15.20-0+deb12u1]\nRemv libpq-dev [15.20-0+deb12u1]\n"
    assert guard_function("server_changes", simulation_file(tmp_path, SIMULATION + removal)) == (0, (
        "postgresql-15 15.5-0+deb12u1 -> 15.20-0+deb12u1\n"
        "postgresql-15 15.20-0+deb12u1 -> removed\n"
        "libpq-dev 15.20-0+deb12u1 -> removed\n"), "")
    assert guard_function("server_changes", simulation_file(tmp_path, FRESH)) == (0, "", "")


@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-query") is None, reason="not Debian")
def test_server_changes_reads_apt_gets_own_simulation(tmp_path):
    """apt-get -s remove only simulates; its Remv line is the real shape, version included."""
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "postgresql-common"], capture_output=True,
                             text=True)
    if version.returncode != 0:
        pytest.skip("postgresql-common is not installed")
    real = subprocess.run(["apt-get", "-s", "remove", "postgresql-common"], capture_output=True, text=True,
                          env=dict(os.environ, LC_ALL="C"), timeout=120)
    assert real.returncode == 0, real.stderr
    changes = guard_function("server_changes", simulation_file(tmp_path, real.stdout))[1].splitlines()
    assert f"postgresql-common {version.stdout} -> removed" in changes


def test_running_servers_sees_a_throw_away_cluster(master_cluster):
    rc, out, _ = guard_function("running_servers")
    assert rc == 0
    pid = postmaster_pid(master_cluster)
    line = next(line for line in out.splitlines() if line.startswith(f"postgres server pid {pid} "))
    assert f"-D {master_cluster.datadir}" in line
    assert not any("(postgres: " in line for line in out.splitlines()), "a server's child process was listed"


def test_an_upgrade_under_a_running_server_is_refused_with_what_to_do(tmp_path, master_cluster):
    result = subprocess.run([GUARD, simulation_file(tmp_path, SIMULATION), "postgresql-plpython3-15"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and result.stdout == ""
    assert result.stderr.startswith("setup: installing postgresql-plpython3-15 would make apt change PostgreSQL "
                                    "server packages (postgresql-15 15.5-0+deb12u1 -> 15.20-0+deb12u1), which "
                                    "restarts the clusters of this host, and PostgreSQL is running (")
    assert f"postgres server pid {postmaster_pid(master_cluster)} (" in result.stderr
    assert result.stderr.endswith(HINT) and result.stderr.count("\n") == 1
    # the way out it names
    allowed = subprocess.run([GUARD, simulation_file(tmp_path, SIMULATION), "postgresql-plpython3-15"],
                             capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, PYREPLICA_ALLOW_SERVER_UPGRADE="1"))
    assert (allowed.returncode, allowed.stdout, allowed.stderr) == (0, "", "")
    # new packages only (a fresh machine, a current server): installed, whatever runs
    fresh = subprocess.run([GUARD, simulation_file(tmp_path, FRESH), "postgresql-plpython3-15"],
                           capture_output=True, text=True, timeout=60)
    assert (fresh.returncode, fresh.stdout, fresh.stderr) == (0, "", "")


def test_decision_exact_message_and_ci_where_the_cluster_is_down():
    changes = "postgresql-15 15.5-0+deb12u1 -> 15.20-0+deb12u1\npostgresql-common 248 -> 250"
    running = "cluster 15/main (port 5432)\npostgres server pid 42 (/usr/lib/postgresql/15/bin/postgres -D /srv/x)"
    assert guard_function("decide", changes, running, "postgresql-plpython3-15", "libpq-dev") == (3, "", (
        "setup: installing postgresql-plpython3-15 libpq-dev would make apt change PostgreSQL server packages "
        "(postgresql-15 15.5-0+deb12u1 -> 15.20-0+deb12u1, postgresql-common 248 -> 250), which restarts the "
        "clusters of this host, and PostgreSQL is running (cluster 15/main (port 5432); postgres server pid 42 "
        "(/usr/lib/postgresql/15/bin/postgres -D /srv/x)). " + HINT))
    # CI: the image's cluster 15/main exists but is down, apt upgrades postgresql-15 to match: go ahead
    assert guard_function("decide", changes, "", "postgresql-plpython3-15") == (0, "", "")
    assert guard_function("decide", "", running, "postgresql-plpython3-15") == (0, "", "")


def test_setup_runs_the_guard_before_installing():
    with open(os.path.join(ROOT, "scripts", "setup.sh")) as f:
        setup = f.read()
    simulate = setup.index('apt-get -s install -y "$@"')
    guard = setup.index('scripts/server-upgrade-guard.sh "$simulation" "$@"')
    install = setup.index('apt-get install -y -qq "$@"')
    assert simulate < guard < install
