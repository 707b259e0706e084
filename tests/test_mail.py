"""Notification mail (docs/design.md §7) through a real SMTP server on loopback (aiosmtpd): start, stop,
error and conflict warning; one mail per outage; a dead SMTP server never stops replication."""
import email
import email.policy
import os
import socket
import ssl
import subprocess
import tempfile
from dataclasses import dataclass

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from pyreplica.cluster import free_port
from pyreplica.mail import Mailer
from replication import Daemon, create_on_both, wait_identical, wait_until
from service_helpers import conf_text, service  # noqa: F401 (fixture)

TABLE = "CREATE TABLE t (id int PRIMARY KEY, v text)"
RECIPIENTS = ["dba@example.com", "ops@example.com"]
HOST = socket.gethostname()


@dataclass
class Mail:
    sender: str
    recipients: list
    subject: str
    body: str
    tls: bool
    authenticated: bool


class Inbox:
    """aiosmtpd handler keeping every message it accepts."""

    def __init__(self):
        self.mails = []

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), msg["Subject"], msg.get_content(),
                               session.ssl is not None, session.authenticated))
        return "250 Message accepted"

    def subjects(self):
        return [m.subject for m in self.mails]

    def wait_for(self, subject, timeout=30):
        wait_until(lambda: subject in self.subjects(), timeout, message=f"mail {subject!r}; got {self.subjects()}")
        return next(m for m in self.mails if m.subject == subject)


def smtp_server(**kwargs):
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port(), **kwargs)
    controller.start()
    return inbox, controller


@pytest.fixture
def inbox():
    inbox, controller = smtp_server()
    inbox.server = f"127.0.0.1:{controller.port}"
    yield inbox
    controller.stop()


def smtp_keys(server):
    return {"SERVER": server, "FROM_ADDR": "pyreplica@db.example.com", "TO_ADDRS": ";".join(RECIPIENTS)}


def console_run(tmp_path, master, slave, smtp, **main):
    """`pyreplica run -c CONF` as a real process."""
    keys = {"NAME": "mailset", "DSN0": master.dsn, "DSN1": slave.dsn, "KEEPALIVE": 5, "RETRY_MAX": 1,
            "DEBUG_LEVEL": 2, **main}
    path = tmp_path / "mail.conf"
    path.write_text(conf_text(keys, smtp))
    daemon = Daemon(master, slave)
    daemon.args = ["-c", str(path)]
    return daemon


def test_service_sends_start_and_stop_mail(service, inbox, master, slave):
    create_on_both(master, slave, TABLE, ["t"])
    service.write_conf("mailset", master, slave, smtp=smtp_keys(inbox.server))
    assert service.init("start")[0] == 0
    start = inbox.wait_for("pyreplica mailset started")
    assert (start.sender, start.recipients) == ("pyreplica@db.example.com", RECIPIENTS)
    assert start.body.startswith(f"pyreplica mailset on {HOST}: start")
    master.execute("INSERT INTO t VALUES (1, 'mailed')")
    wait_identical(master, slave, ["t"])
    assert service.init("stop")[0] == 0
    stop = inbox.wait_for("pyreplica mailset stopped")
    assert stop.recipients == RECIPIENTS and stop.body.startswith(f"pyreplica mailset on {HOST}: stop")
    assert inbox.subjects() == ["pyreplica mailset started", "pyreplica mailset stopped"]


def test_repeated_conflict_sends_exactly_one_warning(tmp_path, inbox, master, slave):
    create_on_both(master, slave, TABLE, ["t"])
    master.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3) g")
    with console_run(tmp_path, master, slave, smtp_keys(inbox.server)) as daemon:
        wait_identical(master, slave, ["t"])
        slave.execute("DELETE FROM t WHERE id = 2")
        master.execute("UPDATE t SET v = 'conflicting' WHERE id = 2")
        warning = inbox.wait_for("pyreplica mailset conflict")
        # it is retried every RETRY_MAX = 1 s, and still mailed once
        wait_until(lambda: daemon.output.count("still failing") >= 3, message=f"retries:\n{daemon.output[-2000:]}")
        assert inbox.subjects() == ["pyreplica mailset started", "pyreplica mailset conflict"]
        assert warning.recipients == RECIPIENTS
        # the event, table and error, and the statement, for the DBA
        assert "slave: conflict at event" in warning.body and "(UPDATE on public.t)" in warning.body
        assert "matched 0 rows on the slave" in warning.body and "statement: UPDATE" in warning.body
        slave.execute("INSERT INTO t VALUES (2, 'v2')")         # the DBA resolves it
        wait_identical(master, slave, ["t"])
        assert daemon.stop() == 0
    assert inbox.subjects()[-1] == "pyreplica mailset stopped" and len(inbox.mails) == 3


