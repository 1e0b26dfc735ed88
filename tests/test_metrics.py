"""``GET /metrics`` on every role, scraped and parsed with prometheus-client's own parser: the
counters and histograms move with the requests made, the states read at scrape time are
there, and the internal roles want the secret."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from drivers import NetDriver, net_driver

GATEWAY = {"role": "gateway", "route": "/{namespace}/{name}"}


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[NetDriver]:
    async with net_driver(tmp_path / "cluster") as driver:
        yield driver


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(net: NetDriver, url: str | None = None, *, secret: bool = False) -> Samples:
    client = net._internal if secret else net._http
    response = await client.get(f"{url or net._gateway}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_request_metrics_move_with_requests(net: NetDriver) -> None:
    before = await scrape(net)
    for i in range(3):
        await net.put(f"m/{i}", b"z" * 1000)
    for i in range(3):
        assert await net.get(f"m/{i}") == b"z" * 1000
    missing = await net._http.get(f"{net._gateway}/default/m/none")
    assert missing.status_code == 404
    after = await scrape(net)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("karma8_http_requests_total", **GATEWAY, method="PUT", status="201") == 3
    assert grew("karma8_http_requests_total", **GATEWAY, method="GET", status="200") == 3
    assert grew("karma8_http_requests_total", **GATEWAY, method="GET", status="404") == 1
    assert grew("karma8_http_received_bytes_total", **GATEWAY) == 3000
    assert grew("karma8_http_sent_bytes_total", **GATEWAY) >= 3000  # the bodies, and 404's
    count = "karma8_http_request_duration_seconds_count"
    assert grew(count, **GATEWAY, method="PUT") == 3
    infinite = "karma8_http_request_duration_seconds_bucket"
    assert grew(infinite, **GATEWAY, method="PUT", le="+Inf") == 3
    assert grew("karma8_gateway_puts_total") == 3
    assert grew("karma8_gateway_gets_total") == 3
    assert value(after, "karma8_gateway_uploads_in_flight") == 0


async def test_cluster_states_are_read_when_scraped(net: NetDriver) -> None:
    await net.put("s/a", b"a" * 5000)
    await net.put("s/b", b"b" * 7000)
    samples = await scrape(net, net._discovery_url, secret=True)
    nodes = {dict(labels)["node"] for name, labels in samples if name == "karma8_node_used_bytes"}
    assert len(nodes) == 6
    assert value(samples, "karma8_files") == 2
    assert value(samples, "karma8_file_bytes") == 12000
    assert value(samples, "karma8_pending_uploads") == 0
    assert sum(v for (n, _), v in samples.items() if n == "karma8_node_used_bytes") == 12000
    for node in nodes:
        assert value(samples, "karma8_node_state", node=node, state="available") == 1
        assert value(samples, "karma8_node_state", node=node, state="unavailable") == 0
    assert value(samples, "karma8_discovery_sweeps_total") >= 0
    # The embedded cluster is one process: its nodes' counts are in the same registry.
    scrubbed = [n for n, _ in samples if n == "karma8_storage_scrubbed_parts_total"]
    assert len(scrubbed) == 6


async def test_internal_roles_want_the_secret(net: NetDriver) -> None:
    answer = await net._http.get(f"{net._discovery_url}/metrics")
    assert answer.status_code == 401
    bearer = {"Authorization": f"Bearer {net._config.secret}"}
    assert (await net._http.get(f"{net._discovery_url}/metrics", headers=bearer)).status_code == 200
