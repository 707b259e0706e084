"""The `pyreplica` command (docs/design.md §8). Exit codes: 0 success, 1 failure or difference, 2 bad usage/config."""
import argparse
import os
import sys

import psycopg2

from . import config as configuration, log
from .config import EXIT_CONFIG, EXIT_FAIL, ConfigError
from .db import ReplicaError, server_message


def add_server_args(parser):
    parser.add_argument("master", nargs="?", help="master connection string (or DSN0 in the environment)")
    parser.add_argument("slave", nargs="?", help="slave connection string (or DSN1 in the environment)")
    parser.add_argument("-c", "--config", metavar="CONF", help="config file, e.g. /etc/pyreplica/somedb.conf")
    parser.add_argument("--name", help="this slave's name on the master (default: SLAVE_FIELD/NAME from the "
                                       "config, else the slave's database name)")


def build_parser():
    parser = argparse.ArgumentParser(prog="pyreplica", description="PostgreSQL master -> slave replication")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="replicate on the console (the daemon's loop)")
    add_server_args(run)
    run.add_argument("--debug-level", type=int, choices=range(4), help="0-3, overrides DEBUG_LEVEL")
    run.add_argument("--skip-user", help="overrides SKIP_USER")
    run.add_argument("--keepalive", type=int, help="overrides KEEPALIVE (seconds)")

    clone = sub.add_parser("clone", help="copy schema and data of the replicated tables to an empty slave")
    add_server_args(clone)

    drop = sub.add_parser("drop-slave", help="forget a slave on the master so the log stops growing for it")
    drop.add_argument("slave_name", metavar="NAME")
    drop.add_argument("master", nargs="?", help="master connection string (or DSN0 / -c)")
    drop.add_argument("-c", "--config", metavar="CONF")

    register = sub.add_parser("register", help="register a slave on the master before copying its data by hand")
    register.add_argument("slave_name", metavar="NAME")
    register.add_argument("master", nargs="?", help="master connection string (or DSN0 / -c)")
    register.add_argument("-c", "--config", metavar="CONF")

    recover = sub.add_parser("recover", help="settle a slave's in-doubt prepared batches, without replicating")
    add_server_args(recover)

    skip = sub.add_parser("skip-event", help="skip exactly one event a slave cannot replay (on purpose, recorded "
                                             "on both sides)")
    skip.add_argument("event_id", metavar="ID", type=int, help="the event's id, as 'conflict at event ID' names it")
    add_server_args(skip)

    for name, text in (("status", "per slave: position, lag, last contact, in-doubt transactions"),
                       ("compare", "row counts and content hashes of every replicated table on both sides")):
        cmd = sub.add_parser(name, help=text)
        add_server_args(cmd)
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
    sub.choices["compare"].add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                                        help="how long to wait for the slave to catch up with the master (default 30)")

    repair = sub.add_parser("repair", help="make one diverged table on the slave equal to the master's, online")
    add_server_args(repair)
    repair.add_argument("table", metavar="TABLE", help="the table to repair: name or schema.name")
    repair.add_argument("--dry-run", action="store_true", help="report the differences, change nothing")
    repair.add_argument("--json", action="store_true", help="machine-readable output")
    repair.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for the slave to catch up on that table (default 30)")

    for name, text in (("add-table", "copy tables into a running slave and replicate them from then on, online"),
                       ("remove-table", "stop replicating tables to one slave (its copies are kept)")):
        cmd = sub.add_parser(name, help=text, usage=f"pyreplica {name} [-c CONF | MASTER SLAVE] TABLE... [options]")
        cmd.add_argument("operands", nargs="+", metavar="TABLE",
                         help="the connection strings (or -c CONF, or DSN0/DSN1), then the tables: name or schema.name")
        cmd.add_argument("-c", "--config", metavar="CONF", help="config file, e.g. /etc/pyreplica/somedb.conf")
        cmd.add_argument("--name", help="this slave's name on the master (as for `run`)")
    sub.choices["add-table"].add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                                          help="how long to wait for the slave's daemon to reach the copy's point "
                                               "(default 300)")

    switch = sub.add_parser("switchover", help="planned role swap: the slave becomes the master, the master its "
                                               "slave, no transaction lost")
    add_server_args(switch)
    switch.add_argument("--new-name", help="the old master's name as a slave of the new master (default: its "
                                           "database name)")
    switch.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the slave to apply the master's last transactions (default 60)")

    sub.add_parser("demo", help="two throw-away clusters: install, write, replicate, status, compare")

    from .daemon import add_arguments as add_service_arguments
    service = sub.add_parser("service", help="the service: one worker per CONF_DIR/*.conf, detached (init.d)")
    add_service_arguments(service)
    return parser


