"""Device-mapper through ``dmsetup``, and the three tables sync mode uses.

A sync-mode VM boots on a ``snapshot`` of its iSCSI disk whose writes land in
a local sparse zvol; once the NAS copy has arrived the table becomes
``snapshot-merge`` (writes folded into the local copy) and finally ``linear``
on the local zvol, so the iSCSI session can go.
"""
from __future__ import annotations

import re
from typing import List, Optional

from ..errors import CommandError
from ..runner import Runner
from .base import DmStatus

# A persistent snapshot ("P") survives a reboot of the container; chunks of
# 16 sectors (8 KiB) are what the original tools used.
DEFAULT_CHUNK = 16

# "[name: ]start length type args": dmsetup prints one space after the type
# even when args are empty (linear).
_FIELDS = r"(?P<start>\d+) (?P<length>\d+) (?P<type>\S+) ?(?P<args>.*)$"
_NAMED_LINE = re.compile(r"^(?P<name>.+?): " + _FIELDS)
_BARE_LINE = re.compile(r"^" + _FIELDS)


def _check_table_args(length_sectors: int, *devices: str) -> None:
    # A space or newline in a path would silently become extra table fields.
    if isinstance(length_sectors, bool) or not isinstance(length_sectors, int) \
            or length_sectors <= 0:
        raise ValueError(f"invalid device-mapper length {length_sectors!r}")
    for device in devices:
        if not device or any(c.isspace() for c in device):
            raise ValueError(f"invalid device path for a device-mapper table: {device!r}")


def _check_chunk(chunk: int) -> None:
    if not isinstance(chunk, int) or chunk <= 0 or chunk & (chunk - 1):
        raise ValueError(f"snapshot chunk size must be a power of two, got {chunk!r}")


def snapshot_table(length_sectors: int, origin: str, cow: str, chunk: int = DEFAULT_CHUNK) -> str:
    """Reads fall through to ``origin``; writes go to ``cow``."""
    _check_table_args(length_sectors, origin, cow)
    _check_chunk(chunk)
    return f"0 {length_sectors} snapshot {origin} {cow} P {chunk}"


def snapshot_merge_table(length_sectors: int, origin: str, cow: str,
                         chunk: int = DEFAULT_CHUNK) -> str:
    """Copies the chunks in ``cow`` back into ``origin`` while staying usable."""
    _check_table_args(length_sectors, origin, cow)
    _check_chunk(chunk)
    return f"0 {length_sectors} snapshot-merge {origin} {cow} P {chunk}"


def linear_table(length_sectors: int, device: str) -> str:
    """The whole of ``device``, once nothing is left to merge."""
    _check_table_args(length_sectors, device)
    return f"0 {length_sectors} linear {device} 0"


def parse_status(stdout: str, name: Optional[str] = None) -> List[DmStatus]:
    """Lines of ``dmsetup status``; ``name`` for the one-device form without prefixes."""
    statuses = []
    for line in stdout.splitlines():
        if not line.strip() or line.strip() == "No devices found":
            continue
        if name is not None:
            m = _BARE_LINE.match(line)
            dev = name
        else:
            m = _NAMED_LINE.match(line)
            dev = m.group("name") if m else ""
        if not m:
            continue
        statuses.append(DmStatus(dev, int(m.group("start")), int(m.group("length")),
                                 m.group("type"), m.group("args").rstrip()))
    return statuses


class Dmsetup:
    """DeviceMapperDriver on the ``dmsetup`` command."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def create(self, name: str, table: str) -> None:
        self.runner.run(["dmsetup", "create", name, "--table", table])

    def reload(self, name: str, table: str) -> None:
        self.runner.run(["dmsetup", "reload", name, "--table", table])

    def suspend(self, name: str) -> None:
        self.runner.run(["dmsetup", "suspend", name])

    def resume(self, name: str) -> None:
        self.runner.run(["dmsetup", "resume", name])

    def remove(self, name: str) -> None:
        """Removing a device that is already gone is not an error."""
        try:
            self.runner.run(["dmsetup", "remove", "--retry", name])
        except CommandError:
            if self.exists(name):
                raise

    def status(self, name: Optional[str] = None) -> List[DmStatus]:
        """Every device's status lines; [] when ``name`` does not exist."""
        argv = ["dmsetup", "status"] + ([name] if name is not None else [])
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if name is not None and "Device does not exist" in result.stderr:
                return []
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)
        return parse_status(result.stdout, name)

    def table(self, name: str) -> str:
        return self.runner.run(["dmsetup", "table", name]).stdout.strip()

    def exists(self, name: str) -> bool:
        argv = ["dmsetup", "info", name]
        result = self.runner.run(argv, check=False)
        if result.returncode == 0:
            return True
        if "Device does not exist" in result.stderr + result.stdout:
            return False
        # No kernel driver, no permission: not an answer to the question.
        raise CommandError(argv, result.returncode, result.stderr, result.stdout)
