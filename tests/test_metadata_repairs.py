"""Lost parts and their repair in the metadata store, on both databases: what counts as lost
and due, where a rebuilt part may go, and what a finished or aborted repair leaves."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from karma8.core.errors import IntegrityError, MoveConflict
from karma8.core.layout import StripeLayout
from karma8.core.model import (
    FAILED_ITS_CHECKSUM,
    MISSING_ON_ITS_NODE,
    NodeRegistration,
    PartReceipt,
)
from karma8.core.placement import NodeLoad
from karma8.core.rebalance import MovablePart
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.metadata.store import SqlMetadataStore

PARITY = StripeLayout(parts=5, unit=4, parity=1)
PARITY2 = StripeLayout(parts=5, unit=4, parity=2)
RAID0 = StripeLayout(parts=5, unit=4)
RAID1 = StripeLayout(parts=5, unit=4, copies=2)
NODES = [f"n{i}" for i in range(9)]


def commit(store: SqlMetadataStore, vid: str, layout: StripeLayout, nodes: Sequence[str]) -> None:
    sizes = layout.slot_sizes(50)
    store.commit_placed(
        version_id=vid,
        namespace="default",
        name=vid,
        layout=layout,
        nodes=nodes,
        size=50,
        receipts=[
            PartReceipt(index=i, size=s, checksum=f"{vid}-c{_data_part(layout, i)}")
            for i, s in enumerate(sizes)
        ],
        created_at=1.0,
        now=1.0,
        if_absent=False,
    )


def _data_part(layout: StripeLayout, slot: int) -> int:
    """The slot's data part (copies share its checksum), or the slot for a parity part."""
    part = layout.data_part(slot)
    return slot if part is None else part


@pytest.fixture
def store(new_store: SqlMetadataStore) -> SqlMetadataStore:
    """Nine nodes; "p" (parity 5+1) on n0..n5, "r" (raid0) on n0..n4; n6..n8 empty."""
    s = new_store
    s.create_namespace("default", 0.0)
    for node in NODES:
        s.upsert_node(
            NodeRegistration(node_id=node, url=f"http://{node}", capacity_bytes=1000), 0.0
        )
    commit(s, "p", PARITY, NODES[:6])
    commit(s, "r", RAID0, NODES[:5])
    return s


def emptiest(loads: Sequence[NodeLoad], part: MovablePart) -> str | None:
    ready = sorted((n.fill, n.node_id) for n in loads if n.available and n.free >= part.size)
    return ready[0][1] if ready else None


def repair(store: SqlMetadataStore, lost_before: float, now: float = 10.0) -> list[str]:
    repairs = store.begin_repairs(
        lost_before=lost_before,
        limit=10,
        now=now,
        lease_until=now + 50,
        place=emptiest,
        held=lambda node: 0,
    )
    return [f"{r.ticket.key}:{r.ticket.source.node_id}->{r.ticket.target.node_id}" for r in repairs]


def _all_back_but_n0(store: SqlMetadataStore) -> None:
    """Every node marked unavailable (all last seen at 0.0), then all but n0 heard at 3.0."""
    store.mark_stale_nodes(seen_before=1.0)
    for node in NODES[1:]:
        store.upsert_node(
            NodeRegistration(node_id=node, url=f"http://{node}", capacity_bytes=1000), 3.0
        )


def test_a_reported_part_is_due_at_once_and_only_if_its_node_holds_it(
    store: SqlMetadataStore,
) -> None:
    assert store.mark_damaged("n1", ["p.1", "p.2", "nope.0"], "failed its checksum", 5.0) == 1
    assert store.mark_damaged("n1", ["p.1"], "again", 6.0) == 0  # once is enough
    counts = store.repair_counts(lost_before=0.0)
    assert counts["lost_parts"] == counts["due_parts"] == 1
    assert counts["degraded_files"] == 1
    assert repair(store, lost_before=0.0) == ["p.1:n1->n6"]
    assert repair(store, lost_before=0.0) == []  # moving already: not recorded twice
    assert store.repair_counts(lost_before=0.0)["repairing_parts"] == 1


