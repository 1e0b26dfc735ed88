"""The ports: every capability an actor needs from the world, as a typing.Protocol.

Actors receive implementations of these in their constructors and never learn which world
provides them. ``karma8.sim`` implements them with in-memory, virtual-time, fault-injecting
adapters; ``karma8.net`` with HTTP clients, real files and real time. The metadata store
(``karma8.metadata``) is on SQLite in both worlds, or on PostgreSQL in net mode; what differs
is the :class:`BlockingRunner` that runs its calls (inline in the simulator; in net, inline
with commits made durable in shared log syncs, see ``karma8.net.metasync``, or in worker
threads for PostgreSQL).

One module per concept: :mod:`~karma8.ports.services` (the actors' services to one
another), :mod:`~karma8.ports.disk` (a node's disk), :mod:`~karma8.ports.metadata`
(discovery's durable state), :mod:`~karma8.ports.runtime` (time, ids, blocking calls). Every
protocol is named here, and callers import them from here.
"""

from __future__ import annotations

from karma8.ports.disk import (
    LendingStore,
    PartStore,
    PartWriter,
    PendingWrite,
    StepRunner,
    WholePartStore,
)
from karma8.ports.metadata import MetadataStore
from karma8.ports.runtime import BlockingRunner, Clock, IdSource, MetadataRunner
from karma8.ports.services import (
    Appended,
    DiscoveryAPI,
    LendingStorage,
    Loan,
    RebalanceAPI,
    StorageAPI,
    StoredPart,
    WholeParts,
    WholePartWriter,
)

__all__ = [
    "Appended",
    "BlockingRunner",
    "Clock",
    "DiscoveryAPI",
    "IdSource",
    "LendingStorage",
    "LendingStore",
    "Loan",
    "MetadataRunner",
    "MetadataStore",
    "PartStore",
    "PartWriter",
    "PendingWrite",
    "RebalanceAPI",
    "StepRunner",
    "StorageAPI",
    "StoredPart",
    "WholePartStore",
    "WholePartWriter",
    "WholeParts",
]
