"""The ``mbs-csi`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from mbs_csi import __version__, config, logs, secrets
from mbs_csi.errors import ConfigError, CSIError, EndpointError

CSI_SPEC_VERSION = "1.12.0"
EXIT_CONFIG = 2
EXIT_START = 1

log = logging.getLogger("mbs_csi")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbs-csi",
        description="CSI driver serving volumes from any Cinder-supported storage (cinderlib + os-brick).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve", help="run the CSI gRPC server", description="Run the CSI gRPC server for a role until SIGTERM/SIGINT."
    )
    serve.add_argument(
        "--config", metavar="FILE", help=f"YAML or JSON config file (default: ${config.CONFIG_ENV}, else none)"
    )
    # One flag per configuration key, overriding it (config.OPTIONS declares them, help and default included).
    for key in config.OPTIONS:
        serve.add_argument("--" + key.replace("_", "-"), dest=key, metavar=key.upper(), help=config.flag_help(key))
    serve.set_defaults(func=_serve)

    backend = sub.add_parser("backend", help="backend tools", description="Backend tools.")
    backend_sub = backend.add_subparsers(dest="backend_command", metavar="COMMAND", required=True)
    check = backend_sub.add_parser(
        "check",
        help="initialise backends as the controller would and report their stats or errors",
        description="Initialise each backend (or the named ones) as the controller would and print its "
        "stats (capacity, protocol, thin provisioning, multiattach) or a clear error. Exit code 0 when all "
        "are healthy, 1 otherwise, 2 for a configuration error. Sensitive options are masked.",
    )
    check.add_argument("names", nargs="*", metavar="NAME", help="backends to check (default: all)")
    check.add_argument("--config", metavar="FILE", help=f"YAML or JSON config file (default: ${config.CONFIG_ENV})")
    check.add_argument("--state-dir", dest="state_dir", metavar="STATE_DIR", help="as for serve")
    check.add_argument("--database", metavar="DATABASE", help="as for serve")
    check.add_argument("--json", action="store_true", help="print JSON instead of text")
    check.set_defaults(func=_backend_check)

    controller = sub.add_parser("controller", help="controller tools", description="Controller tools.")
    controller_sub = controller.add_subparsers(dest="controller_command", metavar="COMMAND", required=True)
    audit = controller_sub.add_parser(
        "audit",
        help="compare the storage, the database and the connector store, and list what does not match",
        description="List volumes and snapshots on the storage without a record, records without storage, "
        "connections to nodes that no longer exist and leftovers of interrupted creates. Exit code 0 when "
        "nothing is found, 1 otherwise (after --fix: when something is left; or when it could not run), 2 for a "
        "configuration error.",
    )
    audit.add_argument("--config", metavar="FILE", help=f"YAML or JSON config file (default: ${config.CONFIG_ENV})")
    audit.add_argument("--state-dir", dest="state_dir", metavar="STATE_DIR", help="as for serve")
    audit.add_argument("--database", metavar="DATABASE", help="as for serve")
    audit.add_argument("--json", action="store_true", help="print JSON instead of text")
    audit.add_argument(
        "--fix",
        action="store_true",
        help="remove what is provably orphaned (leftovers, connections to gone nodes, finished deletes); "
        "never a volume or snapshot on the storage",
    )
    audit.set_defaults(func=_controller_audit)

    node = sub.add_parser("node", help="node tools", description="Node tools.")
    node_sub = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    attachments = node_sub.add_parser(
        "attachments",
        help="list the volumes staged on this node",
        description="List the volumes this node has staged (its local attachment store) with device, staging "
        "path, filesystem and whether the device is present and mounted as recorded ('exists').",
    )
    attachments.add_argument(
        "--state-dir",
        dest="state_dir",
        metavar="STATE_DIR",
        help=f"the node's state dir (default: {config.DEFAULT_STATE_DIR})",
    )
    attachments.add_argument("--config", metavar="FILE", help="take state_dir from this config file")
    attachments.add_argument("--json", action="store_true", help="print JSON instead of text")
    attachments.set_defaults(func=_node_attachments)

    db = sub.add_parser("db", help="database tools", description="Tools for the controller's database.")
    db_sub = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    migrate = db_sub.add_parser(
        "migrate",
        help="copy the controller's database into another, empty one",
        description="Copy every table of the controller's database (SQLAlchemy URL --from) into an empty "
        "database (--to), in one transaction: a copy that fails or is killed leaves the target empty. Stop "
        "the controller first. Exit code 0 when copied, 1 when refused or failed.",
    )
    migrate.add_argument("--from", dest="source", required=True, metavar="URL", help="the database in use")
    migrate.add_argument("--to", dest="target", required=True, metavar="URL", help="an empty database")
    migrate.set_defaults(func=_db_migrate)

    version = sub.add_parser("version", help="print the version", description="Print the version.")
    version.set_defaults(func=_version)
    return parser


def _load(args: argparse.Namespace) -> config.Settings:
    flags = {key: getattr(args, key, None) for key in config.OPTIONS}
    return config.load_settings(args.config, os.environ, flags)


def _serve(args: argparse.Namespace) -> int:
    from mbs_csi import server  # grpc and the services: only needed here

    settings = _load(args)
    logs.setup(settings.log_level)
    log.debug("settings: %s", settings.describe())
    try:
        code = server.serve(settings)
    except EndpointError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_START
    # Calls cut off by the grace period may still run in worker threads, and a normal interpreter exit
    # would join them (the very wait the grace period bounds). The drain is over: leave now.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


def _backend_check(args: argparse.Namespace) -> int:
    from mbs_csi import backend_check

    flags = {"state_dir": args.state_dir, "database": args.database}
    settings = config.load_settings(args.config, os.environ, flags)
    logs.setup("WARNING")
    reports = backend_check.check(settings, args.names)
    print(backend_check.render(reports, args.json))
    return 0 if all(r.ok for r in reports) else 1


def _controller_audit(args: argparse.Namespace) -> int:
    from mbs_csi.controller import audit

    flags = {"state_dir": args.state_dir, "database": args.database}
    settings = config.load_settings(args.config, os.environ, flags)
    logs.setup("WARNING")
    try:
        result = audit.run(settings, args.fix)
    except CSIError as exc:  # the database, the API server or the worker could not be reached
        print(f"mbs-csi: the audit could not run: {secrets.scrub(str(exc))}", file=sys.stderr)
        return 1
    print(audit.render(result, args.json))
    return 1 if result.findings else 0


def _node_attachments(args: argparse.Namespace) -> int:
    from mbs_csi.node import attachments

    settings = config.load_settings(args.config, os.environ, {"state_dir": args.state_dir})
    state_dir = settings.state_dir
    print(attachments.render(attachments.list_attachments(state_dir), attachments.last_start(state_dir), args.json))
    return 0


def _db_migrate(args: argparse.Namespace) -> int:
    import sqlalchemy

    from mbs_csi.controller import migration

    logs.setup("WARNING")
    where = f"{migration.hidden(args.source)} to {migration.hidden(args.target)}"
    try:
        copied = migration.migrate(args.source, args.target)
    except migration.MigrationRefused as exc:
        print(f"mbs-csi: db migrate: refused: {exc}", file=sys.stderr)
        return EXIT_START
    except sqlalchemy.exc.SQLAlchemyError as exc:
        # The driver's own message, without the statement and its values (rows may hold anything).
        reason = str(getattr(exc, "orig", None) or type(exc).__name__).strip().splitlines()[0]
        print(f"mbs-csi: db migrate: failed, the target is left as it was: {secrets.scrub(reason)}", file=sys.stderr)
        return EXIT_START
    for table, count in copied.rows.items():
        if count:
            print(f"{table}: {count}")
    print(f"copied {sum(copied.rows.values())} rows in {len(copied.rows)} tables from {where}")
    return 0


def _version(args: argparse.Namespace) -> int:
    print(f"mbs-csi {__version__} (CSI spec {CSI_SPEC_VERSION})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"mbs-csi: configuration error: {secrets.scrub(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