def test_a_part_on_an_unavailable_node_is_due_after_repair_after(
    store: SqlMetadataStore,
) -> None:
    _all_back_but_n0(store)
    # n0 unavailable since (last seen) 0.0: both files have a part there.
    counts = store.repair_counts(lost_before=-1.0)
    assert (counts["degraded_files"], counts["lost_parts"], counts["due_parts"]) == (2, 1, 0)
    assert repair(store, lost_before=-1.0) == []  # not away for repair_after yet
    # raid0's part cannot be rebuilt: only the parity file's is due.
    assert repair(store, lost_before=0.0) == ["p.0:n0->n6"]


def test_a_finished_repair_switches_the_part_counts_it_and_forgets_the_report(
    store: SqlMetadataStore,
) -> None:
    store.mark_damaged("n2", ["p.2"], "missing on its node", 5.0)
    version = store.current_version("default", "p")
    assert version is not None  # `karma8 stat` shows the report with the part
    assert [p.reported_lost for p in version.parts] == [None, None, "missing on its node"] + [
        None
    ] * 3
    repair(store, lost_before=0.0)
    store.finish_move(key="p.2", target="n6", checksum="p-c2", now=11.0)
    version = store.current_version("default", "p")
    assert version is not None
    assert version.parts[2].node.node_id == "n6"
    assert version.parts[2].reported_lost is None
    counts = store.repair_counts(lost_before=100.0)
    assert (counts["lost_parts"], counts["degraded_files"], counts["repairing_parts"]) == (0, 0, 0)
    assert (counts["repaired_parts"], counts["repaired_bytes"]) == (1, 10)
    assert store.move_counts()["moved_parts"] == 0  # a repair is not a rebalancing move
    # The lost copy is garbage for n2, should it ever come back.
    assert store.garbage_for_node("n2", retired_before=11.0, limit=10) == ["p.2"]
    assert store.mark_damaged("n2", ["p.2"], "late report", 12.0) == 0  # it moved on


def test_a_report_is_forgotten_once_its_node_lists_the_part_again(
    store: SqlMetadataStore,
) -> None:
    store.mark_damaged("n2", ["p.2"], MISSING_ON_ITS_NODE, 5.0)
    store.mark_damaged("n3", ["p.3"], "a read found it missing or corrupt", 5.0)
    store.mark_damaged("n4", ["p.4"], FAILED_ITS_CHECKSUM, 5.0)
    assert store.forget_present("n2", ["x.1", "p.3"]) == 0  # p.3's report is n3's
    assert store.forget_present("n2", ["p.2", "x.1"]) == 1
    # Reports of damage stay: a part that is there may be damaged still.
    assert store.forget_present("n3", ["p.3"]) == 0
    assert store.forget_present("n4", ["p.4"]) == 0
    version = store.current_version("default", "p")
    assert version is not None
    assert [p.reported_lost for p in version.parts][2:4] == [
        None,
        "a read found it missing or corrupt",
    ]
    assert store.repair_counts(lost_before=100.0)["lost_parts"] == 2
    assert store.forget_present("n2", ["p.2"]) == 0


def test_a_reports_reason_is_kept_printable_and_short(store: SqlMetadataStore) -> None:
    store.mark_damaged("n3", ["p.3"], "bad\nline\x1b[2J" + "x" * 300, 5.0)
    version = store.current_version("default", "p")
    assert version is not None
    reason = version.parts[3].reported_lost
    assert reason is not None
    assert reason.startswith("bad?line?[2J")
    assert len(reason) == 200


def test_a_repair_with_the_wrong_bytes_is_refused_and_due_again(
    store: SqlMetadataStore,
) -> None:
    store.mark_damaged("n3", ["p.3"], "failed its checksum", 5.0)
    repair(store, lost_before=0.0)
    with pytest.raises(IntegrityError, match="does not match"):
        store.finish_move(key="p.3", target="n6", checksum="wrong", now=11.0)
    # The bad copy is garbage on n6; the part stays lost and goes elsewhere next time.
    assert store.garbage_for_node("n6", retired_before=11.0, limit=10) == ["p.3"]
    assert repair(store, lost_before=0.0) == ["p.3:n3->n7"]


