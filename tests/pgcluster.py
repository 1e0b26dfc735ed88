"""A throwaway PostgreSQL cluster for the tests: Debian's PostgreSQL 15 binaries, a temporary
directory, a unix socket in it, no fsync (``durable=True``: PostgreSQL's defaults, fsync on, as
bench/gateways.py runs it). Tests get a fresh database each, copied from a
template that already holds the schema.

initdb refuses to run as root, so as root the server runs as the ``postgres`` user (the
directory is given to it). Where PostgreSQL is missing the tests that need it are skipped,
except under CI (``CI=true``), where that is a failure: `scripts/bootstrap --test-tools`
installs it.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from karma8.metadata.postgres import PostgresDatabase

BIN = Path(os.environ.get("KARMA8_PG_BIN", "/usr/lib/postgresql/15/bin"))
TEMPLATE = "karma8_template"


def missing(reason: str) -> None:
    """Skip, or fail under CI, where every test must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is needed under CI: {reason}")
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


class PgCluster:
    """One PostgreSQL server in a temporary directory, listening on a unix socket there."""

    def __init__(self, *, durable: bool = False) -> None:
        """``durable``: PostgreSQL's defaults (fsync, synchronous commits, full page writes),
        as a benchmark wants; else none of them, as the tests want."""
        if not (BIN / "initdb").exists():
            missing(f"no {BIN / 'initdb'} (scripts/bootstrap --test-tools installs it)")
        self.dir = Path(tempfile.mkdtemp(prefix="karma8-pg-"))
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.data = self.dir / "data"
        self._names = itertools.count()
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{self.dir}' -c max_connections=200"
        )
        if not durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"),
                  "-w", "start")  # fmt: skip
        self.admin_url = self.url("postgres")
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        template = PostgresDatabase(self.url(TEMPLATE), pool_size=1, check_schema=False)
        template.upgrade()
        template.close()

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._as, str(BIN / tool), *args], check=True, capture_output=True, cwd=self.dir
        )

    def url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.dir}"

    def new_database(self, *, template: str = TEMPLATE) -> str:
        """A fresh database (the schema of ``template``); its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
