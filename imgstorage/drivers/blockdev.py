"""Size and "is anyone using it?" for block devices.

Before a container tears down a VM's disk it must know that nothing still
holds it.  No single test sees every kind of user, so ``in_use`` asks three
ways, cheapest first: the kernel's holders list (another device-mapper or md
device stacked on top), an exclusive open (a mount, a dm table, LIO), and
``fuser`` (a process such as qemu that merely has it open).

A disk that has just appeared (an iSCSI login, a new zvol) is opened for a
moment by udev's workers (blkid, scsi_id) while they probe it: on a real
kernel fuser finds them for a second or two after the device exists.  Those
are not users, so when fuser finds someone, udev's queue is drained
(``udevadm settle``) and fuser asked once more.
"""
from __future__ import annotations

import errno
import glob
import logging
import os
from typing import Callable, Optional

from ..errors import CommandError, DriverError
from ..runner import Runner

log = logging.getLogger(__name__)

UDEV_SETTLE_TIMEOUT = 10


class RealBlockDevices:
    """BlockDevices on sysfs, ``blockdev`` and ``fuser``."""

    def __init__(self, runner: Runner, *, sysfs_root: str = "/sys",
                 opener: Callable[[str, int], int] = os.open,
                 closer: Callable[[int], None] = os.close) -> None:
        self.runner = runner
        self.sysfs_root = sysfs_root
        self._open = opener
        self._close = closer

    def size_bytes(self, device: str) -> int:
        argv = ["blockdev", "--getsize64", device]
        out = self.runner.run(argv).stdout.strip()
        try:
            return int(out)
        except ValueError:
            raise DriverError(f"`{' '.join(argv)}` printed {out!r}, not a size") from None

    def in_use(self, device: str) -> bool:
        if self._has_holders(device) or self._exclusive_open_fails(device):
            return True
        return self._fuser(device)

    # ------------------------------------------------------------- checks
    def kernel_name(self, device: str) -> Optional[str]:
        """``dm-3`` for ``/dev/mapper/x``, ``sdc`` for ``/dev/sdc``: the sysfs name."""
        real = os.path.realpath(device)
        name = os.path.basename(real)
        if os.path.isdir(os.path.join(self.sysfs_root, "class", "block", name)):
            return name
        if os.path.basename(os.path.dirname(device)) == "mapper":
            # A /dev/mapper node that is not a udev symlink: look the name up.
            wanted = os.path.basename(device)
            pattern = os.path.join(self.sysfs_root, "class", "block", "dm-*", "dm", "name")
            for path in glob.glob(pattern):
                try:
                    with open(path, encoding="utf-8") as fh:
                        if fh.read().strip() == wanted:
                            return os.path.basename(os.path.dirname(os.path.dirname(path)))
                except OSError:
                    continue
        return None

    def _has_holders(self, device: str) -> bool:
        name = self.kernel_name(device)
        if name is None:
            return False
        holders = os.path.join(self.sysfs_root, "class", "block", name, "holders")
        try:
            return bool(os.listdir(holders))
        except OSError:
            return False

    def _exclusive_open_fails(self, device: str) -> bool:
        """EBUSY means an exclusive holder; any other failure leaves it to fuser."""
        try:
            fd = self._open(device, os.O_RDONLY | os.O_EXCL)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return True
            log.debug("exclusive open of %s: %s", device, exc)
            return False
        self._close(fd)
        return False

    def _fuser(self, device: str) -> bool:
        if not self._fuser_once(device):
            return False
        if not self._udev_settle():
            return True
        return self._fuser_once(device)

    def _udev_settle(self) -> bool:
        """Wait for udev's probes to end; False when that could not be done."""
        argv = ["udevadm", "settle", f"--timeout={UDEV_SETTLE_TIMEOUT}"]
        try:
            result = self.runner.run(argv, check=False, timeout=UDEV_SETTLE_TIMEOUT + 10)
        except CommandError as exc:      # no udevadm here (a container), or it hung
            log.debug("udevadm settle: %s", exc)
            return False
        return result.returncode == 0

    def _fuser_once(self, device: str) -> bool:
        argv = ["fuser", "-s", device]
        result = self.runner.run(argv, check=False)
        if result.returncode == 0:
            return True
        if result.returncode == 1:
            return False
        raise CommandError(argv, result.returncode, result.stderr, result.stdout)
