"""Notification mail (docs/design.md §7): start, stop, error and conflict warning, through [SMTP].

Login is optional; STARTTLS is used when the server offers it. Mails are sent by a background
thread, in order, so that a slow, hanging or dead SMTP server never holds up replication; a failure
to send is logged, never raised. Mails still queued at exit (the stop mail) get a bounded wait.
"""
import atexit
import queue
import smtplib
import socket
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
    def __init__(self, server, username, password, from_addr, to_addrs, subjects, name):
        host, _, port = server.partition(":")
        self.host, self.port = host, int(port or 25)
        self.username, self.password = username, password
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
                   config.NAME or name)

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
            with smtplib.SMTP(self.host, self.port, timeout=TIMEOUT) as smtp:
                smtp.ehlo()
                encrypted = smtp.has_extn("starttls")
                if encrypted:
                    smtp.starttls()
                    smtp.ehlo()
                if self.username and not encrypted and self.host not in LOOPBACK:
                    raise smtplib.SMTPException("the server offers no STARTTLS: not sending the password in clear")
                if self.username:
                    smtp.login(self.username, self.password)
                smtp.send_message(self.message(kind, body))
            return True
        except (OSError, smtplib.SMTPException) as e:
            log.get().warning("Could not send the %s mail through %s:%s: %s", kind, self.host, self.port, e)
            return False
