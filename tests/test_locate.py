"""How commands find the cluster (karma8/net/locate.py), and the warnings of a discovery
client that cannot reach discovery."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from karma8.core.errors import Unavailable
from karma8.core.tomlconf import ConfigError
from karma8.net.clients import HttpDiscoveryClient
from karma8.net.locate import ClusterInfo, ClusterRef, locate_cluster, write_cluster_info


def cluster_file(directory: Path, discovery: str, secret: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    info = ClusterInfo(gateway="http://gw", discovery=discovery, secret=secret, data_dir="x")
    write_cluster_info(directory, info)
    return directory / "cluster.json"


def locate(tmp_path: Path, **kwargs: Any) -> ClusterRef:
    """locate_cluster with nothing given, and ``./karma8-data`` in ``tmp_path/cwd``."""
    given: dict[str, Any] = {"discovery": None, "secret": None, "environ": {}, **kwargs}
    return locate_cluster(default_data=tmp_path / "cwd" / "karma8-data", **given)


def test_the_order_flag_env_config_data_parent_cwd(tmp_path: Path) -> None:
    cwd_file = cluster_file(tmp_path / "cwd" / "karma8-data", "http://cwd", "s-cwd")
    parent_file = cluster_file(tmp_path / "cluster", "http://parent", "s-parent")
    node = tmp_path / "cluster" / "node"
    env = {"KARMA8_DISCOVERY": "http://env"}
    config = {"config_path": Path("k.toml"), "config_url": "http://config"}
    everything = {"discovery": "http://flag", "environ": env, "data": node, **config}

    assert locate(tmp_path, **everything).discovery_from == "--discovery"
    assert locate(tmp_path, **{**everything, "discovery": None}).discovery == "http://env"
    ref = locate(tmp_path, data=node, **config)
    assert (ref.discovery, ref.discovery_from) == ("http://config", "discovery_url in k.toml")
    ref = locate(tmp_path, data=node)
    assert (ref.discovery, ref.secret) == ("http://parent", "s-parent")
    assert ref.discovery_from == ref.secret_from == str(parent_file)
    own_file = cluster_file(node, "http://own", "s-own")
    assert locate(tmp_path, data=node).discovery_from == str(own_file)
    ref = locate(tmp_path)
    assert (ref.discovery, ref.discovery_from) == ("http://cwd", str(cwd_file))


def test_a_stale_file_in_the_working_directory_loses_to_the_data_dirs_parent(
    tmp_path: Path,
) -> None:
    cluster_file(tmp_path / "cwd" / "karma8-data", "http://127.0.0.1:1", "stale")
    parent = cluster_file(tmp_path / "live", "http://127.0.0.1:8090", "live")
    ref = locate(tmp_path, data=tmp_path / "live" / "storage-extra")
    assert ref.describe() == f"cluster http://127.0.0.1:8090 (from {parent}, with its secret)"
    # A --data naming no cluster (a typo) does not fall back on the working directory's.
    with pytest.raises(ConfigError, match="cluster"):
        locate(tmp_path, data=tmp_path / "typo" / "storage-extra")


def test_the_secret_follows_its_own_order_and_never_crosses_clusters(tmp_path: Path) -> None:
    cluster_file(tmp_path / "cwd" / "karma8-data", "http://a:8090/", "secret-a")
    env = {"KARMA8_SECRET": "from-env"}
    ref = locate(tmp_path, discovery="http://a:8090", secret="flag", environ=env)
    assert (ref.secret, ref.secret_from) == ("flag", "--secret")
    ref = locate(tmp_path, discovery="http://a:8090", environ=env, config_secret="file")
    assert ref.describe() == "cluster http://a:8090 (from --discovery; secret from $KARMA8_SECRET)"
    ref = locate(tmp_path, discovery="http://a:8090", config_secret="file")
    assert (ref.secret, ref.secret_from) == ("file", "secret in the config file")
    # A URL given otherwise takes the secret of a cluster.json naming the same discovery...
    assert locate(tmp_path, discovery="http://a:8090").secret == "secret-a"
    # ...and no other cluster's.
    ref = locate(tmp_path, discovery="http://b:8090")
    assert (ref.secret, ref.describe()) == (
        None,
        "cluster http://b:8090 (from --discovery; no secret)",
    )


def test_nothing_found_or_a_broken_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot find the cluster.*--discovery") as caught:
        locate(tmp_path, data=tmp_path / "nodes" / "n0")
    assert str(tmp_path / "nodes" / "cluster.json") in str(caught.value)
    broken = tmp_path / "cwd" / "karma8-data"
    broken.mkdir(parents=True)
    for text, problem in [("{", "Expecting"), ("[]", "JSON object"), ("{}", "no 'gateway' key")]:
        (broken / "cluster.json").write_text(text)
        with pytest.raises(
            ConfigError, match=f"cluster.json: not a karma8 cluster file.*{problem}"
        ):
            locate(tmp_path)
        # Looked at only for a secret, a broken file does not stand in the way of a given URL.
        assert locate(tmp_path, discovery="http://x").secret is None


async def test_a_discovery_client_warns_while_it_cannot_reach_discovery(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    answers = iter([False] * 8 + [True])

    def handler(request: httpx.Request) -> httpx.Response:
        if next(answers):
            return httpx.Response(200, json={"nodes": []})
        raise httpx.ConnectError("refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = HttpDiscoveryClient(http, "http://d:1", origin="--discovery", warn_every=5.0)
        with caplog.at_level(logging.WARNING, logger="karma8.net.clients"):
            for _ in range(8):  # one attempt a second, as a registering node makes
                with pytest.raises(Unavailable):
                    await client.list_nodes()
                await trio.sleep(1.0)
            assert await client.list_nodes() == []
    # The first failure, one reminder five seconds on (not one per attempt), the recovery.
    where = "discovery at http://d:1 (from --discovery)"
    failure = "GET http://d:1/v1/nodes: ConnectError"
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot reach {where}: {failure}",
        f"still cannot reach {where}, for 5 s: {failure}",
        f"{where} answers again",
    ]
    assert {r.levelno for r in caplog.records} == {logging.WARNING}


def test_several_discovery_urls_from_the_flag_the_environment_or_the_file(
    tmp_path: Path,
) -> None:
    from karma8.net.settings import load_net_config

    ref = locate(tmp_path, discovery="http://a:8090, http://b:8090/,http://a:8090")
    assert ref.discovery == "http://a:8090,http://b:8090"
    assert ref.urls == ("http://a:8090", "http://b:8090")
    assert ref.describe() == "cluster http://a:8090, http://b:8090 (from --discovery; no secret)"
    ref = locate(tmp_path, environ={"KARMA8_DISCOVERY": "http://a:1,http://b:2"})
    assert (ref.urls, ref.discovery_from) == (("http://a:1", "http://b:2"), "$KARMA8_DISCOVERY")
    # A cluster.json naming one of them lends its secret.
    cluster_file(tmp_path / "cwd" / "karma8-data", "http://b:8090", "secret-b")
    assert locate(tmp_path, discovery="http://a:8090,http://b:8090").secret == "secret-b"
    with pytest.raises(ConfigError, match="expected http://HOST:PORT"):
        locate(tmp_path, discovery="http://a:8090,b:8090")
    with pytest.raises(ConfigError, match="no discovery URL"):
        locate(tmp_path, discovery=" , ")

    path = tmp_path / "k.toml"
    path.write_text('discovery_url = ["http://a:8090", "http://b:8090/"]\n')
    assert load_net_config(path, {}).discovery_url == "http://a:8090,http://b:8090"
    path.write_text('discovery_url = "http://a:8090,http://b:8090"\n')
    assert load_net_config(path, {}).discovery_url == "http://a:8090,http://b:8090"
    for bad, problem in [("[1, 2]", "a URL or a list of URLs"), ('"ftp://x"', "http://HOST")]:
        path.write_text(f"discovery_url = {bad}\n")
        with pytest.raises(ConfigError, match=rf"k.toml:1: discovery_url: .*{problem}"):
            load_net_config(path, {})
