"""The metadata store shared: several discovery instances on one PostgreSQL database racing for
the same nodes and names; leadership leases; schema versions and migrations on both
databases."""

from __future__ import annotations

import random
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import attrs
import httpx
import psycopg
import psycopg.conninfo
import pytest
import trio
import trio.testing

from karma8.actors.discovery import Discovery, DiscoveryConfig
from karma8.actors.rebalancer import RebalancerConfig
from karma8.cli import main
from karma8.core.errors import DiskFull, NotEnoughNodes, PreconditionFailed, Unavailable
from karma8.core.layout import StripeLayout
from karma8.core.model import NodeRegistration, PartReceipt, VersionState
from karma8.core.placement import place_parts
from karma8.metadata.postgres import PostgresDatabase, PostgresMetadataStore
from karma8.metadata.schema import LATEST, MIGRATIONS, SchemaError, schema_version, upgrade
from karma8.metadata.sql import POSTGRESQL, SQLITE
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.metadata.store import SqlMetadataStore
from karma8.net.clients import make_http_client
from karma8.net.discovery_role import keep_running, run_discovery
from karma8.net.locate import DATABASE_FILE as DATABASE
from karma8.net.serve import run_gateway, run_storage
from karma8.sim.world import InlineRunner, SimClock, SimIds

from drivers import eventually, net_config
from pgcluster import PgCluster

LAYOUT = StripeLayout(parts=5, unit=4)
CAPACITY = 100  # bytes per node: 6 nodes hold 12 files of 50 bytes (10 a part)
THREADS = 4  # per instance
ROUNDS = 12  # uploads per thread


@pytest.fixture
def instances(pg_url: str) -> Iterator[tuple[PostgresMetadataStore, PostgresMetadataStore]]:
    """Two discovery instances' stores (a pool each) on one database with 6 small nodes."""
    a = PostgresMetadataStore(pg_url, pool_size=THREADS)
    b = PostgresMetadataStore(pg_url, pool_size=THREADS)
    a.create_namespace("default", 0.0)
    for i in range(6):
        registration = NodeRegistration(
            node_id=f"n{i}", url=f"http://n{i}", capacity_bytes=CAPACITY
        )
        a.upsert_node(registration, 0.0)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def receipts(size: int) -> list[PartReceipt]:
    return [
        PartReceipt(index=i, size=s, checksum=f"c{i}")
        for i, s in enumerate(LAYOUT.part_sizes(size))
    ]


def race(
    stores: Sequence[SqlMetadataStore], upload: Callable[[SqlMetadataStore, str], str]
) -> list[str]:
    """Run ``upload(store, version id)`` ROUNDS times in THREADS threads per store, all
    released at once; the outcomes."""
    start = threading.Barrier(THREADS * len(stores))

    def worker(store: SqlMetadataStore, thread: str) -> list[str]:
        start.wait()
        return [upload(store, f"{thread}-{i}") for i in range(ROUNDS)]

    with ThreadPoolExecutor(THREADS * len(stores)) as pool:
        futures = [
            pool.submit(worker, store, f"s{s}t{t}")
            for s, store in enumerate(stores)
            for t in range(THREADS)
        ]
        return [outcome for f in futures for outcome in f.result()]


def check_nodes_and_names(store: SqlMetadataStore) -> None:
    """No node holds or promises more than its capacity; no name has two committed versions."""
    for node in store.list_nodes():
        assert node.used_bytes + node.reserved_bytes <= node.capacity_bytes, node
    committed = store.versions(VersionState.COMMITTED)
    names = [(v.namespace, v.name) for v in committed]
    assert len(names) == len(set(names))
    on_node: dict[str, int] = {}
    for version in store.versions():
        for part in version.parts:
            on_node[part.node.node_id] = on_node.get(part.node.node_id, 0) + (part.size or 0)
    assert all(used <= CAPACITY for used in on_node.values()), on_node


