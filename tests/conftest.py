from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from karma8.metadata.postgres import PostgresMetadataStore
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.metadata.store import SqlMetadataStore

from pgcluster import PgCluster

settings.register_profile("ci", max_examples=200, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, each group in its own order: scripts/check hands tests to its
    workers a few at a time in this order, so the long ones start early and the many short
    ones fill in at the end, instead of one worker running a long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs ``karma8 serve``'s ``main`` in-process installs a root handler on the
    stderr of that moment (pytest's capture, closed after the test): put the root logger
    back, so that a later test's log lines do not meet a closed stream ("Logging error")."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL server for this test session (skipped, or failed under CI, if missing)."""
    cluster = PgCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh PostgreSQL database with the schema, for one test."""
    return pg_cluster.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def new_store(request: pytest.FixtureRequest) -> Iterator[SqlMetadataStore]:
    """An empty metadata store, on each database in turn."""
    store: SqlMetadataStore
    if request.param == "sqlite":
        store = SqliteMetadataStore()
    else:
        url = request.getfixturevalue("pg_url")
        store = PostgresMetadataStore(url, pool_size=2)
    try:
        yield store
    finally:
        store.close()
