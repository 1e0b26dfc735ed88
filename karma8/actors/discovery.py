"""The discovery actor: namespaces and their tokens, storage nodes, file versions and their
parts.

Discovery is the one place that decides where parts go and which version of a file is current.
Uploads are two-phase: :meth:`Discovery.begin_upload` creates a PENDING version with its
placement (invisible to readers), :meth:`Discovery.commit_upload` makes it current in one
transaction. A pending version that is neither committed nor aborted before ``upload_ttl``
expires (its gateway died) is aborted by the sweeper; storage nodes learn about garbage parts
in heartbeat replies and delete them.

A small upload (:meth:`Discovery.place_upload`) writes nothing down until its commit: its
placement is a lease in memory (:mod:`karma8.core.leases`) whose bytes count as reserved and
whose part keys count as known to the nodes' orphan checks until it is committed, aborted or
expires. Its commit is then the upload's one transaction.

Nodes are never deleted. A node that misses heartbeats for ``node_timeout`` becomes
UNAVAILABLE (no new parts) until it heartbeats again. The operator may forget an UNAVAILABLE
node for good (:meth:`Discovery.forget_node`: a dead disk): it becomes FORGOTTEN, its parts
are lost at once (repair rebuilds the redundant ones), and its id is refused from then on.
A node a gateway reports failing (:meth:`Discovery.report_node_failure`) becomes SUSPECT at
once, also without new parts, until a heartbeat arrives ``suspect_for`` seconds or more after
the report: a node that keeps failing is never chosen on the strength of a heartbeat sent
just before the failure.

Several discovery instances may share one database (PostgreSQL): the store keeps placement and
commits correct between them, and a leadership lease in the store (:meth:`Discovery.lead`)
lets one of them at a time run the store-wide sweep, the rebalancer and repair.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

import attrs
import trio

from karma8.actors.movedesk import MoveDesk
from karma8.actors.namespaces import NamespaceDesk
from karma8.core.errors import (
    InvalidRequest,
    NodeForgotten,
    NotFound,
    TooLarge,
    Unavailable,
    UploadConflict,
)
from karma8.core.heard import HeardNodes
from karma8.core.layout import (
    DEFAULT_MAX_FILE_SIZE,
    MAX_COPIES,
    MAX_PARITY,
    StripeLayout,
)
from karma8.core.leases import Lease, PlacementLeases
from karma8.core.model import (
    ClusterTotals,
    FileEntry,
    FileVersion,
    NodeArrival,
    NodeRegistration,
    NodeState,
    NodeStatus,
    PartPlacement,
    PartReceipt,
    VersionState,
)
from karma8.core.names import check_name, check_namespace
from karma8.core.placement import NodeLoad, place_parts
from karma8.ports import Clock, IdSource, MetadataRunner, MetadataStore

log = logging.getLogger("karma8.discovery")
MAX_LIST_LIMIT = 1000


@attrs.frozen(kw_only=True)
class DiscoveryConfig:
    """Discovery's tunables (seconds and bytes)."""

    layout: StripeLayout = attrs.Factory(StripeLayout)
    upload_ttl: float = 3600.0
    # How long a small upload's placement (place_upload) holds, and never longer than
    # upload_ttl: its parts must be written and committed within it. Its keys are known to
    # the nodes' orphan checks until then; a dead gateway's parts are orphans from its end on.
    placement_lease: float = 60.0
    node_timeout: float = 10.0
    # A node reported failing gets no new parts until it heartbeats this long after the
    # report: two of the nodes' default heartbeat intervals, so one heartbeat sent before the
    # failure (or racing the report) cannot clear it, and a healthy node is back within
    # ~3 heartbeats.
    suspect_for: float = 4.0
    retire_grace: float = 60.0
    sweep_interval: float = 5.0
    # How long a leadership lease (the sweeper's, the rebalancer's) lasts unless renewed; the
    # holder renews it every sweep, so it must outlast a few sweep intervals (and the clock
    # skew between instances sharing a database).
    leader_lease: float = 15.0
    garbage_batch: int = 1000
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    # At begin, nodes reserve room for at most this many bytes of a file's size hint; the
    # gateway reserves the rest as bytes arrive (extend_upload), so a client that announces a
    # huge Content-Length and then stalls holds little. Placement still needs room for all.
    reserve_step: int = 64 << 20
    namespaces: tuple[str, ...] = ("default",)
    # Those of ``namespaces`` anyone may read and write without a token (made public at
    # start-up if they were not).
    public_namespaces: tuple[str, ...] = ()


