"""The real-kernel tier: build or reuse the guest image, boot the cluster, run the scenarios.

Prints one line per scenario with its time, then ``N passed, N failed``;
exits 0 only when every scenario passed.  The run's folder (consoles,
daemon logs, journals, dmesg of both guests) is kept when something failed,
or always with ``--keep``.  With IMGSTORAGE_KERNEL_TRACE=1 every call into
a guest and every rocks command prints its time on stderr, to find where a
scenario spends it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import build_image  # noqa: E402
from cluster import KernelCluster  # noqa: E402
import scenarios  # noqa: E402
from scenarios import SCENARIOS  # noqa: E402


def say(msg: str) -> None:
    print(f"[kernel] {msg}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="only", action="append", default=[],
                        help="run only the scenarios whose name contains this (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder")
    parser.add_argument("--record", action="store_true",
                        help="write the real tools' output as fixtures under tests/fixtures/")
    parser.add_argument("--workdir", help="the run folder (default: a new one in /var/tmp)")
    parser.add_argument("--accel", choices=("tcg", "kvm"),
                        default=os.environ.get("IMGSTORAGE_KERNEL_ACCEL", "tcg"),
                        help="tcg (default: works everywhere) or kvm (hardware "
                             "virtualisation only)")
    parser.add_argument("--hold-file",
                        help="after the scenarios, keep the guests up while this file exists")
    parser.add_argument("--smp", type=int, default=1, help="virtual CPUs per guest")
    parser.add_argument("--memory", type=int, default=1536, help="MiB per guest")
    args = parser.parse_args()

    # A stopped run still powers its guests off and removes its broker user (finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    total = time.monotonic()
    started = time.monotonic()
    image = build_image.ensure_image()
    say(f"guest image {image.name} ready in {time.monotonic() - started:.0f}s")

    workdir = Path(args.workdir) if args.workdir else Path(
        tempfile.mkdtemp(prefix="imgstorage-kernel-", dir="/var/tmp"))
    cluster = KernelCluster(workdir, image, accel=args.accel, smp=args.smp, memory=args.memory)
    cluster.recording = args.record
    chosen = [(n, f) for n, f in SCENARIOS if not args.only or any(k in n for k in args.only)]
    results = []
    cluster.setup_broker()
    try:
        cluster.write_payload()
        boot = cluster.boot()
        say(f"NAS and VM container booted ({args.accel}) in {boot:.0f}s")
        started = time.monotonic()
        cluster.start_daemons()
        cluster.register()
        say(f"daemons up and registered in {time.monotonic() - started:.0f}s "
            f"(ZFS driver: {cluster.zfs_driver(cluster.nas)})")
        for name, scenario in chosen:
            notes = []
            started = time.monotonic()
            try:
                scenario(cluster, notes.append)
                ok, why = True, ""
            except Exception as exc:  # every scenario runs and reports
                ok, why = False, f"{type(exc).__name__}: {exc}"
                (workdir / f"{name}.traceback.txt").write_text(traceback.format_exc())
                try:
                    notes.append("left behind: " + (", ".join(scenarios.tidy(cluster)) or "nothing"))
                except Exception as tidy_exc:  # the next scenario will say what is wrong
                    notes.append(f"tidying failed: {tidy_exc}")
            took = time.monotonic() - started
            extra = f" ({'; '.join(notes)})" if notes else ""
            print(f"{'PASS' if ok else 'FAIL'} {name} {took:.1f}s{extra}"
                  f"{'' if ok else ' - ' + why}", flush=True)
            results.append(ok)
        if args.hold_file:
            Path(args.hold_file).touch()
            say(f"holding the guests while {args.hold_file} exists (agents: "
                + ", ".join(f"{g.name} 127.0.0.1:{g.agent_port}" for g in cluster.guests.values())
                + f"; IMGSTORAGE_CONF={cluster.frontend_conf})")
            while Path(args.hold_file).exists():
                time.sleep(2)
    except Exception as exc:
        print(f"FAIL kernel-cluster - {type(exc).__name__}: {exc}", flush=True)
        (workdir / "cluster.traceback.txt").write_text(traceback.format_exc())
        results += [False] * (len(chosen) - len(results))
    finally:
        cluster.collect_logs()
        cluster.shutdown()
        cluster.teardown_broker()
    passed, failed = results.count(True), results.count(False)
    say(f"total {time.monotonic() - total:.0f}s")
    if failed or args.keep:
        say(f"logs and consoles in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 and passed == len(chosen) and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
