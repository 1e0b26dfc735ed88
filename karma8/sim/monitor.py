"""Checks made while a simulated run goes on, against the fault schedule.

End-state checks alone miss data that was lost and then overwritten, and leaks that a sweeper
hides before the run ends. The :class:`Monitor` watches the run as it happens:

* at the moment discovery commits a version, every part must be on the node the metadata
  names, with the recorded size and checksum, sizes per the layout, on distinct nodes;
* a failed upload whose gateway did not crash must be cleaned up by its cleanup deadline
  (:data:`CLEANUP_DEADLINE` after the client got its error): the version no longer pending
  (so its reservations are released) and its parts gone, except where the fault schedule
  made discovery (then the outcome is unknown and the parts are rightly kept) or that node
  unreachable from the gateway;
* at the moment a part move switches, the target must hold the part as recorded;
* after the run, every failed operation must be explained by a fault active during it
  (:class:`FaultTimeline`); a read may also fail when a write of the same name raced it.

The store hook is :class:`ObservedStore`, the simulator's metadata store with begins, part
moves and commits observed; actors cannot tell it from the plain one. A small upload begins
with a placement lease in discovery's memory, not in the store: :class:`ObservedLeases` tells
the monitor of each lease granted and each part it moves, and the clean-up check counts a
lease still held like a version still pending.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from karma8.core.leases import Lease, PlacementLeases
from karma8.core.model import FileVersion, PartPlacement, VersionState
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.sim.disk import MemoryDisk
from karma8.sim.workload import GATEWAY, History, Op

DISCOVERY = "discovery"
ANY = "*"
# Virtual seconds a gateway has, after answering a failed PUT, to abort its version and delete
# its parts. It does so at once; this leaves room for slow links, not for a sweeper.
CLEANUP_DEADLINE = 2.0
# Failures an operation may meet without any fault: honest refusals, not losses.
REFUSALS = frozenset({"not_enough_nodes", "precondition_failed"})


@attrs.frozen(kw_only=True)
class FaultWindow:
    """A fault active in ``[start, until]`` on ``actors`` (endpoint names; "*" for any)."""

    kind: str  # "crash", "partition", "lossy_link", "slow_link", "disk_full", "fail_writes"
    start: float
    until: float
    actors: frozenset[str]


# Faults that can make a call fail (a slow link only delays a call: the simulator has no
# call timeouts). A write can also fail because it was slow: its upload outlives upload_ttl.
BREAKS_CALLS = frozenset({"crash", "partition", "lossy_link"})
BREAKS_WRITES = BREAKS_CALLS | {"disk_full", "fail_writes", "slow_link", "wipe"}
# What may make a part unreadable: its node unreachable, wiped, or the part damaged.
BREAKS_PARTS = BREAKS_CALLS | {"wipe", "corrupt"}
# Faults of one storage node (crash of a node, its disk full or failing).
NODE_FAULTS = frozenset({"crash", "disk_full", "fail_writes"})


@attrs.define
class FaultTimeline:
    """Every fault of a run, as applied, with the node ids it touched."""

    windows: list[FaultWindow] = attrs.Factory(list)

    def add(self, kind: str, start: float, until: float, actors: Sequence[str]) -> None:
        self.windows.append(
            FaultWindow(kind=kind, start=start, until=until, actors=frozenset(actors))
        )

    def touches(
        self, start: float, end: float, actors: set[str], kinds: frozenset[str]
    ) -> FaultWindow | None:
        """A fault of ``kinds`` on any of ``actors`` overlapping ``[start, end]``, if any."""
        for window in self.windows:
            if window.kind not in kinds or window.until < start or window.start > end:
                continue
            if ANY in actors or ANY in window.actors or window.actors & actors:
                return window
        return None

    def link_broken(self, start: float, end: float, a: str, b: str) -> bool:
        """Whether ``a`` or ``b`` crashed, or a fault on their link could fail a call."""
        for window in self.windows:
            if window.kind not in BREAKS_CALLS or window.until < start or window.start > end:
                continue
            if window.kind == "crash":
                if window.actors & {a, b}:
                    return True
            elif window.actors <= {a, b, ANY} and window.actors & {a, b}:
                return True
        return False


@attrs.define(kw_only=True)
class _Begun:
    at: float
    version: FileVersion
    moved: list[PartPlacement] = attrs.Factory(list)  # parts placed again (replace_part)


class Monitor:
    """Collects violations found during a run; see the module docstring."""

    def __init__(self, history: History, timeline: FaultTimeline) -> None:
        self.history = history
        self.timeline = timeline
        # How many of a file's nodes may be down, wiped or corrupt with every read still
        # succeeding (the workload namespace's engine): more is needed to explain a failure.
        self.tolerates = 0
        self.disk_of: Callable[[str], MemoryDisk | None] = lambda node_id: None
        self.committed_parts: list[str] = []
        self.uploads_cleaned: list[str] = []
        self.moved_parts: list[str] = []
        self.moves: list[tuple[str, str, str, int]] = []  # (key, source, target, size) switched
        self.repairs: list[tuple[str, str, str, int]] = []  # likewise, parts rebuilt
        self.detections: list[tuple[str, float]] = []  # (node id, when marked failing)
        self._begun: dict[str, list[_Begun]] = {}  # name -> versions begun for it
        self._begun_by_id: dict[str, _Begun] = {}
        self._committed_ids: set[str] = set()
        self._part_nodes: dict[str, set[str]] = {}  # name -> nodes of its committed versions
        self._in_flight: dict[str, list[Op]] = {}  # name -> PUTs not yet answered
        self._nursery: trio.Nursery | None = None
        self._store: SqliteMetadataStore | None = None
        self.leases: PlacementLeases | None = None  # those of the discovery last started

    def attach(self, store: SqliteMetadataStore, nursery: trio.Nursery) -> None:
        """Start watching: checks after a failed PUT run as tasks of ``nursery``."""
        self._store = store
        self._nursery = nursery
        self.history.on_start = self._started
        self.history.on_end = self._ended

    # -- store events (synchronous, inside discovery's transaction calls) ------------------

    def begun(self, version: FileVersion) -> None:
        record = _Begun(at=trio.current_time(), version=version)
        self._begun.setdefault(version.name, []).append(record)
        self._begun_by_id[version.version_id] = record

    def replaced(self, version_id: str, placement: PartPlacement) -> None:
        """A part of a pending version moved to another node: clean-up must cover it too."""
        self._begun_by_id[version_id].moved.append(placement)

    def committed(self, version: FileVersion) -> None:
        """Check, at this moment, that the parts the metadata names are stored as recorded."""
        now = trio.current_time()
        where = f"t={now:.6f} {version.namespace}/{version.name} ({version.version_id})"
        assert version.size is not None
        expected = version.layout.slot_sizes(version.size)
        nodes = [p.node.node_id for p in version.parts]
        self._committed_ids.add(version.version_id)
        self._part_nodes.setdefault(version.name, set()).update(nodes)
        if len(set(nodes)) != len(nodes) or len(nodes) != version.layout.slots:
            self.committed_parts.append(f"{where}: committed with parts on nodes {nodes}")
        for part in version.parts:
            if self.timeline.touches(0.0, now, {part.node.node_id}, frozenset({"wipe"})):
                continue  # its disk was lost, maybe after it stored the part: a fault's loss
            disk = self.disk_of(part.node.node_id)
            stored = None if disk is None else disk.parts.get(part.key)
            if stored is None:
                self.committed_parts.append(
                    f"{where}: committed, but part {part.index} is not on {part.node.node_id}"
                )
            elif len(stored.data) != part.size or part.size != expected[part.index]:
                self.committed_parts.append(
                    f"{where}: part {part.index} has {len(stored.data)} bytes on disk,"
                    f" {part.size} recorded, the layout says {expected[part.index]}"
                )
            elif stored.checksum != part.checksum:
                self.committed_parts.append(
                    f"{where}: part {part.index} on disk does not match its recorded checksum"
                )

    def moved(self, key: str, source: str, target: str, *, repair: bool = False) -> None:
        """Check, at the switch, that the part's new home holds it as recorded (a repair's
        as a rebalancing move's)."""
        assert self._store is not None
        row = self._store.part_row(key)
        where = f"t={trio.current_time():.6f} move of {key} from {source} to {target}"
        if row is None or row.node.node_id != target:
            self.moved_parts.append(f"{where}: the metadata does not name the target")
            return
        (self.repairs if repair else self.moves).append((key, source, target, row.size or 0))
        begun = self._begun_by_id.get(key.rsplit(".", 1)[0])
        if begun is not None:
            self._part_nodes.setdefault(begun.version.name, set()).add(target)
        disk = self.disk_of(target)
        stored = None if disk is None else disk.parts.get(key)
        if stored is None:
            self.moved_parts.append(f"{where}: switched, but the target does not hold it")
        elif len(stored.data) != row.size or stored.checksum != row.checksum:
            self.moved_parts.append(f"{where}: the target's copy differs from the record")

    # -- history events ---------------------------------------------------------------------

    def _started(self, op: Op) -> None:
        if op.kind == "put":
            self._in_flight.setdefault(op.name, []).append(op)

    def _ended(self, op: Op) -> None:
        if op.kind != "put":
            return
        self._in_flight[op.name].remove(op)
        if not op.ok and self._nursery is not None:
            self._nursery.start_soon(self._check_cleanup, op, name=f"sim-monitor-cleanup-{op.name}")

    async def _check_cleanup(self, op: Op) -> None:
        deadline = op.end + CLEANUP_DEADLINE
        await trio.sleep_until(deadline)
        if self.timeline.touches(op.start, deadline, {GATEWAY}, frozenset({"crash"})):
            return  # a crashed gateway leaves its upload to the sweepers
        assert self._store is not None
        pending = {v.version_id for v in self._store.versions(VersionState.PENDING)}
        leases = self.leases
        for begun in self._begun.get(op.name, []):
            version = begun.version
            if not op.start <= begun.at <= op.end:
                continue
            if any(other.start <= begun.at for other in self._in_flight.get(op.name, [])):
                continue  # another PUT of the name may own it; checked when that one ends
            if version.version_id in self._committed_ids:
                continue  # committed after all (the answer was lost): its parts are live
            where = (
                f"PUT of {op.name} failed at t={op.end:.6f} ({op.error});"
                f" at t={deadline:.6f} its version {version.version_id}"
            )
            if self.timeline.link_broken(op.start, deadline, GATEWAY, DISCOVERY):
                continue  # the gateway cannot learn the outcome: it keeps the parts, rightly
            if version.version_id in pending:
                self.uploads_cleaned.append(f"{where} is still pending, holding its reservation")
            if leases is not None and leases.holds(version.version_id):
                self.uploads_cleaned.append(f"{where} still holds its placement lease")
            for part in (*version.parts, *begun.moved):
                node = part.node.node_id
                disk = self.disk_of(node)
                if disk is None or part.key not in disk.parts:
                    continue
                if not self.timeline.link_broken(op.start, deadline, GATEWAY, node):
                    self.uploads_cleaned.append(f"{where} still has part {part.index} on {node}")

    # -- after the run ----------------------------------------------------------------------

    def unexplained_failures(self) -> tuple[list[str], list[str]]:
        """(failed reads, failed writes) that no fault, race or honest refusal explains."""
        reads: list[str] = []
        writes: list[str] = []
        for op in self.history.ops:
            if op.ok or op.error is None or op.error in REFUSALS:
                continue
            span = f"t={op.start:.6f}..{op.end:.6f}"
            if op.kind == "get":
                if self._read_explained(op):
                    continue
                reads.append(f"GET {op.name} at {span} failed ({op.error}); no fault explains it")
            elif not self.timeline.touches(op.start, op.end, {ANY}, BREAKS_WRITES):
                writes.append(
                    f"{op.kind.upper()} {op.name} at {span} failed ({op.error});"
                    " no fault was active"
                )
        return reads, writes

    def puts_failed_after_faults(self, node_ids: set[str]) -> list[str]:
        """Failed PUTs that were not in flight when a fault on one of ``node_ids`` was detected.

        A fault is detected when the cluster first learns of it after it began: the node
        reported failing by a gateway (suspect) or marked unavailable by discovery; until then
        nobody can know (a disk is full only when a write meets it). A PUT that started before
        the detection may fail; one that started after must find the node avoided.
        """
        spans = []
        for w in self.timeline.windows:
            if w.kind not in NODE_FAULTS or not (w.actors & node_ids or ANY in w.actors):
                continue
            seen = [t for node, t in self.detections if node in w.actors and t >= w.start]
            spans.append((w.start, min(seen, default=w.until)))
        return [
            f"PUT {op.name} at t={op.start:.6f}..{op.end:.6f} failed ({op.error}),"
            " though it started after every storage node fault it overlaps was detected"
            for op in self.history.ops
            if op.kind == "put"
            and not op.ok
            and op.error not in REFUSALS
            and not any(op.start <= detected and op.end >= start for start, detected in spans)
        ]

    def detected(self, node_ids: list[str]) -> None:
        """Nodes the cluster now knows failing (suspect or unavailable)."""
        now = trio.current_time()
        self.detections.extend((node_id, now) for node_id in node_ids)

    def _read_explained(self, op: Op) -> bool:
        if self.timeline.touches(op.start, op.end, {GATEWAY, DISCOVERY}, BREAKS_CALLS):
            return True
        faulty = [
            node
            for node in sorted(self._part_nodes.get(op.name, set()))
            if self.timeline.touches(op.start, op.end, {node}, BREAKS_PARTS)
        ]
        if len(faulty) > self.tolerates:
            return True
        # A write of the name racing the read may retire the version it is reading.
        return any(
            w.kind in ("put", "delete") and w.start <= op.end and w.end >= op.start
            for w in self.history.by_name.get(op.name, [])
        )


