"""Logging in the install guide's format: `somedb Sun Jun  1 14:52:32 2008 Opening origin (master) connection`.

DEBUG_LEVEL 0-3 maps onto logging levels: 0 warnings and errors, 1 info (connections, batches,
timeouts), 2 debug (every statement), 3 debug with tracebacks.
"""
import logging
import sys
import time

LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG, 3: logging.DEBUG}


class GuideFormatter(logging.Formatter):
    def __init__(self, name, tracebacks):
        super().__init__()
        self.set_name = name
        self.tracebacks = tracebacks

    def format(self, record):
        line = f"{self.set_name} {time.ctime(record.created)} {record.getMessage()}"
        if record.exc_info and self.tracebacks:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(name, debug_level=1, stream=None, handler=None):
    """Configure the `pyreplica` logger for one replica set; returns it."""
    logger = logging.getLogger("pyreplica")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    handler = handler or logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(GuideFormatter(name, tracebacks=debug_level >= 3))
    logger.addHandler(handler)
    logger.setLevel(LEVELS[debug_level])
    logger.propagate = False
    return logger


def get():
    return logging.getLogger("pyreplica")
