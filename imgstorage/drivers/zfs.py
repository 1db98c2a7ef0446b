"""ZFS volumes through the ``zfs``/``zpool`` commands or OpenZFS's libzfs_core.

Listing always goes through ``zfs list -Hp``: scripted mode is tab separated
with exact byte counts, and libzfs_core has no stable listing call.  Creating
and destroying use libzfs_core when pyzfs is installed, because errno values
are sturdier than parsed text; the command stays the fallback for what the
library cannot do the same way.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any, Callable, List, Optional

from ..errors import CommandError, DriverError, NotFoundError
from ..runner import Runner
from .base import ZvolInfo

log = logging.getLogger(__name__)

VOLBLOCKSIZE = 128 * 1024
# The original tools created every zvol this way: metadata-only ARC caching
# (the VM's own page cache holds the data) and large blocks for streaming.
CREATE_OPTIONS = ["-o", "primarycache=metadata", "-o", "volblocksize=128K"]
LIST_FIELDS = "name,volsize,used,refer"
DEVICE_TIMEOUT = 30.0
POLL_INTERVAL = 0.1
# libzfs_core hands properties to the kernel untranslated, and the kernel
# takes index properties as numbers: 1 is "metadata" for primarycache.
PRIMARYCACHE_METADATA = 1


def _missing(stderr: str) -> bool:
    return "dataset does not exist" in stderr


def _number(text: str) -> int:
    return 0 if text in ("-", "") else int(text)


def parse_zfs_list(stdout: str) -> List[ZvolInfo]:
    """Rows of ``zfs list -Hp -o name,volsize,used,refer``."""
    zvols = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            if len(fields) != 4:
                raise ValueError("expected 4 fields")
            zvols.append(ZvolInfo(fields[0], _number(fields[1]), _number(fields[2]),
                                  _number(fields[3])))
        except ValueError as exc:
            log.warning("ignoring unreadable zfs list line %r: %s", line, exc)
    return zvols


class ZfsCli:
    """ZfsDriver on the ``zfs`` and ``zpool`` commands."""

    def __init__(self, runner: Runner, *, device_timeout: float = DEVICE_TIMEOUT,
                 path_exists: Callable[[str], bool] = os.path.exists,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runner = runner
        self.device_timeout = device_timeout
        self._path_exists = path_exists
        self._sleep = sleep
        self._clock = clock

    # ------------------------------------------------------------ queries
    def list_pools(self) -> List[str]:
        out = self.runner.run(["zpool", "list", "-Hp", "-o", "name"]).stdout
        return [line.strip() for line in out.splitlines()
                if line.strip() and line.strip() != "no pools available"]

    def pool_exists(self, pool: str) -> bool:
        return pool in self.list_pools()

    def list_zvols(self, pool: Optional[str] = None) -> List[ZvolInfo]:
        argv = ["zfs", "list", "-Hp", "-o", LIST_FIELDS, "-t", "volume"]
        if pool is not None:
            argv += ["-r", pool]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if pool is not None and _missing(result.stderr):
                return []
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)
        return parse_zfs_list(result.stdout)

    def get_zvol(self, pool: str, zvol: str) -> Optional[ZvolInfo]:
        name = f"{pool}/{zvol}"
        argv = ["zfs", "list", "-Hp", "-o", LIST_FIELDS, "-t", "volume", name]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if _missing(result.stderr):
                return None
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)
        for info in parse_zfs_list(result.stdout):
            if info.name == name:
                return info
        return None

    def device_path(self, pool: str, zvol: str) -> str:
        return f"/dev/zvol/{pool}/{zvol}"

    # ------------------------------------------------------------ changes
    def create_zvol(self, pool: str, zvol: str, size_bytes: int, sparse: bool = False) -> None:
        _check_size(size_bytes)
        argv = ["zfs", "create", *CREATE_OPTIONS, "-V", str(size_bytes)]
        if sparse:
            argv.append("-s")
        argv.append(f"{pool}/{zvol}")
        self.runner.run(argv)
        self._wait_for_device(self.device_path(pool, zvol))

    def destroy(self, pool: str, zvol: str, recursive: bool = True) -> None:
        name = f"{pool}/{zvol}"
        argv = ["zfs", "destroy"] + (["-r"] if recursive else []) + [name]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if _missing(result.stderr):
                raise NotFoundError(f"zvol {name} does not exist")
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)

    def _wait_for_device(self, path: str) -> None:
        """udev makes the /dev/zvol link after zfs returns; callers open it at once."""
        if self._path_exists(path):
            return
        try:
            self.runner.run(["udevadm", "settle", f"--timeout={int(self.device_timeout)}",
                             f"--exit-if-exists={path}"],
                            check=False, timeout=self.device_timeout + 10)
        except CommandError as exc:
            # No udevadm (a container) or it hung: the polling below decides.
            log.debug("udevadm settle: %s", exc)
        deadline = self._clock() + self.device_timeout
        while not self._path_exists(path):
            if self._clock() >= deadline:
                raise DriverError(f"{path} did not appear within {self.device_timeout:g} s "
                                  "of creating the zvol")
            self._sleep(POLL_INTERVAL)


def _check_size(size_bytes: int) -> None:
    # ZFS refuses a volsize that is not a multiple of volblocksize; say so in
    # our words before the library answers with a bare EINVAL.
    if not isinstance(size_bytes, int) or size_bytes <= 0 or size_bytes % VOLBLOCKSIZE:
        raise DriverError(f"zvol size {size_bytes!r} is not a positive multiple of 128 KiB")


class LibZfsCoreZfs(ZfsCli):
    """ZfsDriver that creates and destroys through pyzfs's libzfs_core.

    A thick (non-sparse) zvol still goes through ``zfs create``: the command
    sizes its refreservation from the pool's layout (parity, metadata), which
    libzfs_core leaves to the caller.
    """

    def __init__(self, runner: Runner, lzc: Any = None, **kwargs: Any) -> None:
        super().__init__(runner, **kwargs)
        if lzc is None:
            import libzfs_core as lzc
            import libzfs_core.exceptions  # noqa: F401 - binds lzc.exceptions
        self.lzc = lzc
        self._zfs_error = lzc.exceptions.ZFSError

    def create_zvol(self, pool: str, zvol: str, size_bytes: int, sparse: bool = False) -> None:
        if not sparse:
            super().create_zvol(pool, zvol, size_bytes, sparse=False)
            return
        _check_size(size_bytes)
        name = f"{pool}/{zvol}"
        props = {b"volsize": size_bytes, b"volblocksize": VOLBLOCKSIZE,
                 b"primarycache": PRIMARYCACHE_METADATA}
        try:
            self.lzc.lzc_create(name.encode(), ds_type="zvol", props=props)
        except self._zfs_error as exc:
            raise self._create_error(name, pool, exc) from None
        self._wait_for_device(self.device_path(pool, zvol))

    def _create_error(self, name: str, pool: str, exc: Exception) -> DriverError:
        """Word the failure as ``zfs create`` would, so operators see one vocabulary."""
        code = getattr(exc, "errno", None)
        if code == errno.ENOENT:
            if not self.lzc.lzc_exists(pool.encode()):
                return DriverError(f"cannot create '{name}': no such pool '{pool}'")
            return DriverError(f"cannot create '{name}': parent does not exist")
        if code == errno.EEXIST:
            return DriverError(f"cannot create '{name}': dataset already exists")
        return DriverError(f"cannot create '{name}': {exc}")

    def destroy(self, pool: str, zvol: str, recursive: bool = True) -> None:
        name = f"{pool}/{zvol}"
        try:
            self.lzc.lzc_destroy(name.encode())
            return
        except self._zfs_error as exc:
            code = getattr(exc, "errno", None)
            if code == errno.ENOENT:
                raise NotFoundError(f"zvol {name} does not exist") from None
            # EBUSY: snapshots (or an open device); EEXIST: child datasets.
            # ``zfs destroy -r`` removes the former and names the real cause
            # of the latter, so hand those cases to the command.
            if not (recursive and code in (errno.EBUSY, errno.EEXIST)):
                raise DriverError(f"cannot destroy '{name}': {exc}") from None
        super().destroy(pool, zvol, recursive=True)


def make_zfs(runner: Runner) -> ZfsCli:
    """The best ZFS driver this machine can run."""
    try:
        import libzfs_core
    except ImportError:
        return ZfsCli(runner)
    return LibZfsCoreZfs(runner, libzfs_core)
