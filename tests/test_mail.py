"""Notification mail (docs/design.md §7) through a real SMTP server on loopback (aiosmtpd): start, stop,
error and conflict warning; one mail per outage; a dead SMTP server never stops replication; STARTTLS
verifies the certificate (CA_FILE, TLS_VERIFY) and no password goes out in clear text."""
import email
import email.policy
import logging
import socket
import ssl
import subprocess
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
    path.chmod(0o640)       # it may hold the SMTP password
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


def self_signed(tmp_path, name="127.0.0.1"):
    """A self-signed certificate for `name` (also its own CA): (cert path, server TLS context)."""
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    f"/CN={name}", "-addext", f"subjectAltName=IP:{name}", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return cert, context


class LoginServer:
    """A STARTTLS relay requiring a login (replica / s3cret) over TLS, recording every login tried."""

    def __init__(self, tls_context):
        self.logins = []
        self.inbox, self.controller = smtp_server(tls_context=tls_context, require_starttls=True,
                                                  auth_required=True, authenticator=self.authenticate)
        self.server = f"127.0.0.1:{self.controller.port}"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        self.logins.append((auth_data.login, auth_data.password))
        ok = auth_data.login == b"replica" and auth_data.password == b"s3cret"
        return AuthResult(success=ok, handled=False)     # handled=False: aiosmtpd answers 535 itself

    def mailer(self, **tls):
        return Mailer(self.server, "replica", "s3cret", "pyreplica@db.example.com", RECIPIENTS,
                      {"error": "pyreplica %(name)s ERROR"}, "tlsset", **tls)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.controller.stop()


def test_login_over_starttls(tmp_path):
    """A server that offers STARTTLS and requires a login over it, as most relays do."""
    cert, context = self_signed(tmp_path)
    with LoginServer(context) as relay:
        assert relay.mailer(ca_file=cert).deliver("error", "slave: the slave is gone")
        bad = relay.mailer(ca_file=cert)
        bad.password = "wrong"
        assert not bad.deliver("error", "never delivered")      # logged, never raised
    assert len(relay.inbox.mails) == 1
    mail = relay.inbox.mails[0]
    assert (mail.subject, mail.recipients, mail.tls, mail.authenticated) == ("pyreplica tlsset ERROR", RECIPIENTS,
                                                                             True, True)
    assert "slave: the slave is gone" in mail.body
    # the good login, then the bad one (which smtplib tries with each mechanism the server offers)
    assert relay.logins[0] == (b"replica", b"s3cret") and set(relay.logins[1:]) == {(b"replica", b"wrong")}


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def warnings():
    """The warnings pyreplica logs (its logger does not propagate once set up)."""
    handler, logger = Warnings(), logging.getLogger("pyreplica")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


@pytest.fixture
def self_signed_relay(tmp_path):
    cert, context = self_signed(tmp_path)
    with LoginServer(context) as relay:
        relay.cert = cert
        yield relay


def test_starttls_refuses_an_untrusted_certificate_by_default(self_signed_relay, warnings):
    """A man in the middle with a self-signed certificate gets neither the mail nor the password."""
    assert not self_signed_relay.mailer().deliver("error", "slave: the slave is gone")
    assert self_signed_relay.inbox.mails == [] and self_signed_relay.logins == []
    assert warnings == [f"Could not send the error mail through {self_signed_relay.server}: its certificate is not "
                        "trusted (self-signed certificate): set CA_FILE in [SMTP] to the CA that signed it "
                        "(TLS_VERIFY = false would let a man in the middle read the mails and the password)"]


def test_starttls_with_ca_file_delivers(self_signed_relay):
    assert self_signed_relay.mailer(ca_file=self_signed_relay.cert).deliver("error", "slave: the slave is gone")
    assert [(m.subject, m.tls, m.authenticated) for m in self_signed_relay.inbox.mails] == [
        ("pyreplica tlsset ERROR", True, True)]


def test_starttls_checks_the_host_name_too(tmp_path, warnings):
    """A certificate the CA file trusts, but issued for another name, is refused."""
    cert, context = self_signed(tmp_path, name="127.0.0.2")
    with LoginServer(context) as relay:
        assert not relay.mailer(ca_file=cert).deliver("error", "x")
        assert relay.inbox.mails == [] and relay.logins == []
    assert len(warnings) == 1 and "its certificate is not trusted (IP address mismatch" in warnings[0]


def test_tls_verify_false_delivers_to_any_certificate(self_signed_relay):
    assert self_signed_relay.mailer(tls_verify=False).deliver("error", "slave: the slave is gone")
    assert [m.subject for m in self_signed_relay.inbox.mails] == ["pyreplica tlsset ERROR"]


def test_missing_ca_file_is_one_warning(self_signed_relay, tmp_path, warnings):
    missing = str(tmp_path / "nope.pem")
    assert not self_signed_relay.mailer(ca_file=missing).deliver("error", "x")
    assert warnings == [
        f"Could not send the error mail through {self_signed_relay.server}: CA_FILE {missing} in [SMTP] cannot be "
        "used: No such file or directory"]


def non_loopback_address():
    """This host's address on a real interface (the route out), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))      # no packet is sent: this only picks the outgoing address
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_a_password_is_never_sent_in_clear_to_another_host(warnings):
    """A relay without STARTTLS that would take a login in clear text, reached over a real interface."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append(auth_data.password)
        return AuthResult(success=True)

    inbox = Inbox()
    controller = Controller(inbox, hostname=address, port=free_port(), auth_require_tls=False,
                            authenticator=authenticator)
    controller.start()
    try:
        mailer = Mailer(f"{address}:{controller.port}", "replica", "s3cret", "a@b", RECIPIENTS, {"error": "x"}, "n")
        assert not mailer.deliver("error", "x")
    finally:
        controller.stop()
    assert inbox.mails == [] and logins == []
    assert warnings == [
        f"Could not send the error mail through {address}:{controller.port}: the server offers no STARTTLS: "
        "not sending the password in clear"]


def test_conf_keys_ca_file_and_tls_verify(tmp_path, master, slave):
    """Through the conf: by default the untrusted relay gets one warning line and no password, replication
    goes on; CA_FILE = its certificate delivers; TLS_VERIFY = false delivers."""
    cert, context = self_signed(tmp_path)
    create_on_both(master, slave, TABLE, ["t"])
    login = {"USERNAME": "replica", "PASSWORD": "s3cret", "FROM_ADDR": "a@b", "TO_ADDRS": ";".join(RECIPIENTS)}
    for tls_keys, delivered in (({}, False), ({"CA_FILE": cert}, True), ({"TLS_VERIFY": "false"}, True)):
        with LoginServer(context) as relay:
            with console_run(tmp_path, master, slave, {"SERVER": relay.server, **login, **tls_keys}) as daemon:
                daemon.wait_for_output("Waiting for 'NOTIFY'")
                if delivered:
                    relay.inbox.wait_for("pyreplica mailset started")
                else:
                    daemon.wait_for_output("Could not send the start mail")
                assert daemon.stop() == 0
        assert "Traceback" not in daemon.output
        if delivered:
            assert relay.inbox.subjects() == ["pyreplica mailset started", "pyreplica mailset stopped"]
        else:
            assert relay.inbox.mails == [] and relay.logins == []
            assert daemon.output.count("its certificate is not trusted (self-signed certificate)") == 2  # start, stop
