#!/usr/bin/env python3
"""How long a rebooted NAS takes to export its mapped zvols again.

A container keeps retrying a lost iSCSI target for open-iscsi's
``replacement_timeout`` (120 s by default) before it fails the VM's I/O, so
the re-export at daemon start must take seconds, not minutes.  On one
simulated NAS with N zvols mapped to containers (default 100, each with CHAP):

1. the NAS reboots (``imgstorage-sim reboot``), then the daemon's start-up
   re-export runs against its database: timed;
2. the same again with every target present (a restart without a reboot).

Printed: median, minimum and maximum per case and the per-target time, and
whether every target came back exactly as it was.  Nothing is asserted.
"""
from __future__ import annotations

import argparse
import logging
import time

import common
from common import MiB, NAS, POOL
from imgstorage.db import create_schema, make_engine
from imgstorage.drivers import NodeDrivers
from imgstorage.drivers.base import ChapCredentials
from imgstorage.drivers.sim import blockdev, dm, initiator, reboot, target, zfs
from imgstorage.nas.models import Base
from imgstorage.nas.reexport import reexport_targets
from imgstorage.nas.store import NasStore

STATES = ("mapped", "uploading", "merging")


def setup(root, n: int) -> NasStore:
    common.sim_host(root, NAS)
    nas = zfs.SimZfs(root, NAS)
    engine = make_engine(str(root / "nas.db"))
    create_schema(engine, Base)
    store = NasStore(engine)
    tgt = target.SimTarget(root, NAS)
    for i in range(n):
        host = f"vm-container-0-{i % 8}"
        zvol = f"compute-0-{i}-0-vol"
        iqn = f"iqn.2001-04.com.{NAS}-{zvol}"
        who = initiator.SimInitiator(root, host).initiator_name()
        nas.create_zvol(POOL, zvol, 64 * MiB, sparse=True)
        chap = ChapCredentials(f"imgstorage-{i:08x}", f"secret{i:010d}")
        store.add(zvol, POOL, 64 * MiB)
        store.update(zvol, state=STATES[i % len(STATES)], remotehost=host, iscsi_target=iqn,
                     initiator=who, chap_user=chap.userid, chap_secret=chap.password)
        tgt.create_target(iqn, nas.device_path(POOL, zvol), who, chap)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zvols", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    common.header(f"re-export of {args.zvols} mapped zvols at NAS daemon start (simulated kernel)")
    with common.scratch("reexport") as root:
        store = setup(root, args.zvols)
        drivers = NodeDrivers(zfs=zfs.SimZfs(root, NAS), target=target.SimTarget(root, NAS),
                              initiator=initiator.SimInitiator(root, NAS),
                              dm=dm.SimDeviceMapper(root, NAS),
                              blockdev=blockdev.SimBlockDevices(root, NAS))
        wanted = target.read_targets(root, NAS)
        after_reboot, present, exact = [], [], True
        for _ in range(args.reps):
            reboot.reboot(root, NAS)
            started = time.monotonic()
            report = reexport_targets(store, drivers)
            after_reboot.append(time.monotonic() - started)
            exact = exact and len(report.exported) == args.zvols \
                and target.read_targets(root, NAS) == wanted
            started = time.monotonic()
            again = reexport_targets(store, drivers)
            present.append(time.monotonic() - started)
            exact = exact and len(again.present) == args.zvols
        print(common.line("after a reboot (all exported)", after_reboot))
        print(common.line("restart, all present", present))
        per = sorted(after_reboot)[len(after_reboot) // 2] / max(args.zvols, 1)
        print(f"{'per target after a reboot':<34} {common.ms(per)}")
        print(f"{'every target back exactly':<34} {'yes' if exact else 'NO'}")


if __name__ == "__main__":
    main()
