# pyreplica: `make demo` shows it work, `make test` runs the whole suite. Both install what they need.
PY      := .venv/bin/python
PYTEST  := .venv/bin/pytest

.PHONY: setup demo test bench bench-quick install clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m pyreplica.cli demo

test: setup
	$(PYTEST) -q --durations=15 $(PYTEST_ARGS)

bench:
	@WITH_PGQ=1 bash scripts/setup.sh
	$(PY) -m bench.run

bench-quick:
	@WITH_PGQ=1 bash scripts/setup.sh
	$(PY) -m bench.run --quick

# Installs the command (in its own virtualenv: Debian 12's system pip refuses `pip install .`, and the
# service's user must be able to run the interpreter), the init.d script, the systemd unit, the SQL
# and a sample config (see docs/service.md). Needs python3-venv, and libpq-dev python3-dev gcc to build psycopg2.
INSTALL_VENV ?= /opt/pyreplica/venv
INSTALL_PYTHON ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)

install:
	[ -x $(INSTALL_VENV)/bin/python ] || $(INSTALL_PYTHON) -m venv $(INSTALL_VENV)
	$(INSTALL_VENV)/bin/pip install --quiet --upgrade .
	rm -rf build
	ln -sf $(INSTALL_VENV)/bin/pyreplica /usr/local/bin/pyreplica
	install -D -m 0755 pyreplica.sh /usr/local/lib/pyreplica/pyreplica.sh
	install -D -m 0644 pyreplica@.service /etc/systemd/system/pyreplica@.service
	install -D -m 0644 master-install.sql /usr/local/share/pyreplica/master-install.sql
	install -D -m 0644 master-uninstall.sql /usr/local/share/pyreplica/master-uninstall.sql
	install -d -m 0755 /etc/pyreplica
	[ -e /etc/pyreplica/sample.conf.example ] || install -m 0644 sample.conf /etc/pyreplica/sample.conf.example
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

clean:
	rm -rf .venv build *.egg-info .pytest_cache .hypothesis
