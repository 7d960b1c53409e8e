"""``mbs-csi db migrate``: copy the controller's database into another, empty one.

The controller keeps every state in one database (cinder's tables, cinderlib's key/value table with the
nodes' connector properties, alembic's schema version), so moving it from SQLite to PostgreSQL (or back)
is a copy of every table. The copy is one transaction on the target, schema included (PostgreSQL and
SQLite both roll DDL back): a copy that fails or is killed leaves the target as empty as it was, and one
that ends leaves it complete. Values are copied as they are stored; nothing is decrypted or re-encoded.

The target's schema is made as the driver makes it, by cinder's own migrations (up to the source's
version) and cinderlib's key/value table, so it is right for the target's dialect; the rows those
migrations seed are replaced by the source's, alembic's version row included, and the driver started on
the target finds its schema current and every volume, snapshot, attachment and connector it had.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy
from alembic import command as alembic_command
from cinder.db import migration as cinder_migration
from cinder.db.sqlalchemy import models
from cinderlib.persistence import dbms  # noqa: F401  (declares cinderlib's key/value table on the models)
from oslo_config import cfg

BATCH = 500
VERSION_TABLE = "alembic_version"


class MigrationRefused(Exception):
    """The copy cannot start: the databases are not what it needs (the message says why)."""


@dataclass(frozen=True)
class Copied:
    rows: dict[str, int]  # rows per table, every table included


def schema() -> sqlalchemy.MetaData:
    """Every table the controller keeps: cinder's and cinderlib's models, and alembic's version."""
    metadata = sqlalchemy.MetaData()
    for table in models.BASE.metadata.sorted_tables:
        table.to_metadata(metadata)
    sqlalchemy.Table(VERSION_TABLE, metadata, sqlalchemy.Column("version_num", sqlalchemy.String(32), primary_key=True))
    return metadata


def _engine(url: str) -> sqlalchemy.engine.Engine:
    try:
        engine = sqlalchemy.create_engine(url)
    except (sqlalchemy.exc.ArgumentError, ImportError) as exc:
        raise MigrationRefused(f"not a database URL SQLAlchemy knows: {hidden(url)}") from exc
    if engine.dialect.name == "sqlite":
        # pysqlite opens no transaction before DDL and commits at each one; take the transaction over
        # (SQLAlchemy's documented recipe), so that the schema and the rows commit together.
        @sqlalchemy.event.listens_for(engine, "connect")
        def _no_implicit(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @sqlalchemy.event.listens_for(engine, "begin")
        def _begin(connection: sqlalchemy.engine.Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    elif engine.dialect.name == "postgresql":
        # The source is read as one snapshot, whatever commits meanwhile.
        engine = engine.execution_options(isolation_level="REPEATABLE READ")
    return engine


def hidden(url: str) -> str:
    """``url`` as it may be printed: its password hidden."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return "<unparsable URL>"


def _check_source(connection: sqlalchemy.engine.Connection, metadata: sqlalchemy.MetaData) -> None:
    inspector = sqlalchemy.inspect(connection)
    present = set(inspector.get_table_names())
    if "volumes" not in present or VERSION_TABLE not in present:
        raise MigrationRefused("the source database holds no mbs-csi state (it has no volumes table)")
    unknown = sorted(present - set(metadata.tables))
    if unknown:  # state this version would not copy: refuse rather than leave it behind
        raise MigrationRefused(f"the source database has tables this version does not know: {', '.join(unknown)}")
    for table in metadata.sorted_tables:
        if table.name not in present:
            raise MigrationRefused(f"the source database lacks the table {table.name}: start the driver on it once")
        columns = {column["name"] for column in inspector.get_columns(table.name)}
        missing = sorted(set(table.columns.keys()) - columns)
        if missing:
            raise MigrationRefused(
                f"the source's table {table.name} lacks columns {', '.join(missing)}: start the driver on it once"
            )


def _check_target(connection: sqlalchemy.engine.Connection) -> None:
    found = sorted(sqlalchemy.inspect(connection).get_table_names())
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise MigrationRefused(f"the target database is not empty (tables: {shown}); give it an empty database")


def _create_schema(
    connection: sqlalchemy.engine.Connection, url: str, metadata: sqlalchemy.MetaData, version: str
) -> None:
    """The driver's schema at ``version`` on ``connection`` (to ``url``), within its transaction, with no
    row in it."""
    # One migration asks oslo.db's global engine for the dialect's name: point it at the target too.
    cfg.CONF.set_override("connection", url, "database")
    config = cinder_migration._find_alembic_conf()
    config.attributes["connection"] = connection
    alembic_command.upgrade(config, version)
    metadata.create_all(connection, checkfirst=True)  # cinderlib's key/value table: no migration makes it
    for table in reversed(metadata.sorted_tables):  # what the migrations seed (the default volume type...)
        connection.execute(table.delete())


def _batches(result: sqlalchemy.engine.Result) -> Iterator[list[dict[str, Any]]]:
    while rows := result.mappings().fetchmany(BATCH):
        yield [dict(row) for row in rows]


def _reset_sequences(connection: sqlalchemy.engine.Connection, metadata: sqlalchemy.MetaData) -> None:
    """On PostgreSQL, move each serial column's sequence past the ids copied into it (the copy gives ids
    explicitly, which leaves the sequences at 1, and the next insert would collide)."""
    for table in metadata.sorted_tables:
        for column in table.primary_key.columns:
            if not isinstance(column.type, sqlalchemy.Integer):
                continue
            # NULL (and nothing done) for a column that has no sequence.
            connection.execute(
                sqlalchemy.text(
                    "SELECT setval(pg_get_serial_sequence(:table, :column), COALESCE(MAX("
                    f"{column.name}), 0) + 1, false) FROM {table.name}"
                ),
                {"table": table.name, "column": column.name},
            )


def migrate(source_url: str, target_url: str) -> Copied:
    """Copy every table of the controller's database at ``source_url`` into the empty database at
    ``target_url``, in one transaction on the target. Refuses (:class:`MigrationRefused`) a target that has
    any table, and a source that is not a complete mbs-csi database."""
    metadata = schema()
    source, target = _engine(source_url), _engine(target_url)
    if source.url == target.url:
        raise MigrationRefused("the source and the target are the same database")
    rows: dict[str, int] = {}
    try:
        with source.connect() as reading, target.connect() as writing, reading.begin(), writing.begin():
            _check_source(reading, metadata)
            _check_target(writing)
            version = reading.execute(sqlalchemy.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one()
            _create_schema(writing, target_url, metadata, version)
            for table in metadata.sorted_tables:
                rows[table.name] = 0
                for batch in _batches(reading.execute(sqlalchemy.select(table))):
                    writing.execute(table.insert(), batch)
                    rows[table.name] += len(batch)
            if writing.dialect.name == "postgresql":
                _reset_sequences(writing, metadata)
    finally:
        source.dispose()
        target.dispose()
    return Copied(rows)
