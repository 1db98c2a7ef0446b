"""``imgstorage-sim``: the administrator's and the tester's hands on the simulated kernel.

It makes pools (which no daemon may do: a pool is the administrator's), shows
what the simulated hosts hold, and reads or writes raw bytes of any device as
a host sees it, which is how a test puts a pattern into a VM's disk and checks
what reached the NAS.  ``sim_root`` comes from ``--sim-root`` or from the node
configuration (``IMGSTORAGE_CONF``).  Every failure is one line on stderr and a
non-zero exit status; nothing is changed by a rejected command.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence

import click

from ... import config as node_config
from ... import naming
from ...errors import ImgStorageError, ValidationError
from . import blockdev, dm, hypervisor, initiator, reboot, state, zfs

PROG = "imgstorage-sim"
_UNITS = "BKMGTPE"


class _OneLineErrors(click.Group):
    """Report every error as one line, never a usage block or a traceback."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        code = 0
        try:
            rv = super().main(args=args, prog_name=prog_name or PROG, complete_var=complete_var,
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.ClickException as exc:
            if _asks_for_help(exc):
                click.echo(exc.ctx.get_help())         # a bare group name: show what it offers
            else:
                code = _complain(exc.format_message(), exc.exit_code)
        except click.Abort:
            code = _complain("aborted", 1)
        except (ImgStorageError, OSError) as exc:
            code = _complain(str(exc), 1)
        if standalone_mode:
            sys.exit(code)
        return code


def _asks_for_help(exc: click.ClickException) -> bool:
    """Newer click reports a group called without a command as an error carrying its help."""
    kind = getattr(click.exceptions, "NoArgsIsHelpError", None)
    return kind is not None and isinstance(exc, kind) and getattr(exc, "ctx", None) is not None


def _complain(message: str, code: int) -> int:
    click.echo(f"{PROG}: error: {' '.join(str(message).split())}", err=True)
    return code or 1


# ---------------------------------------------------------------- helpers
def _root(ctx: click.Context) -> Path:
    explicit = ctx.find_root().params.get("sim_root")
    if explicit:
        return Path(explicit)
    cfg = node_config.load()
    if not cfg.sim_root:
        raise ValidationError(f"{cfg.path}: no sim_root (this node does not use the sim backend); "
                              "pass --sim-root")
    return Path(cfg.sim_root)


def _known(root: Path, host: str) -> str:
    state.sim_host(host)
    if not state.host_exists(root, host):
        raise ValidationError(f"unknown sim host {host!r}: no folder {root / host}")
    return host


def _whole(kind: str, text: str) -> int:
    value = naming.non_negative_int(kind, text, allow_none=False)
    assert value is not None
    return value


def _parse_size(text: str) -> int:
    """``1099511627776``, ``512G``, ``1T``: binary units, as zpool sizes are written."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)i?B?\s*", text or "", re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise ValidationError(f"invalid size {text!r}: expected a number with K, M, G, T or P")
    return int(m.group(1)) << (10 * _UNITS.index(m.group(2).upper() or "B"))


def nicenum(value: int) -> str:
    """Sizes as ``zfs list`` prints them: 1024-based, at most 5 characters (37.1G, 3.60G, 231G)."""
    index = 0
    while index < len(_UNITS) - 1 and value >= 1024 ** (index + 1):
        index += 1
    if index == 0:
        return f"{value}B"
    unit = 1024 ** index
    if value % unit == 0:
        return f"{value // unit}{_UNITS[index]}"
    for places in (2, 1, 0):
        text = f"{value / unit:.{places}f}{_UNITS[index]}"
        if len(text) <= 5:
            return text
    return text


def _table(header: List[str], rows: List[List[str]], right: Sequence[int] = ()) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        click.echo("  ".join(cells).rstrip())


_host_option = click.option("--host", "host", required=True, metavar="HOST",
                            help="The simulated host, a folder under sim_root.")


# --------------------------------------------------------------- commands
@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--sim-root", type=click.Path(file_okay=False), default=None,
              help="Folder of the simulated cluster (default: sim_root of the node configuration).")
def cli(sim_root: Optional[str]) -> None:
    """Inspect and drive the simulated kernel of an imgstorage test cluster."""


@cli.group("zpool")
def zpool_group() -> None:
    """Pools of a simulated host."""


@zpool_group.command("create")
@_host_option
@click.option("--size", default="1T", show_default=True, help="Pool capacity (K, M, G, T, P).")
@click.argument("pool")
@click.pass_context
def zpool_create(ctx: click.Context, host: str, size: str, pool: str) -> None:
    """Create POOL on HOST (the host's folder is made if it is new)."""
    state.sim_host(host)
    state.zpool_name(pool)
    zfs.create_pool(_root(ctx), host, pool, _parse_size(size))


@zpool_group.command("list")
@_host_option
@click.pass_context
def zpool_list(ctx: click.Context, host: str) -> None:
    """Pools of HOST with their size and allocation."""
    root = _root(ctx)
    driver = zfs.SimZfs(root, _known(root, host))
    rows = []
    for pool in driver.list_pools():
        use = driver.pool_usage(pool)
        rows.append([pool, nicenum(use["size"]), nicenum(use["used"]),
                     nicenum(use["size"] - use["used"]), "ONLINE"])
    if not rows:
        click.echo("no pools available")
        return
    _table(["NAME", "SIZE", "ALLOC", "FREE", "HEALTH"], rows, right=(1, 2, 3))


@cli.group("zfs")
def zfs_group() -> None:
    """Datasets of a simulated host."""


@zfs_group.command("list")
@_host_option
@click.pass_context
def zfs_list(ctx: click.Context, host: str) -> None:
    """Pools and zvols of HOST (USED and REFER are the bytes actually allocated)."""
    root = _root(ctx)
    driver = zfs.SimZfs(root, _known(root, host))
    rows = []
    for pool in driver.list_pools():
        use = driver.pool_usage(pool)
        rows.append([pool, nicenum(use["used"]), nicenum(use["avail"]), "0B", f"/{pool}"])
        for vol in driver.list_zvols(pool):
            rows.append([vol.name, nicenum(vol.used), nicenum(use["avail"]),
                         nicenum(vol.refer), "-"])
    if not rows:
        click.echo("no datasets available")
        return
    _table(["NAME", "USED", "AVAIL", "REFER", "MOUNTPOINT"], rows, right=(1, 2, 3))


def _snapshot_ref(text: str) -> tuple:
    """``POOL/ZVOL@SNAP`` as its three names."""
    m = re.fullmatch(r"([^/@]+)/([^/@]+)@([^/@]+)", text or "")
    if not m:
        raise ValidationError(f"invalid snapshot {text!r}: expected POOL/ZVOL@SNAPSHOT")
    return m.group(1), m.group(2), m.group(3)


def _zvol_ref(text: str) -> tuple:
    m = re.fullmatch(r"([^/@]+)/([^/@]+)", text or "")
    if not m:
        raise ValidationError(f"invalid zvol {text!r}: expected POOL/ZVOL")
    return m.group(1), m.group(2)


@zfs_group.command("snapshots")
@_host_option
@click.argument("zvol")
@click.pass_context
def zfs_snapshots(ctx: click.Context, host: str, zvol: str) -> None:
    """Snapshots of POOL/ZVOL on HOST, oldest first, with their guid and holds."""
    root = _root(ctx)
    driver = zfs.SimZfs(root, _known(root, host))
    pool, name = _zvol_ref(zvol)
    rows = [[f"{pool}/{name}@{snap}", str(driver.snapshot_guid(pool, name, snap)),
             ",".join(driver.holds(pool, name, snap)) or "-"]
            for snap in driver.list_snapshots(pool, name)]
    if not rows:
        click.echo("no datasets available")
        return
    _table(["NAME", "GUID", "HOLDS"], rows)


@zfs_group.command("release")
@_host_option
@click.argument("tag")
@click.argument("snapshot")
@click.pass_context
def zfs_release(ctx: click.Context, host: str, tag: str, snapshot: str) -> None:
    """Release the hold TAG on POOL/ZVOL@SNAP (``zfs release``)."""
    root = _root(ctx)
    pool, name, snap = _snapshot_ref(snapshot)
    zfs.SimZfs(root, _known(root, host)).release(pool, name, snap, tag)


@zfs_group.command("destroy")
@_host_option
@click.argument("snapshot")
@click.pass_context
def zfs_destroy(ctx: click.Context, host: str, snapshot: str) -> None:
    """Destroy the snapshot POOL/ZVOL@SNAP (refused while it is held)."""
    root = _root(ctx)
    pool, name, snap = _snapshot_ref(snapshot)
    zfs.SimZfs(root, _known(root, host)).destroy_snapshot(pool, name, snap)


@cli.command("write")
@_host_option
@click.option("--offset", default="0", show_default=True, help="Byte offset to write at.")
@click.argument("device")
@click.pass_context
def write_cmd(ctx: click.Context, host: str, offset: str, device: str) -> None:
    """Write the bytes of stdin into DEVICE as HOST sees it."""
    root = _root(ctx)
    where = _whole("offset", offset)
    dev = blockdev.open_device(root, _known(root, host), device)
    dev.write(where, sys.stdin.buffer.read())


@cli.command("read")
@_host_option
@click.option("--offset", default="0", show_default=True, help="Byte offset to read from.")
@click.option("--length", required=True, help="Number of bytes to read.")
@click.argument("device")
@click.pass_context
def read_cmd(ctx: click.Context, host: str, offset: str, length: str, device: str) -> None:
    """Copy LENGTH bytes of DEVICE, as HOST sees it, to stdout."""
    root = _root(ctx)
    where, count = _whole("offset", offset), _whole("length", length)
    data = blockdev.open_device(root, _known(root, host), device).read(where, count)
    out = sys.stdout.buffer
    out.write(data)
    out.flush()


@cli.group("dmsetup")
def dmsetup_group() -> None:
    """Device-mapper devices of a simulated host."""


@dmsetup_group.command("status")
@_host_option
@click.argument("name", required=False)
@click.pass_context
def dmsetup_status(ctx: click.Context, host: str, name: Optional[str]) -> None:
    """Status lines as dmsetup status prints them (looking also advances merges)."""
    root = _root(ctx)
    lines = dm.SimDeviceMapper(root, _known(root, host)).status(name)
    if not lines:
        click.echo("No devices found")
    for s in lines:
        click.echo(f"{s.name}: {s.start} {s.length} {s.target_type} {s.args}".rstrip())


@cli.group("iscsi")
def iscsi_group() -> None:
    """iSCSI initiator of a simulated host."""


@iscsi_group.command("sessions")
@_host_option
@click.pass_context
def iscsi_sessions(ctx: click.Context, host: str) -> None:
    """Sessions of HOST and the disk each one attached."""
    root = _root(ctx)
    sessions = initiator.SimInitiator(root, _known(root, host)).sessions()
    if not sessions:
        click.echo("No active sessions")
    for s in sessions:
        click.echo(f"tcp: [{s.sid}] {s.portal},1 {s.iqn} (non-flash) /dev/{s.device}")


@cli.command("domains")
@_host_option
@click.pass_context
def domains_cmd(ctx: click.Context, host: str) -> None:
    """Domains the simulated hypervisor of HOST knows, with their disk."""
    root = _root(ctx)
    doms = hypervisor.SimHypervisor(root).domains(_known(root, host))
    _table(["NAME", "STATE", "DISK"], [[d.name, d.state, ",".join(d.disks) or "-"] for d in doms])


@cli.command("reboot")
@_host_option
@click.pass_context
def reboot_cmd(ctx: click.Context, host: str) -> None:
    """Reboot HOST: drop what its kernel held in memory, keep its disks.

    iSCSI targets, initiator sessions, device-mapper tables and running domains
    vanish (a daemon still running there sees its devices fail, as after a
    crash); pools, zvols, snapshots, holds, partial resumable receives, the
    initiator name and every byte on disk stay.  Prints one line per object
    dropped and a summary.  Daemons of HOST are not touched: kill them first
    for a faithful power cut.
    """
    root = _root(ctx)
    for line in reboot.reboot(root, _known(root, host)).lines():
        click.echo(line)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name=PROG)
