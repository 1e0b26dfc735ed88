"""The rebalancer's ETA: estimated only while parts move, as the docs say (``null`` without
a rate, ``0`` when nothing remains). The rate of past moves decays but stays above zero for
long after the last one; an estimate from it while nothing moves is a number about
nothing."""

from __future__ import annotations

from typing import Any, cast

import attrs
import trio
import trio.testing

from karma8.actors.rebalancer import Rebalancer, RebalancerConfig
from karma8.core.model import RebalanceStatus

IDLE = RebalanceStatus(
    spread_pp=3.0,
    imbalance_pp=2.0,
    remaining_bytes=6000,
    moving_bytes=0,
    moving_parts=0,
    moved_bytes=2000,
    moved_parts=2,
)


class Discovery:
    def __init__(self) -> None:
        self.status = IDLE

    async def rebalance_status(self) -> RebalanceStatus:
        return self.status


async def test_the_eta_is_null_while_nothing_moves_and_zero_when_nothing_remains(
    autojump_clock: trio.testing.MockClock,
) -> None:
    discovery = Discovery()
    rebalancer = Rebalancer(
        discovery=cast(Any, discovery), storage=cast(Any, None), config=RebalancerConfig()
    )
    assert (await rebalancer.status()).eta_seconds is None  # no rate yet
    for _ in range(3):  # two moves of 1000 bytes done a second apart: a rate of 1000 B/s
        rebalancer._throttle.done(1000)
        await trio.sleep(1.0)
    await trio.sleep(60.0)  # and then nothing for a minute
    status = await rebalancer.status()
    assert status.rate_bytes_per_s > 0  # (it decays, but is measured)
    assert status.eta_seconds is None
    discovery.status = attrs.evolve(IDLE, moving_parts=1, moving_bytes=1000)
    status = await rebalancer.status()
    assert status.eta_seconds == 6000 / status.rate_bytes_per_s
    discovery.status = attrs.evolve(IDLE, remaining_bytes=0)
    assert (await rebalancer.status()).eta_seconds == 0.0
