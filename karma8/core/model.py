"""The metadata model: records that discovery keeps and actors exchange.

All records are frozen attrs classes, so they can be passed between actors (in the simulator
by reference, over HTTP as JSON via ``karma8.net.codec``) without anyone mutating shared
state. States are enums; the life of a file version is::

    PENDING --commit--> COMMITTED --overwrite/delete--> RETIRED
       |                                                  |
       +--abort/expire--> ABORTED                         |
                            |                             |
                            +--- parts deleted on their nodes, then the version row goes

At most one version per (namespace, name) is COMMITTED. Parts of ABORTED and RETIRED versions
are garbage; storage nodes fetch their share of it with each heartbeat.
"""

from __future__ import annotations

import enum
import hashlib

import attrs

from karma8.core.layout import StripeLayout


class NodeState(enum.Enum):
    """Whether placement may choose a node.

    AVAILABLE: heartbeating and trusted. UNAVAILABLE: silent for ``node_timeout``. SUSPECT: a
    write to it failed because of the node (a gateway reported it); it becomes AVAILABLE with
    the first heartbeat that arrives ``suspect_for`` seconds or more after the report.
    FORGOTTEN: an unavailable node the operator declared gone for good (``karma8 nodes
    forget``): its parts count as lost at once, it counts in no total, and it may never
    register again under that id.
    """

    AVAILABLE = "available"
    UNAVAILABLE = "unavailable"
    SUSPECT = "suspect"
    FORGOTTEN = "forgotten"


class VersionState(enum.Enum):
    PENDING = "pending"
    COMMITTED = "committed"
    ABORTED = "aborted"
    RETIRED = "retired"


@attrs.frozen(kw_only=True)
class NodeRef:
    """Where a storage node is: its permanent id and its current address (empty: none known,
    another node took the one it had; it is unavailable until it registers again)."""

    node_id: str
    url: str


@attrs.frozen(kw_only=True)
class NodeRegistration:
    """What a storage node tells discovery on start and with every heartbeat."""

    node_id: str
    url: str
    capacity_bytes: int
    disk_used_bytes: int = 0
    # Where the node's directory is (host, and the directory's device and inode), or None: the
    # same id heard from two places at once is two copies of one node (NodeConflict).
    place: str | None = None


@attrs.frozen(kw_only=True)
class NodeArrival:
    """What recording a registration or heartbeat found: the state the node had (None: a new
    node), and the nodes whose address it took (silent ones whose records still named it: a
    node whose disk was wiped came back under a new id on the same address, say)."""

    was: NodeState | None
    displaced: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class NodeStatus:
    """A storage node as discovery sees it."""

    node_id: str
    url: str
    state: NodeState
    capacity_bytes: int
    used_bytes: int
    reserved_bytes: int
    parts: int
    last_seen: float
    failed_at: float | None = None  # when a write to it last failed because of the node
    forgotten_at: float | None = None  # when the operator forgot it (state FORGOTTEN)


@attrs.frozen(kw_only=True)
class ClusterTotals:
    """What the cluster stores: current files and their bytes, and uploads under way.

    ``degraded_files``: current files with a part on an unavailable node or lost (reported
    corrupt or missing by its node or a reader), i.e. below full redundancy (a raid0 file among
    them cannot be read until the node is back)."""

    files: int
    bytes: int
    pending_uploads: int
    degraded_files: int = 0


# Why a node reports parts: it checked one and found it damaged (it then quarantines it);
# its parts check found one it should hold missing, which a later check listing the part
# again answers (see karma8.metadata.repairs.forget_present).
FAILED_ITS_CHECKSUM = "failed its checksum"
MISSING_ON_ITS_NODE = "missing on its node"


@attrs.frozen(kw_only=True)
class PartPlacement:
    """Part ``index`` of a version and the node that holds it; ``reported_lost`` is why, if
    that node or a reader reported the part corrupt or missing there (repair rebuilds it)."""

    index: int
    key: str
    node: NodeRef
    size: int | None = None
    checksum: str | None = None
    reported_lost: str | None = None


