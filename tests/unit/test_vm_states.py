"""The container's transition table and its store, without a broker or a kernel."""
from __future__ import annotations

import pytest

from imgstorage.db import create_schema, make_engine
from imgstorage.errors import StateError
from imgstorage.protocol import ContainerState
from imgstorage.vm import states
from imgstorage.vm.models import Base
from imgstorage.vm.states import (AT_RISK, GONE, HOLDS_COPY, HOLDS_TEMP, IN_SERVICE, KEPT_STATES,
                                  KERNEL, REBUILDABLE, START, TRANSITIONS, UNMAP_FROM, Event,
                                  State, next_state)
from imgstorage.vm.store import VmStore


def walk(*events: Event) -> list:
    state, seen = START, [START.value]
    for event in events:
        state = next_state(state.value, event)
        seen.append(state.value if state is not None else None)
        if state is None:
            break
    return seen


def test_the_states_are_the_protocols():
    assert State is ContainerState
    assert set(KERNEL) == set(State)


def test_direct_iscsi_life():
    assert walk(Event.ATTACHED, Event.DETACH, Event.DETACHED) == [
        "attaching", "attached", "detaching", None]


def test_sync_life_through_the_local_copy():
    assert walk(Event.SNAPSHOTTED, Event.MERGE, Event.MERGED, Event.SWITCHED, Event.RELEASE,
                Event.DELETED) == ["attaching", "snapshot", "merging", "switching", "local",
                                   "detached_local", None]


def test_sync_unmap_before_the_copy_flushes_home():
    assert walk(Event.SNAPSHOTTED, Event.FLUSH, Event.FLUSHED, Event.DETACHED) == [
        "attaching", "snapshot", "flushing", "flushed", None]


def test_a_kept_copy_after_the_final_pull_and_its_reuse():
    assert walk(Event.SNAPSHOTTED, Event.MERGE, Event.MERGED, Event.SWITCHED, Event.RELEASE,
                Event.KEEP, Event.REUSE, Event.SNAPSHOTTED, Event.MERGE) == [
        "attaching", "snapshot", "merging", "switching", "local", "detached_local", "kept",
        "attaching", "snapshot", "merging"]


def test_a_kept_copy_goes_back_to_kept_when_its_map_fails_or_flushes_home():
    assert next_state("kept", Event.REUSE) is State.ATTACHING
    assert next_state("attaching", Event.UNUSED) is State.KEPT
    assert next_state("flushed", Event.KEEP) is State.KEPT
    assert next_state("attaching", Event.FAILED) is GONE      # a new row still goes


def test_a_kept_copy_is_destroyed_by_its_nas_or_for_room():
    assert next_state("kept", Event.DELETED) is GONE
    assert next_state("kept", Event.DROPPED) is GONE
    assert next_state("kept", Event.CLEANED) is GONE


@pytest.mark.parametrize("event", [Event.DETACH, Event.RELEASE, Event.MERGE, Event.FLUSH,
                                   Event.BROKE, Event.KEEP, Event.SNAPSHOTTED])
def test_a_kept_copy_takes_no_device_event(event):
    with pytest.raises(StateError):
        next_state("kept", event)


def test_a_kept_copy_holds_nothing_the_nas_lacks_and_no_device():
    assert KEPT_STATES == {State.KEPT}
    assert KERNEL[State.KEPT] == states.Kernel()
    for derived in (AT_RISK, HOLDS_COPY, HOLDS_TEMP, IN_SERVICE, REBUILDABLE, UNMAP_FROM):
        assert State.KEPT not in derived
    # only a copy the NAS has pulled home, or one whose flush sent every write home, is kept
    assert {s for (s, e), t in TRANSITIONS.items() if t is State.KEPT} == {
        State.DETACHED_LOCAL, State.FLUSHED, State.ATTACHING}


def test_a_failed_attach_forgets_the_row_and_a_refused_merge_returns_to_snapshot():
    assert next_state("attaching", Event.FAILED) is GONE
    assert next_state("merging", Event.FAILED) is State.SNAPSHOT


@pytest.mark.parametrize("state,event", [("attached", Event.MERGE), ("local", Event.FLUSH),
                                         ("snapshot", Event.RELEASE),
                                         ("detached_local", Event.DETACH),
                                         ("merging", Event.RELEASE)])
def test_events_out_of_order_are_refused(state, event):
    with pytest.raises(StateError):
        next_state(state, event)


