"""Access per namespace: tokens in the metadata, discovery's check, the gateway's cache, and
the public API's 401/403/404 on real sockets."""

from __future__ import annotations

import json
import random
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from karma8.actors.discovery import Discovery, DiscoveryConfig
from karma8.actors.gateway import Gateway, GatewayConfig
from karma8.cli import main
from karma8.core.access import (
    AccessCache,
    Right,
    TokenInfo,
    bearer_token,
    hash_secret,
    parse_token,
)
from karma8.core.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.metadata.store import SqlMetadataStore
from karma8.sim.world import InlineRunner, SimClock, SimIds

from drivers import NetDriver, net_config, net_driver

# -- the pure core -----------------------------------------------------------------------


def test_tokens_parse_and_bearer_headers() -> None:
    assert parse_token("k8t_abc123_s3cret") == ("abc123", "s3cret")
    for bad in ("", "k8t_", "k8t_abc", "k8t__s", "k8t_a_", "xyz_a_b", "k8t_a-b_c", "k8t_a_b c"):
        assert parse_token(bad) is None
    assert bearer_token("Bearer k8t_a_b") == "k8t_a_b"
    assert bearer_token("bearer   k8t_a_b ") == "k8t_a_b"
    assert bearer_token("Basic dXNlcjpwYXNz") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_the_cache_keeps_answers_for_its_ttl_and_stays_bounded() -> None:
    cache = AccessCache(5.0, max_entries=3)
    cache.remember("a", 100.0)
    assert cache.allows("a", 104.9)
    assert not cache.allows("a", 105.0)
    assert not cache.allows("a", 104.0)  # expired answers are forgotten
    for key in "bcde":
        cache.remember(key, 200.0)
    assert sum(cache.allows(k, 201.0) for k in "bcde") <= 3
    assert cache.allows("e", 201.0)
    off = AccessCache(0.0)
    off.remember("a", 1.0)
    assert not off.allows("a", 1.0)


# -- the metadata ------------------------------------------------------------------------


@pytest.fixture
def store(new_store: SqlMetadataStore) -> SqlMetadataStore:
    s = new_store
    s.add_namespace("team", 1.0, public=False)
    s.add_namespace("open", 1.0, public=True)
    s.add_namespace("other", 1.0, public=False)
    return s


def _token(store: SqlMetadataStore, tid: str, ns: str, *, read: bool, write: bool) -> str:
    store.add_token(
        token_id=tid,
        namespace=ns,
        read=read,
        write=write,
        secret_hash=hash_secret(f"secret{tid}"),
        now=2.0,
    )
    return hash_secret(f"secret{tid}")


def test_only_the_hash_of_a_secret_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "meta.sqlite3"
    s = SqliteMetadataStore(path)
    s.add_namespace("team", 1.0, public=False)
    s.add_token(
        token_id="t1",
        namespace="team",
        read=True,
        write=False,
        secret_hash=hash_secret("plaintextsecret"),
        now=2.0,
    )
    s.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"plaintextsecret" not in raw
    assert hash_secret("plaintextsecret").encode() in raw


def test_the_read_write_matrix(store: SqlMetadataStore) -> None:
    tokens = {
        "r": _token(store, "r", "team", read=True, write=False),
        "w": _token(store, "w", "team", read=False, write=True),
        "rw": _token(store, "rw", "team", read=True, write=True),
        "x": _token(store, "x", "other", read=True, write=True),
    }
    grants = {("r", Right.READ), ("w", Right.WRITE), ("rw", Right.READ), ("rw", Right.WRITE)}
    for tid, hashed in tokens.items():
        for right in Right:
            if (tid, right) in grants:
                store.check_access("team", tid, hashed, right)
            else:
                with pytest.raises(Forbidden):
                    store.check_access("team", tid, hashed, right)
    for right in Right:
        with pytest.raises(Unauthorized):
            store.check_access("team", None, None, right)
        with pytest.raises(Unauthorized):
            store.check_access("team", "rw", hash_secret("wrong"), right)
        with pytest.raises(Unauthorized):
            store.check_access("team", "unknown", tokens["rw"], right)
        store.check_access("open", None, None, right)  # public: anyone
        store.check_access("open", "r", hash_secret("wrong"), right)  # tokens do not matter
        with pytest.raises(NotFound):
            store.check_access("nope", "rw", tokens["rw"], right)


