"""sim_latency: the simulated kernel waits as long as the real one would, where it would."""
from __future__ import annotations

import pytest

from imgstorage import config
from imgstorage.drivers import hypervisor, node_drivers
from imgstorage.drivers.sim.latency import SUBSYSTEMS, Slowed
from imgstorage.errors import ConfigError


def sim_config(tmp_path, **keys):
    return config.from_dict(dict({"name": "nas-0-0", "backend": "sim",
                                  "sim_root": str(tmp_path)}, **keys))


def test_one_number_applies_to_every_subsystem(tmp_path):
    assert sim_config(tmp_path, sim_latency=0.25).sim_latency == {s: 0.25 for s in SUBSYSTEMS}


def test_an_object_gives_seconds_per_subsystem_and_missing_ones_cost_nothing(tmp_path):
    cfg = sim_config(tmp_path, sim_latency={"zfs": 0.2, "iscsi": 1})
    assert cfg.sim_latency == {"zfs": 0.2, "iscsi": 1.0}
    assert sim_config(tmp_path).sim_latency == {}


@pytest.mark.parametrize("value, why", [
    ({"zfs": 0.2, "disk": 1}, "unknown subsystem 'disk'"),
    ({"dm": -1}, "between 0 and 60"),
    ("0.5", "between 0 and 60"),
    (True, "between 0 and 60"),
    (600, "between 0 and 60"),
])
def test_a_bad_model_is_one_line_naming_the_key(tmp_path, value, why):
    with pytest.raises(ConfigError, match="sim_latency") as err:
        sim_config(tmp_path, sim_latency=value)
    assert why in str(err.value) and "\n" not in str(err.value)


def test_only_the_simulated_kernel_has_a_latency_model(tmp_path):
    with pytest.raises(ConfigError, match="only the simulated kernel"):
        config.from_dict({"name": "nas-0-0", "sim_latency": 0.1})


class Driver:
    kind = "sim"

    def __init__(self):
        self.calls = []

    def create(self, name, size=0):
        self.calls.append(("create", name, size))
        return f"made {name}"

    def _helper(self):
        return "private"


def test_each_public_call_waits_first_on_the_callers_thread():
    events = []
    inner = Driver()
    inner.calls = events
    slow = Slowed(inner, 0.5, sleep=lambda s: events.append(("sleep", s)))
    assert slow.create("vol1", size=3) == "made vol1"
    assert events == [("sleep", 0.5), ("create", "vol1", 3)]
    # attributes and private helpers are not kernel commands
    assert slow.kind == "sim" and slow._helper() == "private"
    assert events == [("sleep", 0.5), ("create", "vol1", 3)]
    assert slow.wrapped is inner


def test_node_drivers_wear_their_subsystems_latency(tmp_path):
    cfg = sim_config(tmp_path, sim_latency={"zfs": 0.2, "target": 0.3, "iscsi": 0.5,
                                            "dm": 0.05, "hypervisor": 0.7})
    drivers = node_drivers(cfg)
    assert {name: getattr(drivers, name)._seconds
            for name in ("zfs", "target", "initiator", "dm")} == {
        "zfs": 0.2, "target": 0.3, "initiator": 0.5, "dm": 0.05}
    assert not isinstance(drivers.blockdev, Slowed)      # a VM's own I/O, no command
    assert hypervisor(cfg)._seconds == 0.7


def test_without_a_model_the_drivers_are_untouched(tmp_path):
    drivers = node_drivers(sim_config(tmp_path, sim_latency={"zfs": 0}))
    assert not any(isinstance(getattr(drivers, name), Slowed)
                   for name in ("zfs", "target", "initiator", "dm", "blockdev"))