@attrs.frozen(kw_only=True)
class PartReceipt:
    """A storage node's word that a part is durably written."""

    index: int
    size: int
    checksum: str


@attrs.frozen(kw_only=True)
class FileVersion:
    """One version of a file and where its parts are."""

    version_id: str
    namespace: str
    name: str
    state: VersionState
    size: int | None
    layout: StripeLayout
    parts: tuple[PartPlacement, ...]
    created_at: float
    committed_at: float | None = None
    etag: str | None = None


@attrs.frozen(kw_only=True)
class StoredVersion:
    """What a PUT answers with: the version it stored, without where its parts went (a
    gateway worker gets this much back from the process that stored its upload)."""

    version_id: str
    namespace: str
    name: str
    size: int
    etag: str | None

    @classmethod
    def of(cls, version: FileVersion) -> StoredVersion:
        assert version.size is not None, "a stored version has a size"
        return cls(
            version_id=version.version_id,
            namespace=version.namespace,
            name=version.name,
            size=version.size,
            etag=version.etag,
        )


@attrs.frozen(kw_only=True)
class PlaceRequest:
    """A small upload asking discovery for a placement lease (``place_upload``)."""

    namespace: str
    name: str
    size: int
    if_absent: bool = False


@attrs.frozen(kw_only=True)
class FileEntry:
    """A line of a listing."""

    name: str
    size: int
    etag: str
    committed_at: float


def part_key(version_id: str, index: int) -> str:
    """The storage key of part ``index`` of a version (unique cluster-wide)."""
    return f"{version_id}.{index}"


def etag_of(checksums: tuple[str, ...] | list[str]) -> str:
    """A strong ETag for a version: a digest over its part checksums, in part order."""
    digest = hashlib.sha256("\n".join(checksums).encode()).hexdigest()
    return f'"{digest[:32]}"'


@attrs.frozen(kw_only=True)
class MoveTicket:
    """A part move discovery has recorded: copy ``key`` from ``source`` to ``target`` before
    ``lease_until``, then report it done (the copy must match ``checksum``)."""

    key: str
    size: int
    checksum: str
    source: NodeRef
    target: NodeRef
    lease_until: float


@attrs.frozen(kw_only=True)
class RebalanceStatus:
    """How evenly the nodes are filled and what the rebalancer has done and has left.

    ``spread_pp``: max - min fill of the nodes that take part (available, capacity > 0), in
    percentage points; ``imbalance_pp``: how far the node furthest from its target is.
    ``remaining_bytes``: the least that must still move to reach the targets.
    """

    spread_pp: float
    imbalance_pp: float
    remaining_bytes: int
    moving_bytes: int
    moving_parts: int
    moved_bytes: int
    moved_parts: int
    rate_bytes_per_s: float = 0.0
    eta_seconds: float | None = None
    active: bool = False


@attrs.frozen(kw_only=True)
class Repair:
    """A part of a redundant version to rebuild: ``ticket`` is the recorded move from the
    node that lost it (or has been away too long) to a node that holds no part of
    ``version``; ``slot`` is the part's index in the version."""

    ticket: MoveTicket
    version: FileVersion
    slot: int


@attrs.frozen(kw_only=True)
class RepairStatus:
    """Redundancy lost and regained.

    ``lost_parts``: parts of current redundant files on an unavailable node or reported
    lost; ``due_parts``: those of them due for repair (reported lost, or on a node away for
    ``repair_after``) that can be rebuilt now; ``unrebuildable_parts``: those that cannot
    be (too few readable parts of their file), due or not: they wait for a node holding
    parts of their file to return, and are not tried; ``waiting_parts``: due parts that
    repair's last pass found no node for (every available node with room holds a part of
    their file: one node more than the layout's parts is needed); ``repairing_parts``:
    rebuilds under way; ``repaired_*``: done since the database was made.
    """

    degraded_files: int
    lost_parts: int
    due_parts: int
    repairing_parts: int
    repaired_parts: int
    repaired_bytes: int
    rate_bytes_per_s: float = 0.0
    active: bool = False
    waiting_parts: int = 0
    unrebuildable_parts: int = 0