def test_revoked_tokens_and_disabled_namespaces(store: SqlMetadataStore) -> None:
    hashed = _token(store, "t", "team", read=True, write=True)
    first = store.revoke_token("t", 10.0)
    assert first.revoked_at == 10.0
    assert store.revoke_token("t", 20.0).revoked_at == 10.0  # idempotent
    with pytest.raises(Unauthorized, match="revoked"):
        store.check_access("team", "t", hashed, Right.READ)
    with pytest.raises(NotFound):
        store.revoke_token("nope", 1.0)
    live = _token(store, "u", "team", read=True, write=False)
    info = store.disable_namespace("team")
    assert not info.enabled
    assert not store.namespace_exists("team")
    with pytest.raises(NotFound):
        store.check_access("team", "u", live, Right.READ)
    with pytest.raises(NotFound):
        _token(store, "v", "team", read=True, write=False)
    with pytest.raises(NotFound):
        store.disable_namespace("nope")
    # Created again: enabled, with its tokens; a different publicness is refused.
    assert store.add_namespace("team", 30.0, public=False).enabled
    store.check_access("team", "u", live, Right.READ)
    with pytest.raises(InvalidRequest, match="private"):
        store.add_namespace("team", 30.0, public=True)
    with pytest.raises(InvalidRequest, match="right"):
        store.add_token(
            token_id="z", namespace="team", read=False, write=False, secret_hash="h", now=1.0
        )
    listed = store.list_tokens("team")
    assert [t.token_id for t in listed] == ["t", "u"]
    assert [t.token_id for t in store.list_tokens()] == ["t", "u"]
    assert {n.name: n.public for n in store.list_namespaces()} == {
        "open": True,
        "other": False,
        "team": False,
    }


@pytest.mark.parametrize(
    ("public", "engine", "asked", "refusal"),
    [
        # Created --public --engine parity --parity 2 and disabled: each refusal names
        # what differs, the parity count too, not only the engine's name.
        (
            True,
            (1, 2),
            {"public": False, "copies": 1, "parity": 0},
            "namespace 'tmpp' already exists as public with engine parity 5+2, not private"
            " with engine raid0; ask for the same (--public --engine parity --parity 2) to"
            " enable it again",
        ),
        (
            True,
            (1, 2),
            {"public": True, "copies": 1, "parity": 1},
            "namespace 'tmpp' already exists with engine parity 5+2, not parity 5+1; ask for"
            " the same (--public --engine parity --parity 2) to enable it again",
        ),
        (
            False,
            (3, 0),
            {"public": True, "copies": 3, "parity": 0},
            "namespace 'tmpp' already exists as private, not public; ask for the same"
            " (--engine raid1 --copies 3) to enable it again",
        ),
    ],
)
def test_a_disabled_namespace_asked_for_differently_is_refused_naming_what_differs(
    store: SqlMetadataStore,
    public: bool,
    engine: tuple[int, int],
    asked: dict[str, Any],
    refusal: str,
) -> None:
    copies, parity = engine
    store.add_namespace("tmpp", 1.0, public=public, copies=copies, parity=parity)
    store.disable_namespace("tmpp")
    with pytest.raises(InvalidRequest) as refused:
        store.add_namespace("tmpp", 2.0, **asked)
    assert refused.value.message == refusal
    assert not store.namespace_exists("tmpp")  # still disabled
    info = store.add_namespace("tmpp", 3.0, public=public, copies=copies, parity=parity)
    assert info.enabled
    assert (info.public, info.copies, info.parity) == (public, copies, parity)
    # Enabled, a different request is refused the same way, without "to enable it again".
    with pytest.raises(InvalidRequest) as refused:
        store.add_namespace("tmpp", 4.0, **asked)
    head, _, _ = refusal.partition("; ask")
    assert refused.value.message == f"{head}; its access and engine never change"


