"""Fault points for the crash tests: the real process kills itself with SIGKILL at a named step.

Only the test suite sets PYREPLICA_TEST_FAULT (e.g. `after_slave_prepare`, or
`after_slave_prepare:3` to die at the third time the step is reached); when it is unset every
fault point is a no-op.
"""
import os
import signal

_SPEC = os.environ.get("PYREPLICA_TEST_FAULT", "")
_NAME, _, _NTH = _SPEC.partition(":")
_seen = 0

# the daemon's 2PC steps (test_replication kills it at each); other commands have their own points,
# named where they are (switchover_after_fence, add_table_copied, ...)
POINTS = ("before_slave_prepare", "after_slave_prepare", "after_master_prepare", "after_slave_commit")


def point(name):
    global _seen
    if not _NAME or name != _NAME:
        return
    _seen += 1
    if _seen >= int(_NTH or 1):
        os.kill(os.getpid(), signal.SIGKILL)
