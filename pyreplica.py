#!/usr/bin/env python3
"""The install guide's debugging run, from a checkout:

    python3 pyreplica.py "dbname=master host=..." "dbname=slave host=..."

is `pyreplica run MASTER SLAVE`: replication on the console, logging to the terminal.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pyreplica.cli import COMMANDS, main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["run", *argv]
    sys.exit(main(argv))
