import pytest

from imgstorage.errors import StateError
from imgstorage.nas.states import DISPLAY, TRANSITIONS, Event, State, display, next_state


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
            assert target in (State.UNMAPPED, State.MAPPED)


def test_every_state_is_displayed_as_the_seed_does():
    assert set(DISPLAY) == set(State)
    assert {display(s.value) for s in State} <= {"mapped", "unmapped", "NAS->VM", "NAS<-VM",
                                                 "NAS<-VM sched"}


def test_unknown_state():
    with pytest.raises(StateError):
        next_state("exploded", Event.MAP)