def test_two_instances_racing_begin_and_commit_never_overfill_a_node(
    instances: tuple[PostgresMetadataStore, PostgresMetadataStore],
) -> None:
    def upload(store: SqlMetadataStore, version_id: str) -> str:
        try:
            store.begin_version(
                version_id=version_id,
                namespace="default",
                name=f"f{int(version_id[-1]) % 3}",  # overwrites race for three names
                layout=LAYOUT,
                size_hint=50,
                now=1.0,
                expires_at=100.0,
                if_absent=False,
                place=lambda loads: place_parts(loads, count=5, part_size=10, salt=version_id),
            )
        except NotEnoughNodes:
            return "full"
        store.commit_version(
            version_id=version_id, size=50, receipts=receipts(50), now=2.0, if_absent=False
        )
        return "ok"

    outcomes = race(instances, upload)
    assert outcomes.count("ok") <= 12  # what fits: 600 bytes of nodes, 50 a file
    rooms = [n.capacity_bytes - n.used_bytes - n.reserved_bytes for n in instances[0].list_nodes()]
    assert len([room for room in rooms if room >= 10]) < 5  # and the uploads filled it
    check_nodes_and_names(instances[0])
    assert 1 <= len(instances[1].versions(VersionState.COMMITTED)) <= 3


def test_commits_of_two_instances_leases_never_overfill_a_node(
    instances: tuple[PostgresMetadataStore, PostgresMetadataStore],
) -> None:
    """Each instance places against the database alone (its leases are its own memory), so
    both may place onto the same room: the commit's own check refuses the one too many."""

    def upload(store: SqlMetadataStore, version_id: str) -> str:
        view = store.placement_view("default", version_id, if_absent=False)
        try:
            nodes = place_parts([load for load, _ in view], count=5, part_size=10, salt=version_id)
        except NotEnoughNodes:
            return "full"
        try:
            store.commit_placed(
                version_id=version_id,
                namespace="default",
                name="same" if version_id.endswith("0") else version_id,
                layout=LAYOUT,
                nodes=nodes,
                size=50,
                receipts=receipts(50),
                created_at=1.0,
                now=2.0,
                if_absent=version_id.endswith("0"),
            )
        except DiskFull:
            return "refused"
        except PreconditionFailed:
            return "exists"
        return "ok"

    outcomes = race(instances, upload)
    assert outcomes.count("ok") <= 12
    assert outcomes.count("exists") >= THREADS * 2 - 1 - outcomes.count("full")
    check_nodes_and_names(instances[1])


def test_one_holder_of_a_leadership_lease_at_a_time(pg_url: str) -> None:
    store = PostgresMetadataStore(pg_url, pool_size=1)
    assert store.hold_leadership("sweeper", "a", now=0.0, until=10.0)
    assert not store.hold_leadership("sweeper", "b", now=5.0, until=15.0)
    assert store.hold_leadership("rebalancer", "b", now=5.0, until=15.0)  # another role
    assert store.hold_leadership("sweeper", "a", now=6.0, until=16.0)  # renewed
    assert not store.hold_leadership("sweeper", "b", now=15.9, until=25.0)
    assert store.hold_leadership("sweeper", "b", now=16.0, until=26.0)  # a's ran out
    assert not store.hold_leadership("sweeper", "a", now=17.0, until=27.0)
    store.close()


def test_sqlite_always_leads() -> None:
    store = SqliteMetadataStore()
    assert store.hold_leadership("sweeper", "a", now=0.0, until=10.0)
    assert store.hold_leadership("sweeper", "b", now=1.0, until=10.0)


def test_two_instances_racing_for_leadership_elect_one(
    instances: tuple[PostgresMetadataStore, PostgresMetadataStore],
) -> None:
    def claim(store: SqlMetadataStore, holder: str) -> str:
        return "won" if store.hold_leadership("sweeper", holder, now=1.0, until=9.0) else ""

    assert race(instances, claim).count("won") == 1


# -- schema versions ----------------------------------------------------------------------


def test_a_sqlite_database_from_before_versions_is_upgraded_on_open(tmp_path: Path) -> None:
    path = tmp_path / "discovery.sqlite3"
    old = sqlite3.connect(path)
    old.executescript((Path(__file__).parent / "data/metadata-before-versions.sql").read_text())
    old.close()
    store = SqliteMetadataStore(path)
    with store._read() as db:
        assert schema_version(db, SQLITE) == LATEST
    current = store.current_version("default", "a/file")
    assert current is not None
    assert (current.version_id, current.size) == ("v2", 50)
    assert [v.version_id for v in store.versions(VersionState.RETIRED)] == ["v1"]
    assert store.move_counts()["moving_parts"] == 1
    assert [t.token_id for t in store.list_tokens("team")] == ["t1"]
    assert store.hold_leadership("sweeper", "me", now=1.0, until=2.0)
    store.close()
    again = SqliteMetadataStore(path)  # reopening applies nothing more
    with again._read() as db:
        assert db.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1
    again.close()


