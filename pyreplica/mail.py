"""Notification mail (DESIGN §7): start, stop, error and conflict warning, through [SMTP].

Login is optional; STARTTLS is used when the server offers it. A failure to send is logged and
never stops replication.
"""
import smtplib
import socket
from email.message import EmailMessage

from . import log

SUBJECT_KEYS = {"start": "START_SUBJECT", "stop": "STOP_SUBJECT", "error": "ERROR_SUBJECT",
                "warning": "WARNING_SUBJECT"}
TIMEOUT = 20


class Mailer:
    def __init__(self, server, username, password, from_addr, to_addrs, subjects, name):
        host, _, port = server.partition(":")
        self.host, self.port = host, int(port or 25)
        self.username, self.password = username, password
        self.from_addr, self.to_addrs = from_addr, to_addrs
        self.subjects, self.name = subjects, name

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
        """Send one mail; returns True on success. Never raises."""
        try:
            with smtplib.SMTP(self.host, self.port, timeout=TIMEOUT) as smtp:
                smtp.ehlo()
                if smtp.has_extn("starttls"):
                    smtp.starttls()
                    smtp.ehlo()
                if self.username:
                    smtp.login(self.username, self.password)
                smtp.send_message(self.message(kind, body))
            return True
        except (OSError, smtplib.SMTPException) as e:
            log.get().warning("Could not send the %s mail through %s:%s: %s", kind, self.host, self.port, e)
            return False