class Discovery(NamespaceDesk):
    """Implements :class:`karma8.ports.DiscoveryAPI` over a :class:`MetadataStore` (its
    namespaces and tokens in :class:`NamespaceDesk`)."""

    def __init__(
        self,
        *,
        store: MetadataStore,
        blocking: MetadataRunner,
        clock: Clock,
        ids: IdSource,
        config: DiscoveryConfig,
        leases: PlacementLeases | None = None,
        instance: str = "discovery",
    ) -> None:
        self._store = store
        # This process among the discovery instances sharing the store (leadership leases).
        self.instance = instance
        self._blocking = blocking
        self._clock = clock
        self._ids = ids
        self.config = config
        # In memory only: a restarted discovery forgets them (their commits are refused).
        self.leases = PlacementLeases() if leases is None else leases
        # Parts of small uploads whose lease ended uncommitted (expired: their gateway died;
        # or aborted), per node: handed to the nodes as garbage with their heartbeats, as an
        # aborted version's parts are, until a node reports them deleted. In memory: after a
        # restart the nodes' orphan check collects them instead (after orphan_grace).
        self._expired_parts: dict[str, set[str]] = {}
        self._heard = HeardNodes(self.config.node_timeout)  # one node per process and address
        # Plain counts since start, for the operator's metrics (the net layer reads them).
        self.counts = {"sweeps": 0, "expired_uploads": 0, "expired_placements": 0}
        self._engines: dict[str, tuple[int, int]] = {}  # namespace -> (copies, parity)
        # What the rebalancer and repair ask for (karma8.ports.RebalanceAPI).
        self.moves = MoveDesk(
            store=store,
            blocking=blocking,
            clock=clock,
            leases=self.leases,
            parts=config.layout.parts,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Create the configured namespaces, then sweep until cancelled."""
        now = self._clock.now()
        for namespace in self.config.namespaces:
            check_namespace(namespace)
            await self._blocking(partial(self._ensure_namespace, namespace, now))
        task_status.started()
        while True:
            await trio.sleep(self.config.sweep_interval)
            try:
                await self.sweep()
            except Unavailable as exc:  # a shared database out of reach: the next one
                log.warning("sweep skipped: %s", exc)

    def _collect(self, lease: Lease) -> None:
        """Hand the parts of a lease that ended uncommitted to their nodes as garbage."""
        for node_id, key in lease.placed_keys():
            self._expired_parts.setdefault(node_id, set()).add(key)

    def _ensure_namespace(self, namespace: str, now: float) -> None:
        public = namespace in self.config.public_namespaces
        self._store.create_namespace(namespace, now, public=public)

    async def lead(self, role: str) -> bool:
        """Take or renew the leadership lease of ``role`` (``sweeper``, ``rebalancer``): True
        while this instance is the one of those sharing the store that runs it."""
        now = self._clock.now()
        until = now + self.config.leader_lease
        return await self._blocking(
            lambda: self._store.hold_leadership(role, self.instance, now=now, until=until)
        )

    async def sweep(self) -> None:
        """Drop this instance's expired placement leases; if it leads the sweep, abort
        expired uploads and part moves and mark silent nodes unavailable (idempotent)."""
        now = self._clock.now()
        self._heard.forget_silent(now)
        ended = self.leases.expire_leases(now)
        if ended:
            log.info("%d placement leases expired", len(ended))
            self.counts["expired_placements"] += len(ended)
            for lease in ended:
                self._collect(lease)
        if not await self.lead("sweeper"):
            return
        self.counts["expired_uploads"] += await self._blocking(
            lambda: self._store.expire_pending(now)
        )
        await self._blocking(lambda: self._store.expire_moves(now))
        stale_before = now - self.config.node_timeout
        gone = await self._blocking(lambda: self._store.mark_stale_nodes(stale_before))
        for node_id in gone:
            log.warning(
                "node %s is unavailable: no heartbeat for over %g s (no new parts go there;"
                " its files' reads go around it or fail until it is back)",
                node_id,
                self.config.node_timeout,
            )
        self.counts["sweeps"] += 1

    # -- files ----------------------------------------------------------------------------

    async def begin_upload(
        self, *, namespace: str, name: str, size_hint: int | None, if_absent: bool = False
    ) -> FileVersion:
        check_namespace(namespace)
        check_name(name)
        if size_hint is not None:
            if size_hint < 0:
                raise InvalidRequest("size must not be negative")
            if size_hint > self.config.max_file_size:
                raise TooLarge(
                    f"{size_hint} bytes is more than the limit of {self.config.max_file_size}"
                )
        layout = await self._layout_for(namespace)
        part_size = max(layout.part_sizes(size_hint or 0))
        version_id = self._ids.new_version_id()
        now = self._clock.now()

        def place(loads: Sequence[NodeLoad]) -> Sequence[str]:
            return place_parts(
                self.leases.with_held(loads),
                count=layout.slots,
                part_size=part_size,
                salt=version_id,
            )

        return await self._blocking(
            lambda: self._store.begin_version(
                version_id=version_id,
                namespace=namespace,
                name=name,
                layout=layout,
                size_hint=size_hint,
                now=now,
                expires_at=now + self.config.upload_ttl,
                if_absent=if_absent,
                place=place,
                reserve_size=self.config.reserve_step,
            )
        )

    async def commit_upload(
        self,
        *,
        version_id: str,
        size: int,
        receipts: Sequence[PartReceipt],
        if_absent: bool = False,
    ) -> FileVersion:
        now = self._clock.now()

        def commit() -> FileVersion:
            # The lease is taken in the same step as the transaction: no moment in between
            # when its parts are neither leased nor named by a row (an orphan check's answer).
            if not self.leases.holds(version_id):
                return self._store.commit_version(
                    version_id=version_id,
                    size=size,
                    receipts=receipts,
                    now=now,
                    if_absent=if_absent,
                )
            lease = self.leases.get(version_id, now)
            self.leases.drop(version_id)
            if lease is None:
                raise UploadConflict(f"upload {version_id}: its placement lease expired")
            if size != lease.size:
                raise InvalidRequest(
                    f"upload {version_id} was placed for {lease.size} bytes, not {size}"
                )
            return self._store.commit_placed(
                version_id=version_id,
                namespace=lease.namespace,
                name=lease.name,
                layout=lease.layout,
                nodes=lease.nodes,
                size=size,
                receipts=receipts,
                created_at=lease.created_at,
                now=now,
                if_absent=if_absent,
            )

        return await self._blocking(commit)

    async def abort_upload(self, *, version_id: str) -> FileVersion:
        now = self._clock.now()
        lease = self.leases.drop(version_id)
        if lease is not None:
            # The gateway deletes the parts it wrote; a node it cannot reach now gets them
            # as garbage once it heartbeats again, as an aborted version's parts.
            self._collect(lease)
            await trio.lowlevel.checkpoint()
            return attrs.evolve(lease.pending_version(), state=VersionState.ABORTED)
        return await self._blocking(lambda: self._store.abort_version(version_id, now))

    async def place_upload(
        self, *, namespace: str, name: str, size: int, if_absent: bool = False
    ) -> FileVersion:
        check_namespace(namespace)
        check_name(name)
        if size < 0:
            raise InvalidRequest("size must not be negative")
        if size > self.config.max_file_size:
            raise TooLarge(f"{size} bytes is more than the limit of {self.config.max_file_size}")
        layout = await self._layout_for(namespace)
        sizes = layout.slot_sizes(size)
        version_id = self._ids.new_version_id()

        def place() -> Lease:
            view = self._store.placement_view(namespace, name, if_absent=if_absent)
            urls = {load.node_id: url for load, url in view}
            chosen = place_parts(
                self.leases.with_held([load for load, _ in view]),
                count=layout.slots,
                part_size=max(sizes),
                salt=version_id,
            )
            now = self._clock.now()
            lease = Lease(
                version_id=version_id,
                namespace=namespace,
                name=name,
                layout=layout,
                size=size,
                nodes=tuple(chosen),
                urls=tuple(urls[n] for n in chosen),
                reserved=sizes,
                created_at=now,
                expires_at=now + min(self.config.placement_lease, self.config.upload_ttl),
            )
            self.leases.grant(lease)
            return lease

        # At once, durable or not: a lease lives in this process's memory only, so a crash
        # that takes back a commit placement saw also takes the lease; its commit checks again.
        return (await self._blocking.read_ahead(place)).pending_version()

    async def replace_part(
        self, *, version_id: str, index: int, failed_node_id: str
    ) -> PartPlacement:
        if not 0 <= index < self.config.layout.parts * MAX_COPIES + MAX_PARITY:
            raise InvalidRequest(f"part index {index} is out of range")

        salt = f"{version_id}.{index}"

        def place(loads: Sequence[NodeLoad], part_size: int) -> Sequence[str]:
            return place_parts(
                self.leases.with_held(loads), count=1, part_size=part_size, salt=salt
            )

        def replace() -> PartPlacement:
            if not self.leases.holds(version_id):
                return self._store.replace_part(
                    version_id=version_id, index=index, failed_node_id=failed_node_id, place=place
                )
            lease = self.leases.get(version_id, self._clock.now())
            if lease is None:
                raise UploadConflict(f"upload {version_id}: its placement lease expired")
            if index >= len(lease.nodes) or lease.nodes[index] != failed_node_id:
                raise UploadConflict(
                    f"part {index} of upload {version_id} is not on node {failed_node_id}"
                )
            view = self._store.placement_view(lease.namespace, lease.name, if_absent=False)
            loads = [load for load, _ in view if load.node_id not in lease.nodes]
            (node_id,) = place(loads, lease.reserved[index])
            url = next(url for load, url in view if load.node_id == node_id)
            moved = self.leases.move(version_id, index, node_id, url)
            return moved.pending_version().parts[index]

        return await self._blocking(replace)

    async def extend_upload(self, *, version_id: str, size: int) -> None:
        if not 0 <= size <= self.config.max_file_size:
            raise InvalidRequest(f"size must be between 0 and {self.config.max_file_size}")
        await self._blocking(
            lambda: self._store.extend_reservation(version_id=version_id, size=size)
        )

    async def resolve(self, *, namespace: str, name: str) -> FileVersion:
        check_namespace(namespace)
        check_name(name)
        version = await self._blocking(lambda: self._store.current_version(namespace, name))
        if version is None:
            raise NotFound(f"{namespace}/{name} does not exist")
        return version

    async def delete_file(self, *, namespace: str, name: str) -> bool:
        check_namespace(namespace)
        check_name(name)
        now = self._clock.now()
        return await self._blocking(lambda: self._store.retire_current(namespace, name, now))

    async def list_files(
        self, *, namespace: str, prefix: str, after: str, limit: int
    ) -> list[FileEntry]:
        check_namespace(namespace)
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}")
        return await self._blocking(
            lambda: self._store.list_files(namespace, prefix=prefix, after=after, limit=limit)
        )

    # -- namespaces' engines --------------------------------------------------------------

    async def _layout_for(self, namespace: str) -> StripeLayout:
        """The layout new files of ``namespace`` get: the configured stripe, the namespace's
        engine. Raises NotFound. (An engine never changes, so it is remembered.)"""
        known = self._engines.get(namespace)
        if known is None:
            info = await self._blocking(lambda: self._store.namespace_info(namespace))
            known = self._engines[namespace] = (info.copies, info.parity)
        return attrs.evolve(self.config.layout, copies=known[0], parity=known[1])

    # -- nodes ----------------------------------------------------------------------------

    @staticmethod
    def _arrived(registration: NodeRegistration, arrival: NodeArrival) -> None:
        for node_id in arrival.displaced:
            log.warning(
                "node %s is unavailable: node %s now answers at its address %s (its reads"
                " fail until it registers from an address of its own)",
                node_id,
                registration.node_id,
                registration.url,
            )

    async def register_node(self, registration: NodeRegistration) -> None:
        _check_registration(registration)
        now = self._clock.now()
        self._heard.hear(registration, now)
        suspect_for = self.config.suspect_for
        try:
            arrival = await self._blocking(
                lambda: self._store.upsert_node(registration, now, suspect_for=suspect_for)
            )
        except NodeForgotten:
            self._refused(registration.node_id)
            raise
        self._arrived(registration, arrival)
        if arrival.was is NodeState.UNAVAILABLE:  # restarted: it registers before it heartbeats
            log.warning("node %s is back: it registers again", registration.node_id)

    async def heartbeat(
        self, registration: NodeRegistration, *, deleted: Sequence[str]
    ) -> list[str]:
        _check_registration(registration)
        now = self._clock.now()
        self._heard.hear(registration, now)
        node_id = registration.node_id

        def beat() -> tuple[NodeArrival, list[str]]:
            arrival = self._store.upsert_node(
                registration, now, suspect_for=self.config.suspect_for
            )
            if deleted:
                self._store.forget_parts(node_id, deleted)
            return arrival, self._store.garbage_for_node(
                node_id,
                retired_before=now - self.config.retire_grace,
                limit=self.config.garbage_batch,
            )

        try:
            arrival, garbage = await self._blocking(beat)
        except NodeForgotten:
            self._refused(node_id)
            raise
        self._arrived(registration, arrival)
        if arrival.was is NodeState.UNAVAILABLE:
            log.warning("node %s is back: it heartbeats again", node_id)
        expired = self._expired_parts.get(node_id)
        if expired:
            expired.difference_update(deleted)
            room = self.config.garbage_batch - len(garbage)
            garbage += sorted(expired)[: max(room, 0)]
            if not expired:
                del self._expired_parts[node_id]
        return garbage

    def _refused(self, node_id: str) -> None:
        """A forgotten node registered or heartbeat: it holds no address (a new node may take
        its own at once)."""
        self._heard.drop(node_id)
        log.warning(
            "node %s was refused: the operator forgot it; its directory must be wiped", node_id
        )

    async def forget_node(self, *, node_id: str) -> NodeStatus:
        """Declare an unavailable node gone for good (see
        :meth:`karma8.metadata.nodes.NodeStore.forget_node`); the node as it is then.
        Idempotent. Raises NotFound, NodeNotGone (it was heard within ``node_timeout``)."""
        if not node_id:
            raise InvalidRequest("forgetting a node needs its id")
        now = self._clock.now()
        heard_before = now - self.config.node_timeout
        node = await self._blocking(
            lambda: self._store.forget_node(node_id, now, heard_before=heard_before)
        )
        self._heard.drop(node_id)
        if node.forgotten_at == now:  # forgotten now, not before
            log.warning(
                "node %s is forgotten by the operator: its %d parts are lost there (those of"
                " redundant files are rebuilt elsewhere now); it may never register again",
                node_id,
                node.parts,
            )
        return node

    async def list_nodes(self) -> list[NodeStatus]:
        """The nodes, their reserved bytes counting placement leases."""
        nodes = await self._blocking(self._store.list_nodes)
        leases = self.leases
        return [
            attrs.evolve(n, reserved_bytes=n.reserved_bytes + held)
            if (held := leases.reserved_on(n.node_id))
            else n
            for n in nodes
        ]

    async def totals(self) -> ClusterTotals:
        """As the store counts them, small uploads under a placement lease in flight too."""
        stored = await self._blocking(self._store.totals)
        return attrs.evolve(stored, pending_uploads=stored.pending_uploads + len(self.leases))

    async def unknown_parts(self, *, node_id: str, keys: Sequence[str]) -> list[str]:
        asked = list(keys)

        def known() -> set[str]:
            # An unexpired placement lease's parts are known: written for a commit in flight.
            # Read in the same step as the rows, so no commit falls in between.
            leased = self.leases.keys_on(node_id, self._clock.now())
            return self._store.part_keys_on_node(node_id) | leased

        held = await self._blocking(known)
        # The keys are all the node holds: one its parts check reported missing is back.
        forgotten = await self._blocking(lambda: self._store.forget_present(node_id, asked))
        if forgotten:
            log.warning(
                "node %s holds %d part%s it reported missing: no longer marked lost",
                node_id,
                forgotten,
                "" if forgotten == 1 else "s",
            )
        return [key for key in asked if key not in held]

    async def report_node_failure(self, *, node_id: str, reason: str) -> None:
        if not node_id:
            raise InvalidRequest("a failure report needs a node id")
        now = self._clock.now()
        known = await self._blocking(lambda: self._store.mark_node_suspect(node_id, now))
        if known:
            log.warning("node %s is suspect: %s", node_id, reason[:200])

    async def report_lost_parts(self, *, node_id: str, keys: Sequence[str], reason: str) -> None:
        if not node_id:
            raise InvalidRequest("a report of lost parts needs a node id")
        now = self._clock.now()
        asked = list(keys)
        marked = await self._blocking(lambda: self._store.mark_damaged(node_id, asked, reason, now))
        if marked:
            log.warning(
                "node %s lost %d part%s: %s",
                node_id,
                marked,
                "" if marked == 1 else "s",
                reason[:200],
            )

    async def expected_parts(self, *, node_id: str) -> list[str]:
        return await self._blocking(lambda: self._store.expected_parts(node_id))


def _check_registration(registration: NodeRegistration) -> None:
    if not registration.node_id or not registration.url:
        raise InvalidRequest("a node needs an id and a url")
    if registration.capacity_bytes < 0:  # 0: a full disk, registered but never chosen
        raise InvalidRequest("a node's capacity must not be negative")
