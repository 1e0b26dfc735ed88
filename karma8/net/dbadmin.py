"""``karma8 db upgrade | version``: discovery's metadata schema.

The database is PostgreSQL at ``--metadata-url`` (or ``metadata_url`` in ``--config``), else
the embedded SQLite file in ``--data`` (default ``./karma8-data``). SQLite upgrades itself
whenever discovery opens it; PostgreSQL only here, once, before discovery instances of a
new karma8 start (they refuse a schema behind theirs). See docs/operations.md.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from karma8.core.exits import EXIT_FAILED, EXIT_OK
from karma8.core.tomlconf import ConfigError
from karma8.metadata.schema import LATEST, MIGRATIONS, SchemaError, schema_version
from karma8.metadata.sql import SQLITE
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.net.locate import DATABASE_FILE, DEFAULT_DATA
from karma8.net.settings import load_net_config


def add_db_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = commands.add_parser("db", help="discovery's metadata schema: version, upgrade")
    actions = db.add_subparsers(dest="db_command", required=True)
    for name, help_text in (
        ("version", "show the schema's version and this karma8's (exit 1 unless they match)"),
        ("upgrade", "bring the schema up to this karma8's (PostgreSQL: before discovery starts)"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--metadata-url", help="PostgreSQL URL (postgresql://USER@HOST/DB)")
        action.add_argument("--config", type=Path, help="TOML file with metadata_url")
        action.add_argument(
            "--data",
            type=Path,
            help=f"discovery's directory, for its SQLite file (else ./{DEFAULT_DATA})",
        )


def run_db(args: argparse.Namespace) -> int:
    """``karma8 db …``: 0 done (for `version`: the schema is this karma8's), 1 the database
    cannot be used (or, for `version`, its schema is not this karma8's), 2 bad arguments."""
    try:
        url = args.metadata_url
        if url is None and args.config is not None:
            url = load_net_config(args.config, {}).metadata_url
    except ConfigError as exc:
        print(f"karma8 db: {exc}", file=sys.stderr)
        return 2
    import psycopg  # here, not at start-up: it takes ~0.1 s to import

    try:
        if url is not None:
            return _postgres(args.db_command, url)
        return _sqlite(args.db_command, (args.data or DEFAULT_DATA) / DATABASE_FILE)
    except (SchemaError, psycopg.Error, sqlite3.Error) as exc:
        print(f"karma8 db {args.db_command}: {exc}", file=sys.stderr)
        return 1


CONNECT_TIMEOUT = 10  # seconds `karma8 db` waits for PostgreSQL, unless its URL says


def _postgres(command: str, url: str) -> int:
    import psycopg

    from karma8.metadata.postgres import PostgresDatabase

    # One connection first: a database that cannot be reached is its one error at once, not
    # the pool's retries logged until its own timeout.
    if "connect_timeout" not in psycopg.conninfo.conninfo_to_dict(url):  # the URL's wins
        url = psycopg.conninfo.make_conninfo(url, connect_timeout=CONNECT_TIMEOUT)
    psycopg.connect(url).close()
    database = PostgresDatabase(url, pool_size=1, check_schema=False)
    try:
        if command != "upgrade":
            return _show(database.version)
        _report(database.version, [m.version for m in database.upgrade()])
    finally:
        database.close()
    return 0


def _sqlite(command: str, path: Path) -> int:
    if not path.exists():
        print(f"karma8 db {command}: no database at {path}", file=sys.stderr)
        return 1
    with sqlite3.connect(path) as raw:
        before = schema_version(raw, SQLITE)
    raw.close()
    if command != "upgrade":
        return _show(before)
    SqliteMetadataStore(path).close()  # opening upgrades it
    _report(before, [m.version for m in MIGRATIONS if m.version > before])
    return 0


def _show(version: int) -> int:
    """Print the schema's version; 0 if this karma8 can serve it as it is, else 1 (so that a
    deploy script can ask before it starts discovery)."""
    state = "up to date" if version == LATEST else "run `karma8 db upgrade`"
    if version > LATEST:
        state = "newer than this karma8"
    print(f"schema version {version}; this karma8: {LATEST} ({state})")
    return EXIT_OK if version == LATEST else EXIT_FAILED


def _report(before: int, applied: list[int]) -> None:
    if not applied:
        print(f"schema version {before}: up to date")
        return
    for version in applied:
        what = next(m.what for m in MIGRATIONS if m.version == version)
        print(f"applied migration {version}: {what}")
    print(f"schema version {applied[-1]} (was {before})")
