"""Where discovery last heard each storage node from: one process serves a node, and one node
answers at an address.

Theory of operation
-------------------
A node names, in every registration and heartbeat, its place (host, device and inode of its
data directory) and its address. Readers are sent to a node's address for its parts, so two
mix-ups would send them to the wrong process: two processes serving one node id (a copy of its
directory, started beside it) and two node ids at one address (a node whose disk was wiped
came back under a new id on the old one's port). :class:`HeardNodes` refuses either while the
other side was heard within ``node_timeout``; past that the newcomer wins, as the other is
taken for gone. A node restarted in place (same directory) is the same place whatever its
address, and a node heard at a new address frees its old one at once. What is heard lives in
the memory of one discovery instance: a restarted one refuses nothing it has not heard itself.
"""

from __future__ import annotations

from karma8.core.errors import NodeConflict
from karma8.core.model import NodeRegistration


class HeardNodes:
    """The place each node id, and the node id each address, was last heard from, and when."""

    def __init__(self, node_timeout: float) -> None:
        self.node_timeout = node_timeout
        self._places: dict[str, tuple[str, float]] = {}  # node id -> (place, heard at)
        self._addresses: dict[str, tuple[str, float]] = {}  # address -> (node id, heard at)
        self._urls: dict[str, str] = {}  # node id -> the address it was last heard at

    def hear(self, registration: NodeRegistration, now: float) -> None:
        """Record ``registration`` as heard at ``now``, or raise NodeConflict (and record
        nothing) if its id was heard from another place, or its address from another node id,
        within ``node_timeout``."""
        node_id, url, place = registration.node_id, registration.url, registration.place
        held = self._places.get(node_id)
        if place is not None and held is not None and held[0] != place and self._recent(held, now):
            raise NodeConflict(
                f"node {node_id} is served from another place ({held[0]}), heard"
                f" {now - held[1]:.1f} s ago: a copy of its directory? One process serves a"
                f" node; if that one is gone, start this one again after {self.node_timeout:g} s"
            )
        other = self._addresses.get(url)
        if other is not None and other[0] != node_id and self._recent(other, now):
            raise NodeConflict(
                f"node {other[0]} is served at {url}, heard {now - other[1]:.1f} s ago: node"
                f" {node_id} cannot take its address. One node answers at an address; if that"
                f" one is gone from it, start this one again after {self.node_timeout:g} s"
            )
        if place is not None:
            self._places[node_id] = (place, now)
        # Restarted on another port: its old address is free at once, unless another node
        # has taken it since.
        moved_from = self._urls.get(node_id)
        if moved_from not in (None, url) and self._addresses.get(moved_from, ("",))[0] == node_id:
            del self._addresses[moved_from]
        self._addresses[url] = (node_id, now)
        self._urls[node_id] = url

    def drop(self, node_id: str) -> None:
        """Forget where ``node_id`` was heard: it refuses nobody from now on (a node the
        operator forgot, whose address a new node may take at once)."""
        self._places.pop(node_id, None)
        url = self._urls.pop(node_id, None)
        if url is not None and self._addresses.get(url, ("", 0.0))[0] == node_id:
            del self._addresses[url]

    def forget_silent(self, now: float) -> None:
        """Drop the addresses not heard from within ``node_timeout`` (they refuse nobody)."""
        self._addresses = {u: h for u, h in self._addresses.items() if self._recent(h, now)}

    def _recent(self, heard: tuple[str, float], now: float) -> bool:
        return now - heard[1] < self.node_timeout
