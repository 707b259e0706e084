import sys


def main(argv=None):
    print("pyreplica: the command line is not there yet", file=sys.stderr)
    return 2