class ObservedStore(SqliteMetadataStore):
    """The simulator's in-memory metadata store, telling a :class:`Monitor` of each begun and
    committed version as the transaction that made it returns."""

    def __init__(self, monitor: Monitor) -> None:
        super().__init__(":memory:")
        self._monitor = monitor

    # Keyword arguments pass through untouched: each override only adds the notification.
    def begin_version(self, **kwargs: Any) -> FileVersion:
        version = super().begin_version(**kwargs)
        self._monitor.begun(version)
        return version

    def replace_part(self, **kwargs: Any) -> PartPlacement:
        placement = super().replace_part(**kwargs)
        self._monitor.replaced(kwargs["version_id"], placement)
        return placement

    def commit_version(self, **kwargs: Any) -> FileVersion:
        version = super().commit_version(**kwargs)
        self._monitor.committed(version)
        return version

    def commit_placed(self, **kwargs: Any) -> FileVersion:
        version = super().commit_placed(**kwargs)
        self._monitor.committed(version)
        return version

    def mark_node_suspect(self, node_id: str, now: float) -> bool:
        known = super().mark_node_suspect(node_id, now)
        if known:
            self._monitor.detected([node_id])
        return known

    def mark_stale_nodes(self, seen_before: float) -> list[str]:
        stale = super().mark_stale_nodes(seen_before)
        self._monitor.detected(stale)
        return stale

    def finish_move(self, **kwargs: Any) -> None:
        source = self.part_row(kwargs["key"])
        kind = self._db.execute(
            "SELECT kind FROM moves WHERE part_key = ?", (kwargs["key"],)
        ).fetchone()
        super().finish_move(**kwargs)
        assert source is not None
        assert kind is not None
        self._monitor.moved(
            kwargs["key"], source.node.node_id, kwargs["target"], repair=kind[0] == "repair"
        )


class ObservedLeases(PlacementLeases):
    """One discovery process's placement leases, telling a :class:`Monitor` of each lease
    granted (a small upload begun) and each part moved; the monitor checks the leases of the
    discovery started last."""

    def __init__(self, monitor: Monitor) -> None:
        super().__init__()
        self._monitor = monitor
        monitor.leases = self

    def grant(self, lease: Lease) -> None:
        super().grant(lease)
        self._monitor.begun(lease.pending_version())

    def move(self, version_id: str, index: int, node_id: str, url: str) -> Lease:
        moved = super().move(version_id, index, node_id, url)
        self._monitor.replaced(version_id, moved.pending_version().parts[index])
        return moved
