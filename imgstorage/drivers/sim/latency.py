"""The real kernel's waits, on the simulated kernel (``sim_latency``).

Every simulated kernel command is nearly free, which hides what a real
cluster sees: seconds in ``zfs create``, target creation and ``iscsiadm``
logins, multiplied by whatever serialises them.  A driver wrapped here sleeps
before each of its public methods (each stands for one kernel command), on
the calling thread, so it blocks exactly what a slow real command would
block: the zvol's lock, a worker, the request.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict

SUBSYSTEMS = ("zfs", "target", "iscsi", "dm", "hypervisor")


class Slowed:
    """``driver`` with ``seconds`` added to every public method call."""

    def __init__(self, driver: Any, seconds: float,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._driver = driver
        self._seconds = seconds
        self._sleep = sleep

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._driver, name)
        if name.startswith("_") or not callable(value):
            return value
        seconds, sleep = self._seconds, self._sleep

        def slowed(*args: Any, **kwargs: Any) -> Any:
            sleep(seconds)
            return value(*args, **kwargs)
        slowed.__name__ = name
        slowed.__doc__ = value.__doc__
        return slowed

    @property
    def wrapped(self) -> Any:
        return self._driver


def slowed(driver: Any, latency: Dict[str, float], subsystem: str) -> Any:
    """``driver`` itself when its subsystem costs nothing, else the driver slowed down."""
    seconds = latency.get(subsystem, 0.0)
    return Slowed(driver, seconds) if seconds > 0 else driver
