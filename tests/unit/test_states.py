import pytest

from imgstorage.errors import StateError
from imgstorage.nas.states import (DISPLAY, PRIOR, RUNNING_FROM_COPY, SYNC_ACTIVE, TRANSITIONS,
                                   Event, State, display, next_state)


def test_direct_iscsi_life_cycle():
    s = State.UNMAPPED
    for event, expected in [(Event.MAP, State.MAPPING), (Event.ATTACHED, State.MAPPED),
                            (Event.UNMAP, State.UNMAPPING), (Event.DETACHED, State.UNMAPPED),
                            (Event.DELETE, State.DELETING)]:
        s = next_state(s.value, event)
        assert s == expected
    assert next_state(s.value, Event.DELETED) is None


@pytest.mark.parametrize("state,event", [
    (State.MAPPED, Event.MAP), (State.UNMAPPED, Event.UNMAP), (State.MAPPED, Event.DELETE),
    (State.MAPPING, Event.UNMAP), (State.UNMAPPING, Event.MAP),
])
def test_forbidden_transitions(state, event):
    with pytest.raises(StateError, match=f"cannot {event.value}"):
        next_state(state.value, event)


def test_failures_return_to_a_stable_state():
    for (state, event), target in TRANSITIONS.items():
        if event is Event.FAILED:
            assert target in (State.UNMAPPED, State.LOCAL, PRIOR)


def test_failed_unmap_returns_to_where_it_started():
    for start in (State.MAPPED, State.UPLOADING, State.MERGING, State.LOCAL, State.PULLING):
        s = next_state(start.value, Event.UNMAP)
        assert s == State.UNMAPPING
        assert next_state(s.value, Event.FAILED, prior=start.value) == start


def test_sync_life_cycle_and_its_display():
    path = [(Event.MAP, State.MAPPING, "mapped"), (Event.ATTACHED_SYNC, State.UPLOADING, "NAS->VM"),
            (Event.UPLOADED, State.MERGING, "mapped"), (Event.SYNCED, State.LOCAL, "mapped"),
            (Event.PULL, State.PULLING, "NAS<-VM sched"), (Event.PULLED, State.LOCAL, "mapped"),
            (Event.UNMAP, State.UNMAPPING, "mapped"),
            (Event.DETACHED_LOCAL, State.FINAL_PULL, "NAS<-VM"),
            (Event.PULLED, State.RELEASING, "NAS<-VM"),
            (Event.RELEASED, State.UNMAPPED, "unmapped")]
    s = State.UNMAPPED
    for event, expected, shown in path:
        s = next_state(s.value, event)
        assert s == expected and display(s.value) == shown


def test_a_final_pull_cannot_be_abandoned():
    """Nothing leads from final_pull to unmapped except a pull that arrived, or an
    administrator's clean (which is refused without force=true)."""
    exits = {e for (s, e) in TRANSITIONS if s is State.FINAL_PULL}
    assert exits == {Event.PULLED, Event.CLEANED}


def test_an_administrators_clean_leads_every_state_but_a_delete_to_unmapped():
    for state in State:
        if state is State.DELETING:
            assert (state, Event.CLEANED) not in TRANSITIONS
        else:
            assert next_state(state.value, Event.CLEANED) is State.UNMAPPED


def test_the_arrival_of_the_final_pull_is_recorded_before_the_copy_is_released():
    """final_pull --pulled--> releasing --released--> unmapped, and no other way out:
    a restarted daemon finds ``releasing`` and asks the container again."""
    assert next_state(State.FINAL_PULL.value, Event.PULLED) == State.RELEASING
    assert next_state(State.RELEASING.value, Event.RELEASED) == State.UNMAPPED
    assert {e for (s, e) in TRANSITIONS if s is State.RELEASING} == {Event.RELEASED,
                                                                       Event.CLEANED}
    for event in (Event.MAP, Event.UNMAP, Event.DELETE, Event.FAILED, Event.PULLED):
        with pytest.raises(StateError, match=f"cannot {event.value} a zvol that is releasing"):
            next_state(State.RELEASING.value, event)
    with pytest.raises(StateError, match="cannot released a zvol that is final_pull"):
        next_state(State.FINAL_PULL.value, Event.RELEASED)


def test_releasing_holds_nothing_the_nas_lacks():
    assert State.RELEASING not in SYNC_ACTIVE


def test_running_from_copy_is_derived_from_the_table():
    """From the copy's arrival until an unmap: merging, local and the periodic pulls."""
    assert RUNNING_FROM_COPY == {State.MERGING, State.LOCAL, State.PULLING}
    assert RUNNING_FROM_COPY <= SYNC_ACTIVE
    for state in RUNNING_FROM_COPY:
        assert next_state(state.value, Event.UNMAP) == State.UNMAPPING


def test_every_state_is_displayed_as_the_seed_does():
    assert set(DISPLAY) == set(State)
    assert {display(s.value) for s in State} <= {"mapped", "unmapped", "NAS->VM", "NAS<-VM",
                                                 "NAS<-VM sched"}


def test_unknown_state():
    with pytest.raises(StateError):
        next_state("exploded", Event.MAP)