def test_outage_sends_one_error_mail(tmp_path, inbox, master, slave):
    """The slave refuses connections for several retries: one error mail for the whole outage."""
    create_on_both(master, slave, TABLE, ["t"])
    with console_run(tmp_path, master, slave, smtp_keys(inbox.server)) as daemon:
        inbox.wait_for("pyreplica mailset started")
        admin = slave.cluster
        admin.execute(f'ALTER DATABASE "{slave.name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (slave.name,))
        master.execute("INSERT INTO t VALUES (1, 'during the outage')")
        error = inbox.wait_for("pyreplica mailset ERROR")
        wait_until(lambda: daemon.output.count("still failing") >= 3, message=f"retries:\n{daemon.output[-2000:]}")
        admin.execute(f'ALTER DATABASE "{slave.name}" ALLOW_CONNECTIONS true')
        wait_identical(master, slave, ["t"])
        assert daemon.stop() == 0
    assert error.recipients == RECIPIENTS and error.body.startswith(f"pyreplica mailset on {HOST}: error")
    assert inbox.subjects() == ["pyreplica mailset started", "pyreplica mailset ERROR", "pyreplica mailset stopped"]
    assert "Replication resumed after" in daemon.output


def test_smtp_server_that_hangs_never_holds_up_replication(tmp_path, master, slave):
    """A server that accepts the connection and never answers: mails wait in the background."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        server = f"127.0.0.1:{hung.getsockname()[1]}"
        create_on_both(master, slave, TABLE, ["t"])
        with console_run(tmp_path, master, slave, smtp_keys(server)) as daemon:
            daemon.wait_for_output("Waiting for 'NOTIFY'")
            master.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 50) g")
            wait_identical(master, slave, ["t"], timeout=8)    # the SMTP timeout is 10 s per operation
            assert daemon.stop() == 0      # within the bounded wait for the queued stop mail


def test_smtp_server_down_never_stops_replication(tmp_path, master, slave):
    dead = f"127.0.0.1:{free_port()}"       # nothing listens there
    create_on_both(master, slave, TABLE, ["t"])
    with console_run(tmp_path, master, slave, smtp_keys(dead)) as daemon:
        master.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 50) g")
        wait_identical(master, slave, ["t"])
        assert daemon.stop() == 0
    assert f"Could not send the start mail through {dead}" in daemon.output
    assert f"Could not send the stop mail through {dead}" in daemon.output


def self_signed_context(tmp_path):
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", key, "-out", cert], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def test_login_over_starttls(tmp_path):
    """A server that offers STARTTLS and requires a login over it, as most relays do."""
    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login, auth_data.password))
        ok = auth_data.login == b"replica" and auth_data.password == b"s3cret"
        return AuthResult(success=ok, handled=False)     # handled=False: aiosmtpd answers 535 itself

    inbox, controller = smtp_server(tls_context=self_signed_context(tmp_path), require_starttls=True,
                                    auth_required=True, authenticator=authenticator)
    try:
        mailer = Mailer(f"127.0.0.1:{controller.port}", "replica", "s3cret", "pyreplica@db.example.com",
                        RECIPIENTS, {"error": "pyreplica %(name)s ERROR"}, "tlsset")
        assert mailer.deliver("error", "slave: the slave is gone")
        bad = Mailer(f"127.0.0.1:{controller.port}", "replica", "wrong", "pyreplica@db.example.com",
                     RECIPIENTS, {"error": "x"}, "tlsset")
        assert not bad.deliver("error", "never delivered")      # logged, never raised
    finally:
        controller.stop()
    assert len(inbox.mails) == 1
    mail = inbox.mails[0]
    assert (mail.subject, mail.recipients, mail.tls, mail.authenticated) == ("pyreplica tlsset ERROR", RECIPIENTS,
                                                                             True, True)
    assert "slave: the slave is gone" in mail.body
    # the good login, then the bad one (which smtplib tries with each mechanism the server offers)
    assert logins[0] == (b"replica", b"s3cret") and set(logins[1:]) == {(b"replica", b"wrong")}