def test_a_database_from_before_access_control_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE namespaces (name TEXT PRIMARY KEY, created_at REAL NOT NULL,"
        " enabled INTEGER NOT NULL DEFAULT 1)"
    )
    old.execute("INSERT INTO namespaces(name, created_at) VALUES ('default', 1.0)")
    old.commit()
    old.close()
    store = SqliteMetadataStore(path)
    (info,) = store.list_namespaces()
    assert (info.name, info.public, info.enabled) == ("default", False, True)
    with pytest.raises(Unauthorized):
        store.check_access("default", None, None, Right.READ)
    store.create_namespace("default", 2.0, public=True)  # as a start-up makes it public
    store.check_access("default", None, None, Right.WRITE)
    store.create_namespace("default", 3.0)  # a later start-up does not make it private
    store.check_access("default", None, None, Right.WRITE)
    store.close()


# -- the actors: discovery's check and the gateway's cache (virtual time) -----------------


class CountingDiscovery(Discovery):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.checks = 0

    async def check_access(self, *, namespace: str, token: str | None, right: Right) -> None:
        self.checks += 1
        await super().check_access(namespace=namespace, token=token, right=right)


@attrs.define
class Actors:
    discovery: CountingDiscovery
    gateway: Gateway


@pytest.fixture
async def actors() -> Actors:
    discovery = CountingDiscovery(
        store=SqliteMetadataStore(),
        blocking=InlineRunner(),
        clock=SimClock(),
        ids=SimIds(random.Random(1)),
        config=DiscoveryConfig(namespaces=("default", "open"), public_namespaces=("open",)),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(discovery.run)
        nursery.cancel_scope.cancel()
    gateway = Gateway(
        discovery=discovery,
        storage=None,  # type: ignore[arg-type]  # authorize never touches storage
        config=GatewayConfig(access_cache_ttl=5.0),
    )
    return Actors(discovery=discovery, gateway=gateway)


async def test_discovery_makes_tokens_that_it_checks(actors: Actors) -> None:
    d = actors.discovery
    token, info = await d.create_token(namespace="default", read=True, write=False)
    assert info == TokenInfo(
        token_id=info.token_id,
        namespace="default",
        read=True,
        write=False,
        created_at=info.created_at,
    )
    parsed = parse_token(token)
    assert parsed is not None
    assert parsed[0] == info.token_id
    await d.check_access(namespace="default", token=token, right=Right.READ)
    with pytest.raises(Forbidden):
        await d.check_access(namespace="default", token=token, right=Right.WRITE)
    for garbage in ("", "k8t_", "not a token", token + "x", token.replace("k8t_", "k8t_0")):
        with pytest.raises(Unauthorized):
            await d.check_access(namespace="default", token=garbage, right=Right.READ)
    await d.check_access(namespace="open", token=None, right=Right.WRITE)
    listed = await d.list_namespaces()
    assert {(n.name, n.public) for n in listed} == {("default", False), ("open", True)}
    with pytest.raises(NotFound):
        await d.create_token(namespace="nope", read=True, write=True)


async def test_a_revoked_token_is_refused_once_the_cache_expires(
    actors: Actors, autojump_clock: trio.testing.MockClock
) -> None:
    d, gw = actors.discovery, actors.gateway
    token, info = await d.create_token(namespace="default", read=True, write=True)
    await gw.authorize("default", token, Right.WRITE)
    await gw.authorize("default", token, Right.WRITE)
    assert d.checks == 1  # the second came from the cache
    await d.revoke_token(token_id=info.token_id)
    await trio.sleep(4.9)
    await gw.authorize("default", token, Right.WRITE)  # still cached: the documented delay
    await trio.sleep(0.2)
    with pytest.raises(Unauthorized):
        await gw.authorize("default", token, Right.WRITE)
    # Refusals are not cached: each asks again.
    checks = d.checks
    for _ in range(2):
        with pytest.raises(Unauthorized):
            await gw.authorize("default", None, Right.READ)
    assert d.checks == checks + 2


async def test_a_disabled_namespace_is_refused_once_the_cache_expires(
    actors: Actors, autojump_clock: trio.testing.MockClock
) -> None:
    d, gw = actors.discovery, actors.gateway
    await gw.authorize("open", None, Right.READ)
    await d.disable_namespace(namespace="open")
    await trio.sleep(5.0)
    with pytest.raises(NotFound):
        await gw.authorize("open", None, Right.READ)


# -- the public API on real sockets --------------------------------------------------------


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[NetDriver]:
    # Nothing public, and no cache: a revocation shows at once (the cache is tested above).
    config = attrs.evolve(net_config(), namespaces=("default", "open"), public_namespaces=("open",))
    config = attrs.evolve(config, access_cache_ttl=0.0)
    async with net_driver(tmp_path, config=config) as driver:
        yield driver


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _stored(net: NetDriver, namespace: str) -> list[str]:
    entries = await net._discovery.list_files(namespace=namespace, prefix="", after="", limit=100)
    return [e.name for e in entries]


async def test_a_private_namespace_needs_a_token(net: NetDriver) -> None:
    http, base = net._http, net._gateway
    for method in ("PUT", "GET", "HEAD", "DELETE"):
        response = await http.request(method, f"{base}/default/a.txt", content=b"x" * 100_000)
        assert response.status_code == 401, method
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="karma8"'
        if method != "HEAD":
            assert response.json()["error"]["code"] == "unauthorized"
    listing = await http.get(f"{base}/default/")
    assert listing.status_code == 401
    assert listing.headers["WWW-Authenticate"].startswith("Bearer")
    bad = await http.get(f"{base}/default/a.txt", headers=_auth("k8t_nope_nope"))
    assert bad.status_code == 401
    assert await _stored(net, "default") == []


async def test_rights_namespaces_and_revocation(net: NetDriver) -> None:
    http, base, d = net._http, net._gateway, net._discovery
    writer, _ = await d.create_token(namespace="default", read=False, write=True)
    reader, reader_info = await d.create_token(namespace="default", read=True, write=False)
    await d.create_namespace(namespace="elsewhere")
    foreign, _ = await d.create_token(namespace="elsewhere", read=True, write=True)
    url = f"{base}/default/a.txt"
    assert (await http.put(url, content=b"hello", headers=_auth(writer))).status_code == 201
    refused_put = await http.put(url, content=b"evil", headers=_auth(reader))
    assert refused_put.status_code == 403
    assert refused_put.json()["error"]["code"] == "forbidden"
    assert (await http.put(url, content=b"evil", headers=_auth(foreign))).status_code == 403
    assert (await http.delete(url, headers=_auth(reader))).status_code == 403
    assert (await http.get(url, headers=_auth(writer))).status_code == 403
    assert (await http.get(url, headers=_auth(foreign))).status_code == 403
    got = await http.get(url, headers=_auth(reader))
    assert (got.status_code, got.content) == (200, b"hello")  # nothing overwritten
    listing = await http.get(f"{base}/default/", headers=_auth(reader))
    assert [f["name"] for f in listing.json()["files"]] == ["a.txt"]
    await d.revoke_token(token_id=reader_info.token_id)
    assert (await http.get(url, headers=_auth(reader))).status_code == 401
    assert (await http.delete(url, headers=_auth(writer))).status_code == 204
    assert await _stored(net, "default") == []


async def test_unknown_and_disabled_namespaces_are_404(net: NetDriver) -> None:
    http, base, d = net._http, net._gateway, net._discovery
    token, _ = await d.create_token(namespace="default", read=True, write=True)
    missing = await http.put(f"{base}/nope/a", content=b"x", headers=_auth(token))
    assert missing.status_code == 404
    assert (await http.get(f"{base}/nope/a")).status_code == 404
    await d.disable_namespace(namespace="default")
    for method in ("PUT", "GET", "DELETE"):
        response = await http.request(method, f"{base}/default/a", headers=_auth(token))
        assert response.status_code == 404, method
    assert (await http.put(f"{base}/open/a", content=b"x")).status_code == 201


async def test_a_public_namespace_is_anonymous(net: NetDriver) -> None:
    http, base = net._http, net._gateway
    url = f"{base}/open/doc"
    assert (await http.put(url, content=b"for all")).status_code == 201
    assert (await http.get(url)).content == b"for all"
    assert (await http.get(url, headers=_auth("k8t_any_token"))).status_code == 200
    assert (await http.get(f"{base}/open/")).json()["files"][0]["name"] == "doc"
    assert (await http.delete(url)).status_code == 204


async def test_discovery_namespace_and_token_routes(net: NetDriver) -> None:
    d, internal = net._discovery, net._internal
    created = await d.create_namespace(namespace="pub", public=True)
    assert created.public
    assert (await d.create_namespace(namespace="pub", public=True)) == created  # idempotent
    token, info = await d.create_token(namespace="pub", read=True, write=False)
    tokens = await d.list_tokens(namespace="pub")
    assert tokens == [info]
    raw = await internal.get(f"{net._discovery_url}/v1/tokens")
    assert token.split("_")[2] not in raw.text
    bad = await internal.post(
        f"{net._discovery_url}/v1/tokens", json={"namespace": "pub", "read": "yes"}
    )
    assert bad.status_code == 400
    none = await internal.post(
        f"{net._discovery_url}/v1/tokens", json={"namespace": "pub", "read": False, "write": False}
    )
    assert none.status_code == 400
    unknown_arg = await internal.get(f"{net._discovery_url}/v1/tokens?namespce=pub")
    assert unknown_arg.status_code == 400
    # A namespace is for good: a body that is not what it should be makes none.
    for body in (b'{"public": true', b'{"engin": "raid1"}', b"[]", b"true"):
        refused = await internal.put(f"{net._discovery_url}/v1/namespaces/typo", content=body)
        assert refused.status_code == 400, body
    assert "typo" not in {n.name for n in await d.list_namespaces()}
    plain = await internal.put(f"{net._discovery_url}/v1/namespaces/plain")  # no body
    assert (plain.status_code, plain.json()["public"]) == (200, False)


# -- the commands ----------------------------------------------------------------------


async def _karma8(net: NetDriver, *args: str) -> int:
    at = ["--discovery", net._discovery_url, "--secret", net._config.secret or ""]
    status: int = await trio.to_thread.run_sync(main, [*args, *at])
    return status


async def test_namespace_and_token_commands(
    net: NetDriver, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _karma8(net, "namespace", "create", "team") == 0
    assert "team" in capsys.readouterr().out
    assert await _karma8(net, "namespace", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert {n["name"]: n["public"] for n in listed} == {
        "default": False,
        "open": True,
        "team": False,
    }
    assert await _karma8(net, "token", "create", "team", "--read") == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert parse_token(token) is not None
    assert "not shown again" in err
    await net._discovery.check_access(namespace="team", token=token, right=Right.READ)
    assert await _karma8(net, "token", "list", "team") == 0
    table = capsys.readouterr().out
    token_id = token.split("_")[1]
    assert token_id in table
    assert token.split("_")[2] not in table
    assert "read" in table
    assert await _karma8(net, "token", "revoke", token_id, "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["revoked_at"] is not None
    with pytest.raises(Unauthorized):
        await net._discovery.check_access(namespace="team", token=token, right=Right.READ)
    assert await _karma8(net, "namespace", "disable", "team") == 0
    assert "disabled" in capsys.readouterr().out


async def test_a_disabled_namespace_is_enabled_by_asking_for_it_as_it_was(
    net: NetDriver, capsys: pytest.CaptureFixture[str]
) -> None:
    made = ["namespace", "create", "tmpp", "--public", "--engine", "parity"]
    assert await _karma8(net, *made, "--parity", "2") == 0
    assert await _karma8(net, "namespace", "disable", "tmpp") == 0
    capsys.readouterr()
    for asked in (["namespace", "create", "tmpp"], made):
        assert await _karma8(net, *asked) == 1
        err = capsys.readouterr().err
        assert "ask for the same (--public --engine parity --parity 2) to enable it" in err
    assert "with engine parity 5+2, not parity 5+1;" in err
    assert await _karma8(net, *made, "--parity", "2") == 0
    assert "tmpp  public (anyone reads and writes)  enabled" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        (["token", "create", "default"], 2, "give --read, --write or both"),
        (["token", "create", "nope", "--read"], 1, "namespace 'nope' does not exist"),
        (["token", "revoke", "nope"], 1, "token 'nope' does not exist"),
        (["token", "list", "nope"], 1, "namespace 'nope' does not exist"),
        # Malformed input is a usage error, refused before anything is asked (exit 2).
        (["namespace", "create", "bad name"], 2, "invalid namespace"),
        (["namespace", "create", "p3", "--engine", "parity", "--parity", "3"], 2, "not 3"),
        (["namespace", "create", "r1", "--parity", "1"], 2, "raid0 takes no parity"),
        (["token", "list", "Bad"], 2, "invalid namespace"),
        (["stat", "Bad/x"], 2, "invalid namespace"),
        (["stat", "default"], 2, "expected namespace/name"),
        (["namespace", "create", "open"], 1, "already exists as public, not private"),
        (["namespace", "disable", "nope"], 1, "does not exist"),
    ],
)
async def test_commands_refuse_bad_input_clearly(
    net: NetDriver, capsys: pytest.CaptureFixture[str], args: list[str], status: int, needle: str
) -> None:
    assert await _karma8(net, *args) == status
    out, err = capsys.readouterr()
    assert out == ""
    assert needle in err.lower()
    assert "Traceback" not in err
    if status == 2:  # refused before the cluster is looked for (which says where it found it)
        assert "karma8: cluster" not in err


def test_commands_say_when_discovery_is_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        args = ["token", "list", "--discovery", f"http://127.0.0.1:{port}", "--secret", "s"]
        assert main(args) == 1
    assert "cannot reach discovery at" in capsys.readouterr().err


async def test_a_service_of_the_wrong_role_is_named(
    net: NetDriver, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The gateway's URL given as discovery's, and discovery's as the gateway's: each answer
    # alone ("namespace 'v1' does not exist", "wrong cluster secret") would mislead.
    at = ["--discovery", net._gateway, "--secret", net._config.secret or ""]
    assert await trio.to_thread.run_sync(main, ["nodes", *at]) == 1
    err = capsys.readouterr().err
    assert f"{net._gateway} is a karma8 gateway, not the discovery" in err
    (tmp_path / "f").write_bytes(b"x")
    put = ["put", str(tmp_path / "f"), "default/f", "--gateway", net._discovery_url]
    assert await trio.to_thread.run_sync(main, put) == 1
    assert f"{net._discovery_url} is a karma8 discovery, not the gateway" in capsys.readouterr().err
    assert await _karma8(net, "stat", "default/nope") == 1  # the right role: no such line
    assert "is a karma8" not in capsys.readouterr().err


async def test_a_gateway_with_a_wrong_secret_stops(net: NetDriver, tmp_path: Path) -> None:
    # As a node does: serving, it would answer every client 403 for discovery's refusal.
    args = ["serve", "--role", "gw", "--port", "0", "--workers", "1", "--secret", "wrong"]
    with trio.fail_after(60):  # a guard against a hang, not a wait
        done = await trio.run_process(
            [sys.executable, "-m", "karma8.cli", *args, "--discovery", net._discovery_url],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=tmp_path,
        )
    assert done.returncode == 1
    err = done.stderr.decode()
    assert "discovery refused this gateway: missing or wrong cluster secret" in err
    assert "Traceback" not in err