def test_an_unknown_state_is_refused():
    with pytest.raises(StateError, match="unknown container state"):
        next_state("limbo", Event.DETACH)


def test_clean_removes_a_row_from_every_state():
    for state in State:
        assert next_state(state.value, Event.CLEANED) is GONE


def test_broken_rows_return_to_where_they_broke():
    for state in REBUILDABLE:
        assert next_state(state.value, Event.BROKE) is State.BROKEN
        assert next_state("broken", Event.REBUILT, prior=state.value) is state
    with pytest.raises(StateError):
        next_state("broken", Event.REBUILT, prior=None)
    # in-flight states are finished at start, never rebuilt
    for state in (State.ATTACHING, State.DETACHING, State.SWITCHING, State.FLUSHED):
        assert (state, Event.BROKE) not in TRANSITIONS


def test_derived_sets():
    assert REBUILDABLE == {State.ATTACHED, State.SNAPSHOT, State.MERGING, State.LOCAL,
                           State.FLUSHING}
    assert UNMAP_FROM == set(State) - {State.ATTACHING, State.BROKEN, State.KEPT}
    assert AT_RISK == {State.SNAPSHOT, State.MERGING, State.SWITCHING, State.LOCAL,
                       State.FLUSHING, State.DETACHED_LOCAL, State.BROKEN}
    assert HOLDS_TEMP == {State.SNAPSHOT, State.MERGING, State.FLUSHING}
    assert IN_SERVICE == REBUILDABLE
    # a device stacked on the NAS disk needs a session to rebuild
    for state, kernel in KERNEL.items():
        if kernel.origin == "iscsi":
            assert kernel.session, state


def test_every_state_is_reachable_from_the_start():
    seen, todo = {START}, [START]
    while todo:
        here = todo.pop()
        for (src, _event), dst in TRANSITIONS.items():
            if src is here and isinstance(dst, State) and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    assert seen == set(State)
    assert states.PRIOR not in seen


# -- the store ------------------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    engine = make_engine(str(tmp_path / "vm.db"))
    create_schema(engine, Base)
    return VmStore(engine)


def test_the_store_applies_transitions_and_removes_rows(store):
    store.add("vol1", nas="nas-0-0", iscsi_target="iqn.x:vol1", sync=True, remotepool="tank")
    assert store.get("vol1").state == "attaching"
    row = store.transition("vol1", Event.SNAPSHOTTED, bdev="/dev/sdb", devsize=2048)
    assert (row.state, row.bdev, row.devsize) == ("snapshot", "/dev/sdb", 2048)
    assert [r.zvol for r in store.all(State.SNAPSHOT)] == ["vol1"]
    assert store.all(State.LOCAL) == []
    assert store.transition("vol1", Event.CLEANED) is None
    assert store.get("vol1") is None


def test_the_store_refuses_a_wrong_event_and_changes_nothing(store):
    store.add("vol1", nas="nas-0-0", iscsi_target="iqn.x:vol1")
    store.transition("vol1", Event.ATTACHED, bdev="/dev/sdb")
    with pytest.raises(StateError):
        store.transition("vol1", Event.MERGE, bdev="/dev/sdz")
    row = store.get("vol1")
    assert (row.state, row.bdev) == ("attached", "/dev/sdb")


def test_only_a_transition_changes_the_state(store):
    store.add("vol1", nas="nas-0-0", iscsi_target="iqn.x:vol1")
    with pytest.raises(StateError):
        store.update("vol1", state="local")
    with pytest.raises(StateError):
        store.update("vol1", prior_state="local")
    store.update("vol1", last_error="boom")
    assert (store.get("vol1").state, store.get("vol1").last_error) == ("attaching", "boom")


def test_broken_remembers_and_rebuilt_forgets_the_prior_state(store):
    store.add("vol1", nas="nas-0-0", iscsi_target="iqn.x:vol1", sync=True, remotepool="tank")
    store.transition("vol1", Event.SNAPSHOTTED)
    store.transition("vol1", Event.MERGE)
    store.transition("vol1", Event.MERGED)
    store.transition("vol1", Event.SWITCHED)
    row = store.transition("vol1", Event.BROKE, last_error="tank/vol1 is gone")
    assert (row.state, row.prior_state) == ("broken", "local")
    row = store.transition("vol1", Event.REBUILT)
    assert (row.state, row.prior_state) == ("local", None)