def load_config(args):
    """The config file (-c) or the DSNs given; `run`'s options override either."""
    if args.config:
        if args.master or args.slave:
            raise ConfigError("give either -c CONF or the connection strings, not both")
        config = configuration.load(args.config)
    else:
        config = configuration.from_args(args.master, args.slave)
    for option in ("debug_level", "skip_user", "keepalive"):
        value = getattr(args, option, None)
        if value is not None:
            config.values[("MAIN", option.upper())] = value
    return config


def config_and_name(args):
    """The config and this slave's name of a command that logs like the daemon (run, clone, recover)."""
    config = load_config(args)
    name = configuration.slave_name(config, args.name)
    log.setup(config.NAME or name, config.DEBUG_LEVEL)
    return config, name


def cmd_run(args):
    from .mail import Mailer
    from .replicator import Replicator
    config, name = config_and_name(args)
    return Replicator(config, name, Mailer.from_config(config, name)).run()


def cmd_clone(args):
    from .clone import clone
    return clone(*config_and_name(args))


def master_dsn(args):
    """The master's DSN of a command that needs only the master: -c CONF, the argument, or DSN0."""
    if args.config:
        return configuration.load(args.config).DSN0
    return args.master or configuration.from_args(None, "unused").DSN0


def cmd_drop_slave(args):
    from .admin import drop_slave
    return drop_slave(master_dsn(args), args.slave_name)


def cmd_register(args):
    from .admin import register
    return register(master_dsn(args), args.slave_name)


def cmd_recover(args):
    from .admin import recover
    return recover(*config_and_name(args))


def cmd_skip_event(args):
    from .admin import skip_event
    config = load_config(args)
    return skip_event(config, configuration.slave_name(config, args.name), args.event_id)


def cmd_status(args):
    from .status import status
    if not args.config and not args.slave and not os.environ.get("DSN1"):
        # status needs only the master; a slave DSN adds the slave's in-doubt transactions
        config = configuration.from_args(args.master, "-")
        config.values[("MAIN", "DSN1")] = ""
    else:
        config = load_config(args)
    return status(config, args.json, args.name)


def cmd_compare(args):
    from .compare import compare
    config = load_config(args)
    return compare(config, configuration.slave_name(config, args.name), args.json, wait=args.wait)


def cmd_repair(args):
    from .repair import repair
    if "=" in args.table or "://" in args.table:
        # `repair MASTER SLAVE` without TABLE: argparse took the slave's connection string for it
        raise ConfigError("give the TABLE to repair after the connection strings")
    config = load_config(args)
    return repair(config, configuration.slave_name(config, args.name), args.table, args.dry_run, args.json,
                  wait=args.wait)


def tables_and_config(args):
    """add-table/remove-table: [MASTER SLAVE] TABLE...; the connection strings are the operands that
    look like one (key=value or a URI), else -c CONF or DSN0/DSN1 give them."""
    operands = list(args.operands)
    dsns = []
    while operands and len(dsns) < 2 and ("=" in operands[0] or "://" in operands[0]):
        dsns.append(operands.pop(0))
    if len(dsns) == 1:
        raise ConfigError("give both connection strings, the master's and the slave's, before the tables")
    if not operands:
        raise ConfigError("name at least one TABLE after the connection strings")
    args.master, args.slave = dsns or (None, None)
    config = load_config(args)
    return config, configuration.slave_name(config, args.name), operands


def cmd_add_table(args):
    from .tables import add_table
    config, name, tables = tables_and_config(args)
    log.setup(config.NAME or name, config.DEBUG_LEVEL)
    return add_table(config, name, tables, wait=args.wait)


def cmd_remove_table(args):
    from .tables import remove_table
    return remove_table(*tables_and_config(args))


def cmd_switchover(args):
    from .switchover import switchover
    config = load_config(args)
    reversed_config = configuration.from_args(config.DSN1, config.DSN0)    # new master -> new slave
    return switchover(config, configuration.slave_name(config, args.name),
                      configuration.slave_name(reversed_config, args.new_name), args.wait)


def cmd_demo(args):
    from .demo import demo
    return demo()


def cmd_service(args):
    from .daemon import main as service_main
    return service_main(args)


COMMANDS = {"run": cmd_run, "clone": cmd_clone, "drop-slave": cmd_drop_slave, "register": cmd_register,
            "recover": cmd_recover, "skip-event": cmd_skip_event, "status": cmd_status,
            "compare": cmd_compare, "repair": cmd_repair, "add-table": cmd_add_table,
            "remove-table": cmd_remove_table, "switchover": cmd_switchover, "demo": cmd_demo,
            "service": cmd_service}


def database_error(error):
    message = server_message(error)
    return f"{message} (SQLSTATE {error.pgcode})" if error.pgcode else message


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"pyreplica: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except ReplicaError as e:
        print(f"pyreplica: {e}", file=sys.stderr)
        return EXIT_FAIL
    except psycopg2.Error as e:
        # one the command did not foresee (a damaged install, a server going away mid-command): the
        # server's own words, without a traceback that buries them
        print(f"pyreplica: {args.command} stopped by a database error: {database_error(e)}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
