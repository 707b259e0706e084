"""Notification mail (docs/design.md §7): start, stop, error and conflict warning, through [SMTP].

Login is optional; STARTTLS is used when the server offers it, and then the server's certificate and
host name are verified (system CA store, or CA_FILE; TLS_VERIFY = false opts out). A password is never
sent in clear text to a server other than this host. Mails are sent by a background
thread, in order, so that a slow, hanging or dead SMTP server never holds up replication; a failure
to send is logged, never raised. Mails still queued at exit (the stop mail) get a bounded wait.
"""
import atexit
import contextlib
import queue
import smtplib
import socket
import ssl
import threading
import time
from email.message import EmailMessage

from . import log

SUBJECT_KEYS = {"start": "START_SUBJECT", "stop": "STOP_SUBJECT", "error": "ERROR_SUBJECT",
                "warning": "WARNING_SUBJECT"}
TIMEOUT = 10            # seconds per SMTP network operation
EXIT_WAIT = 10          # at exit, the longest wait for queued mails (a hung server must not hang the stop)


LOOPBACK = ("localhost", "127.0.0.1", "::1")


class Mailer:
    def __init__(self, server, username, password, from_addr, to_addrs, subjects, name, ca_file="",
                 tls_verify=True):
        host, _, port = server.partition(":")
        self.host, self.port = host, int(port or 25)
        self.username, self.password = username, password
        self.ca_file, self.tls_verify = ca_file, tls_verify
        self.from_addr, self.to_addrs = from_addr, to_addrs
        self.subjects, self.name = subjects, name
        self._queue = queue.Queue()
        self._thread = None

    @classmethod
    def from_config(cls, config, name):
        """A Mailer, or None when the config names no SMTP server or no recipient."""
        if not config.get("SMTP", "SERVER") or not config.get("SMTP", "TO_ADDRS"):
            return None
        subjects = {kind: config.get("SMTP", key) for kind, key in SUBJECT_KEYS.items()}
        return cls(config.get("SMTP", "SERVER"), config.get("SMTP", "USERNAME"), config.get("SMTP", "PASSWORD"),
                   config.get("SMTP", "FROM_ADDR"), config.get("SMTP", "TO_ADDRS"), subjects,
                   config.NAME or name, config.get("SMTP", "CA_FILE"), config.get("SMTP", "TLS_VERIFY"))

    def message(self, kind, body):
        msg = EmailMessage()
        msg["Subject"] = self.subjects[kind].replace("%(name)s", self.name)
        msg["From"] = self.from_addr
        msg["To"] = ", ".join(self.to_addrs)
        msg.set_content(f"pyreplica {self.name} on {socket.gethostname()}: {kind}\n\n{body}\n")
        return msg

    def send(self, kind, body=""):
        """Queue one mail for the background sender. Never blocks on the SMTP server, never raises."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._sender, name="pyreplica-mail", daemon=True)
            self._thread.start()
            atexit.register(self.flush)
        self._queue.put((kind, body))

    def _sender(self):
        while True:
            kind, body = self._queue.get()
            try:
                self.deliver(kind, body)
            finally:
                self._queue.task_done()

    def flush(self, timeout=EXIT_WAIT):
        """Wait, at most `timeout` seconds, for the queued mails to be sent (or given up)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)

    def deliver(self, kind, body=""):
        """Send one mail now; returns True on success. Never raises."""
        try:
            # contextlib.closing, not `with SMTP`: after a refused certificate, its QUIT in clear text would
            # only hide the reason under another error
            with contextlib.closing(smtplib.SMTP(self.host, self.port, timeout=TIMEOUT)) as smtp:
                self.session(smtp, kind, body)
            return True
        except ssl.SSLCertVerificationError as e:
            log.get().warning("Could not send the %s mail through %s:%s: its certificate is not trusted (%s): set "
                              "CA_FILE in [SMTP] to the CA that signed it (TLS_VERIFY = false would let a man in "
                              "the middle read the mails and the password)", kind, self.host, self.port,
                              e.verify_message)
        except (OSError, smtplib.SMTPException) as e:
            log.get().warning("Could not send the %s mail through %s:%s: %s", kind, self.host, self.port, e)
        return False

    def session(self, smtp, kind, body):
        smtp.ehlo()
        encrypted = smtp.has_extn("starttls")
        if encrypted:
            smtp.starttls(context=self.tls_context())
            smtp.ehlo()
        if self.username and not encrypted and self.host not in LOOPBACK:
            raise smtplib.SMTPException("the server offers no STARTTLS: not sending the password in clear")
        if self.username:
            smtp.login(self.username, self.password)
        smtp.send_message(self.message(kind, body))
        smtp.quit()

    def tls_context(self):
        """Verify the certificate and host name (ssl's defaults), against CA_FILE if given; or not at all."""
        try:
            context = ssl.create_default_context(cafile=self.ca_file or None)
        except OSError as e:        # missing, unreadable, or not PEM (ssl.SSLError)
            raise smtplib.SMTPException(f"CA_FILE {self.ca_file} in [SMTP] cannot be used: "
                                        f"{e.strerror or getattr(e, 'reason', None) or e}") from None
        if not self.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context