def test_two_lost_parts_of_one_file_never_go_to_one_node(store: SqlMetadataStore) -> None:
    commit(store, "q", PARITY2, NODES[:7])  # parity 5+2: two lost parts can be rebuilt
    store.mark_damaged("n0", ["q.0"], "failed its checksum", 5.0)
    store.mark_damaged("n1", ["q.1"], "failed its checksum", 5.0)
    done = repair(store, lost_before=0.0)
    assert sorted(done) == ["q.0:n0->n7", "q.1:n1->n8"]
    # And the mover's own check refuses it whatever a planner says.
    store.mark_damaged("n2", ["q.2"], "failed its checksum", 5.0)
    with pytest.raises(MoveConflict, match="holds a part"):
        store.begin_move(key="q.2", source="n2", target="n7", now=6.0, lease_until=60.0)


def test_a_part_that_cannot_be_rebuilt_is_not_due_and_is_counted_apart(
    store: SqlMetadataStore,
) -> None:
    # Parity 5+1 with two parts lost (one on an unavailable node, one reported): 4 readable
    # of the 5 a rebuild needs. Neither is due nor tried; both wait, counted on their own.
    _all_back_but_n0(store)
    store.mark_damaged("n3", ["p.3"], "failed its checksum", 5.0)
    counts = store.repair_counts(lost_before=0.0)
    assert (counts["lost_parts"], counts["due_parts"], counts["unrebuildable_parts"]) == (2, 0, 2)
    assert repair(store, lost_before=0.0) == []
    # Its node back, the reported part can be rebuilt again (and is due at once).
    store.upsert_node(NodeRegistration(node_id="n0", url="http://n0", capacity_bytes=1000), 6.0)
    counts = store.repair_counts(lost_before=0.0)
    assert (counts["lost_parts"], counts["due_parts"], counts["unrebuildable_parts"]) == (1, 1, 0)
    assert repair(store, lost_before=0.0) == ["p.3:n3->n6"]


def test_a_raid1_part_can_be_rebuilt_while_another_copy_of_it_is_readable(
    store: SqlMetadataStore,
) -> None:
    # raid1 x 2 over 5 parts: slots i and 5 + i hold data part i.
    for node in ("n9", "n10"):
        store.upsert_node(
            NodeRegistration(node_id=node, url=f"http://{node}", capacity_bytes=1000), 0.0
        )
    commit(store, "m", RAID1, [*NODES, "n9"])
    store.mark_damaged("n0", ["m.0"], "failed its checksum", 5.0)
    store.mark_damaged("n5", ["m.5"], "failed its checksum", 5.0)  # data part 0's other copy
    store.mark_damaged("n1", ["m.1"], "failed its checksum", 5.0)  # data part 1: m.6 is fine
    counts = store.repair_counts(lost_before=0.0)
    assert (counts["lost_parts"], counts["due_parts"], counts["unrebuildable_parts"]) == (3, 1, 2)
    assert repair(store, lost_before=0.0) == ["m.1:n1->n10"]


def test_with_no_node_free_of_the_file_a_lost_part_waits(store: SqlMetadataStore) -> None:
    for node in NODES[6:]:  # the three empty nodes go away
        store.mark_node_suspect(node, 5.0)
    store.mark_damaged("n4", ["p.4"], "failed its checksum", 5.0)
    assert repair(store, lost_before=0.0) == []
    assert store.repair_counts(lost_before=0.0)["due_parts"] == 1


def test_a_nodes_own_reports_are_found_by_index() -> None:
    # A lost disk reports every part it held; the node's next listing must not scan them all
    # (nor every other node's) to find its own.
    store = SqliteMetadataStore(":memory:")
    with store._read() as db:
        plan = " ".join(
            str(row[-1])
            for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT part_key FROM damaged_parts"
                " WHERE node_id = ? AND reason = ?",
                ("n1", MISSING_ON_ITS_NODE),
            )
        )
    store.close()
    assert "USING INDEX damaged_by_node" in plan, plan
