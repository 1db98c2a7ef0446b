"""What both sides' state machines share: applying one event to a transition table.

imgstorage/nas/states.py and imgstorage/vm/states.py each hold their own
states, events and table; this is the one rule for reading them, so the two
sides refuse a wrong event with the same kind of error.
"""
from __future__ import annotations

from enum import Enum
from typing import Dict, Optional, Tuple, Type, TypeVar, Union

from .errors import StateError

PRIOR = "prior"         # a target meaning: back to the state recorded when the operation began

S = TypeVar("S", bound=Enum)


def apply(table: Dict[Tuple[S, Enum], Union[S, None, str]], states: Type[S], current: str,
          event: Enum, prior: Optional[str], what: str) -> Optional[S]:
    """The state after ``event`` (None: the row goes); StateError when it is not allowed now.

    ``what`` names the side's states in errors ("zvol", "container").
    """
    try:
        state = states(current)
    except ValueError:
        raise StateError(f"unknown {what} state {current!r}") from None
    key = (state, event)
    if key not in table:
        raise StateError(f"cannot {event.value} a zvol that is {state.value}")
    target = table[key]
    if target == PRIOR:
        try:
            return states(prior)
        except ValueError:
            raise StateError(f"zvol has no valid prior state to return to ({prior!r})") from None
    return target