def test_postgresql_refuses_a_schema_behind_until_upgraded(pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database(template="template0")
    with pytest.raises(SchemaError, match="karma8 db upgrade"):
        PostgresMetadataStore(url)
    old = PostgresDatabase(url, check_schema=False)
    with old._tx() as db:  # as the first versioned karma8 left it
        db.execute("CREATE TABLE schema_version (version BIGINT)")
        MIGRATIONS[0].apply(db, POSTGRESQL)
        db.execute("INSERT INTO schema_version(version) VALUES (1)")
    assert old.version == 1
    with pytest.raises(SchemaError, match="version 1, this karma8 needs"):
        PostgresMetadataStore(url)
    assert [m.version for m in old.upgrade()] == list(range(2, LATEST + 1))
    assert old.upgrade() == []
    old.close()
    store = PostgresMetadataStore(url)
    assert store.version == LATEST
    assert store.hold_leadership("rebalancer", "me", now=1.0, until=2.0)
    store.close()


def test_a_schema_newer_than_karma8_is_refused(new_store: SqlMetadataStore) -> None:
    with new_store._tx() as db:
        db.execute("UPDATE schema_version SET version = ?", (LATEST + 1,))
    with new_store._tx() as db, pytest.raises(SchemaError, match="newer"):
        upgrade(db, new_store.dialect)
    if isinstance(new_store, PostgresMetadataStore):
        with pytest.raises(SchemaError, match="newer"):
            new_store.check_schema()


# -- karma8 db, karma8 serve ---------------------------------------------------------------


def test_karma8_db_upgrades_postgresql_and_serve_refuses_it_before(
    pg_cluster: PgCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = pg_cluster.new_database(template="template0")
    config = tmp_path / "discovery.toml"
    config.write_text(f'metadata_url = "{url}"\nsecret = "s"\n')
    assert main(["db", "version", "--config", str(config)]) == 1  # behind: a check that fails
    assert capsys.readouterr().out == (
        f"schema version 0; this karma8: {LATEST} (run `karma8 db upgrade`)\n"
    )
    serve = ["serve", "--role", "discovery", "--config", str(config), "--data", str(tmp_path)]
    assert main(serve) == 1
    assert "run `karma8 db upgrade`" in capsys.readouterr().err
    assert main(["db", "upgrade", "--metadata-url", url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "applied migration 1: the schema before versions"
    assert out[-1] == f"schema version {LATEST} (was 0)"
    assert main(["db", "upgrade", "--metadata-url", url]) == 0
    assert capsys.readouterr().out == f"schema version {LATEST}: up to date\n"
    assert main(["db", "version", "--metadata-url", url]) == 0
    assert "(up to date)" in capsys.readouterr().out


def test_karma8_db_says_at_once_when_postgresql_cannot_be_reached(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"postgresql://karma8@127.0.0.1:{sock.getsockname()[1]}/karma8"
        assert main(["db", "version", "--metadata-url", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("karma8 db version: ")
    assert "Connection refused" in err
    assert len(err.splitlines()) <= 3
    assert not [r for r in caplog.records if r.name.startswith("psycopg")]  # no pool retries


def test_karma8_db_on_the_embedded_sqlite_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "version", "--data", str(tmp_path)]) == 1
    assert "no database at" in capsys.readouterr().err
    old = sqlite3.connect(tmp_path / "discovery.sqlite3")
    old.executescript((Path(__file__).parent / "data/metadata-before-versions.sql").read_text())
    old.close()
    assert main(["db", "version", "--data", str(tmp_path)]) == 1
    assert capsys.readouterr().out.startswith("schema version 0;")
    assert main(["db", "upgrade", "--data", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"schema version {LATEST} (was 0)"
    assert main(["db", "version", "--data", str(tmp_path)]) == 0
    assert capsys.readouterr().out.endswith("(up to date)\n")
    with sqlite3.connect(tmp_path / "discovery.sqlite3") as newer:  # a later karma8's
        newer.execute("INSERT INTO schema_version(version) VALUES (?)", (LATEST + 1,))
    newer.close()
    assert main(["db", "version", "--data", str(tmp_path)]) == 1
    assert capsys.readouterr().out.endswith("(newer than this karma8)\n")


def test_a_bad_metadata_url_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "discovery.toml"
    config.write_text('metadata_url = "mysql://db/karma8"\n')
    assert main(["db", "version", "--config", str(config)]) == 2
    assert "expected a PostgreSQL URL" in capsys.readouterr().err


# -- discovery instances sharing a store ---------------------------------------------------


async def test_one_of_two_discovery_instances_sweeps(
    pg_url: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Both drop their own expired placement leases; only the leader touches the store."""
    clock = SimClock()
    stores = [PostgresMetadataStore(pg_url, pool_size=1) for _ in range(2)]
    config = DiscoveryConfig(leader_lease=15.0)
    instances = [
        Discovery(
            store=store,
            blocking=InlineRunner(),
            clock=clock,
            ids=SimIds(random.Random(i)),
            config=config,
            instance=f"d{i}",
        )
        for i, store in enumerate(stores)
    ]
    try:
        for d in instances:
            await d.sweep()
        assert [d.counts["sweeps"] for d in instances] == [1, 0]
        await trio.sleep(10.0)
        await instances[1].sweep()  # d0's lease holds until 15
        assert instances[1].counts["sweeps"] == 0
        await trio.sleep(10.0)  # d0 stopped renewing: d1 takes over
        await instances[1].sweep()
        await instances[0].sweep()
        assert [d.counts["sweeps"] for d in instances] == [1, 1]
    finally:
        for store in stores:
            store.close()


async def test_the_rebalancer_runs_only_while_its_lease_is_held(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs: list[float] = []
    leading = [False, True, True, False, False, True]  # successive lead() answers

    class Counting:
        config = RebalancerConfig(interval=1.0)

        async def run(self) -> None:
            runs.append(trio.current_time())
            await trio.sleep_forever()

    async def lead() -> bool:
        return leading.pop(0) if leading else False

    with trio.move_on_after(30.0):
        await keep_running(Counting(), "the rebalancer", lead=lead, renew_every=5.0)  # type: ignore[arg-type]
    assert runs == [5.0, 20.0]  # started when it led, stopped at 15 when it lost the lease


def test_a_cut_connection_is_unavailable_once_then_replaced(
    pg_url: str, pg_cluster: PgCluster
) -> None:
    store = PostgresMetadataStore(pg_url, pool_size=1)
    try:
        store.create_namespace("default", 0.0)
        database = psycopg.conninfo.conninfo_to_dict(pg_url)["dbname"]
        with psycopg.connect(pg_cluster.admin_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            )
        with pytest.raises(Unavailable, match="metadata database is unavailable"):
            store.namespace_exists("default")
        assert store.namespace_exists("default")
        assert store.hold_leadership("sweeper", "me", now=1.0, until=2.0)
    finally:
        store.close()


async def test_two_discovery_services_on_one_database_serve_one_cluster(
    pg_url: str, tmp_path: Path
) -> None:
    """Nodes heartbeat to discovery A only; gateway A uses A and gateway B uses B. Files put
    through either read back through the other, small (one transaction, B's lease) and
    streamed (begin on A, commit on A)."""
    config = attrs.evolve(
        net_config(local_calls=False), metadata_url=pg_url, public_namespaces=("default",)
    )
    small, large = random.Random(1).randbytes(3000), random.Random(2).randbytes(300_000)
    async with (
        make_http_client(config.secret) as internal,
        httpx.AsyncClient(timeout=30) as client,
        trio.open_nursery() as nursery,
    ):
        discoveries = [
            await nursery.start(
                partial(run_discovery, config, database=tmp_path / name / DATABASE, port=0)
            )
            for name in ("a", "b")
        ]
        for i in range(6):
            await nursery.start(
                partial(
                    run_storage,
                    config,
                    data_dir=tmp_path / f"node{i}",
                    discovery_url=discoveries[0],
                    http=internal,
                    port=0,
                )
            )
        gateways = [
            await nursery.start(partial(run_gateway, config, discovery_url=url, http=internal))
            for url in discoveries
        ]

        async def put_small_through_b() -> bool:
            answer = await client.put(f"{gateways[1]}/default/small", content=small)
            return answer.status_code == 201

        await eventually(put_small_through_b, what="6 nodes known to B through the database")

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(large), 65536):
                yield large[start : start + 65536]

        answer = await client.put(f"{gateways[0]}/default/large", content=chunks())
        assert answer.status_code == 201, answer.text
        assert (await client.get(f"{gateways[0]}/default/small")).content == small
        assert (await client.get(f"{gateways[1]}/default/large")).content == large
        nursery.cancel_scope.cancel()
