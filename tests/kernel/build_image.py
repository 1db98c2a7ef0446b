#!/usr/bin/env python3
"""Build (or find in the cache) the guest image of the real-kernel test tier.

The guest is Debian bookworm with its stock kernel, because that kernel has
everything imgstorage drives on a real node: device-mapper snapshots, the LIO
iSCSI target, the open-iscsi initiator; ZFS is built for exactly that kernel
with zfs-dkms in a throw-away chroot.  Everything comes from Debian's
packages (main, contrib; bookworm, -updates and -security, where the kernel
lives) and, for the project's Python dependencies, from wheels built with
``pip wheel``: bookworm's own SQLAlchemy is older than the project needs.

Output, under ``$IMGSTORAGE_KERNEL_CACHE`` (default ``~/.cache/imgstorage-kernel``),
in a folder named after the kernel version and a hash of this file and the
project's dependency list:

    vmlinuz, initrd.img   booted with qemu's -kernel/-initrd
    root.ext4             the root file system, always used with snapshot=on
    manifest.json         what was built, from what, and how long it took

The project itself is not in the image: the runner installs its freshly
built wheel at each boot, so editing the code never needs a rebuild.

Usage: build_image.py [--print-dir] [--force]
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent
MIRROR = os.environ.get("IMGSTORAGE_KERNEL_MIRROR", "http://deb.debian.org/debian")
SECURITY = os.environ.get("IMGSTORAGE_KERNEL_SECURITY", "http://deb.debian.org/debian-security")
SUITE = "bookworm"
COMPONENTS = "main contrib"

# What the guest needs to be a NAS or a VM container (and nothing to boot a desktop).
# python3-pyzfs gives imgstorage its libzfs_core driver, as on a production node.
GUEST_PACKAGES = [
    "systemd", "systemd-sysv", "udev", "dbus", "kmod", "iproute2", "procps", "psmisc",
    "util-linux", "e2fsprogs", "initramfs-tools", "zstd",
    "python3", "python3-pip", "python3-rtslib-fb", "python3-pyzfs",
    "open-iscsi", "dmsetup", "zfsutils-linux",
]
GUEST_PYTHON = "3.11"          # bookworm's python3
# Modules the initrd needs to find the root disk; the rest load from the root.
INITRD_MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "ext4", "crc32c_generic"]
# Module trees a storage node never loads: pruned to keep the image small.
PRUNE_MODULES = ["sound", "drivers/gpu", "drivers/net/wireless", "drivers/media",
                 "drivers/infiniband", "drivers/staging", "drivers/bluetooth", "net/wireless",
                 "net/mac80211", "drivers/input/touchscreen", "drivers/iio", "drivers/hid"]
PRUNE_PATHS = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
               "var/cache/apt/archives", "var/lib/apt/lists"]

GUEST_INIT = """#!/bin/sh
# Runs once per boot: mounts the runner's payload and hands over to it.
modprobe -q 9pnet_virtio 2>/dev/null
mkdir -p /payload
if mount -t 9p -o trans=virtio,version=9p2000.L,ro payload /payload \\
        && [ -x /payload/guest-boot.sh ]; then
    exec /payload/guest-boot.sh
fi
echo "imgstorage guest: no payload; powering off" > /dev/console
systemctl poweroff
"""

GUEST_UNIT = """[Unit]
Description=imgstorage kernel-tier guest payload
After=systemd-udevd.service systemd-modules-load.service local-fs.target
Wants=systemd-udevd.service

[Service]
Type=simple
ExecStart=/usr/local/sbin/imgstorage-guest
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

# Units that only slow a throw-away guest down or wait for things it has not.
MASKED_UNITS = ["systemd-timesyncd.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                "e2scrub_all.timer", "fstrim.timer", "zfs-import-cache.service",
                "zfs-import-scan.service", "zfs-mount.service", "zfs-share.service",
                "zfs-volume-wait.service", "open-iscsi.service", "getty@tty1.service",
                "systemd-networkd-wait-online.service", "dpkg-db-backup.timer",
                "man-db.timer", "logrotate.timer"]


def say(msg: str) -> None:
    print(f"[kernel-image] {msg}", flush=True)


def run(argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run([str(a) for a in argv], **kw)


def cache_root() -> Path:
    base = os.environ.get("IMGSTORAGE_KERNEL_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "imgstorage-kernel"


# ------------------------------------------------------------------- host tools
def ensure_host_tools() -> None:
    wanted = {"qemu-system-x86_64": "qemu-system-x86", "mmdebstrap": "mmdebstrap",
              "mkfs.ext4": "e2fsprogs"}
    missing = sorted({pkg for tool, pkg in wanted.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing {', '.join(missing)}; install them as root")
    say(f"installing {', '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env,
        stdout=subprocess.DEVNULL)


def sources() -> list:
    return [f"deb {MIRROR} {SUITE} {COMPONENTS}",
            f"deb {MIRROR} {SUITE}-updates {COMPONENTS}",
            f"deb {SECURITY} {SUITE}-security {COMPONENTS}"]


# ------------------------------------------------------------- what to build
def resolve_kernel(work: Path) -> str:
    """The ABI of today's bookworm kernel (linux-image-amd64's dependency), via a private apt state."""
    apt = work / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text("\n".join(sources()) + "\n")
    opts = ["-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/nonexistent", "-o", f"Dir::State::Lists={apt / 'lists'}",
            "-o", f"Dir::Cache={apt / 'cache'}", "-o", "APT::Architecture=amd64", "-o", "APT::Sandbox::User=root"]
    run(["apt-get", *opts, "update", "-qq"])
    out = run(["apt-cache", *opts, "depends", "linux-image-amd64"], capture_output=True,
              text=True).stdout
    m = re.search(r"Depends: linux-image-(\d+\.\d+\.\d+-\d+-amd64)\b", out)
    if not m:
        sys.exit(f"cannot tell the kernel version from:\n{out}")
    return m.group(1)


def python_requirements() -> list:
    """The project's install_requires, less rtslib-fb (the guest has Debian's)."""
    reqs: list = []
    for node in ast.walk(ast.parse((PROJECT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs = ast.literal_eval(node.value)     # comments and quotes in them are no matter
    if not reqs:
        sys.exit("setup.py names no install_requires")
    return [r for r in reqs if not r.lower().startswith("rtslib")]


def image_key(kernel: str, reqs: list) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(kernel.encode())
    h.update("\n".join(reqs).encode())
    return h.hexdigest()[:12]


def image_dir(kernel: str, reqs: list) -> Path:
    return cache_root() / f"{kernel}-{image_key(kernel, reqs)}"


# ------------------------------------------------------------------ the steps
def mmdebstrap(target: Path, variant: str, packages: list, hooks: list = ()) -> None:
    argv = ["mmdebstrap", "--mode=root", f"--variant={variant}", "--quiet",
            "--aptopt=APT::Install-Recommends \"false\"",
            "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            f"--include={','.join(packages)}", *hooks, SUITE, str(target), *sources()]
    run(argv, stdin=subprocess.DEVNULL)


def zfs_modules(kernel: str, work: Path) -> Path:
    """The ZFS modules for ``kernel``: kept apart from the image, they take longest to build."""
    kept = cache_root() / f"zfs-modules-{kernel}"
    if (kept / "zfs.ko").exists():
        say(f"using the ZFS modules in {kept}")
        return kept
    built = build_zfs_modules(kernel, work)
    tmp = cache_root() / f".zfs-modules-{kernel}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(built, tmp)
    shutil.rmtree(kept, ignore_errors=True)
    tmp.rename(kept)
    return kept


def build_zfs_modules(kernel: str, work: Path) -> Path:
    """zfs-dkms in a chroot with exactly ``kernel``'s headers; returns the folder of .ko files."""
    chroot = work / "zfs-build"
    say(f"building the ZFS modules for {kernel} (zfs-dkms in a throw-away chroot)")
    started = time.monotonic()
    mmdebstrap(chroot, "buildd", [f"linux-headers-{kernel}", "dkms", "zfs-dkms"])
    found = list(chroot.glob(f"lib/modules/{kernel}/updates/dkms/*.ko*"))
    if not any(p.name.startswith("zfs.ko") for p in found):
        # The package's own trigger did not build for this kernel: ask dkms directly.
        version = next((chroot / "usr/src").glob("zfs-*")).name.split("-", 1)[1]
        env = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin")
        run(["chroot", chroot, "dkms", "build", "-m", "zfs", "-v", version, "-k", kernel], env=env)
        run(["chroot", chroot, "dkms", "install", "-m", "zfs", "-v", version, "-k", kernel,
             "--force"], env=env)
        found = list(chroot.glob(f"lib/modules/{kernel}/updates/dkms/*.ko*"))
    if not any(p.name.startswith("zfs.ko") for p in found):
        sys.exit("zfs-dkms built no zfs module; see the output above")
    out = work / "zfs-modules"
    out.mkdir()
    for ko in found:
        shutil.copy2(ko, out / ko.name)
    say(f"ZFS modules built in {time.monotonic() - started:.0f} s: "
        f"{', '.join(sorted(p.name for p in found))}")
    shutil.rmtree(chroot, ignore_errors=True)
    return out


def build_wheels(reqs: list, work: Path) -> Path:
    out = work / "wheels"
    say(f"fetching dependency wheels for the guest's Python 3.11: {', '.join(reqs)}")
    # pip download, not pip wheel: the wheels must fit the guest's Python, not the host's.
    run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
         "--only-binary=:all:", "--python-version", GUEST_PYTHON, "--implementation", "cp",
         "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
         "--platform", "linux_x86_64", "--dest", out, *reqs])
    return out


def build_root(kernel: str, work: Path, wheels: Path) -> Path:
    root = work / "root"
    say(f"building the guest root (linux-image-{kernel})")
    started = time.monotonic()
    conf = "\\n".join(["MODULES=list", "COMPRESS=zstd"])
    mods = "\\n".join(INITRD_MODULES)
    mmdebstrap(root, "minbase", [f"linux-image-{kernel}", *GUEST_PACKAGES],
               hooks=[  # before the kernel's postinst makes the initrd
                   "--essential-hook=mkdir -p \"$1/etc/initramfs-tools/conf.d\"",
                   f"--essential-hook=printf '{conf}\\n' > \"$1/etc/initramfs-tools/conf.d/imgstorage\"",
                   f"--essential-hook=printf '{mods}\\n' > \"$1/etc/initramfs-tools/modules\""])
    say(f"guest root installed in {time.monotonic() - started:.0f} s")

    # The project's dependencies, from wheels, with the guest's own pip.
    shutil.copytree(wheels, root / "tmp" / "wheels")
    names = [str(Path("/tmp/wheels") / w.name) for w in sorted(wheels.iterdir())]
    run(["chroot", root, "python3", "-m", "pip", "install", "--quiet", "--no-index",
         "--no-deps", "--break-system-packages", "--disable-pip-version-check", *names])
    shutil.rmtree(root / "tmp" / "wheels")

    etc = root / "etc"
    (etc / "fstab").write_text("/dev/vda / ext4 rw,noatime,errors=remount-ro 0 1\n")
    (etc / "hostname").write_text("imgstorage-guest\n")
    (etc / "machine-id").write_text("")
    sbin = root / "usr/local/sbin/imgstorage-guest"
    sbin.write_text(GUEST_INIT)
    sbin.chmod(0o755)
    unit = etc / "systemd/system/imgstorage-guest.service"
    unit.write_text(GUEST_UNIT)
    wants = etc / "systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "imgstorage-guest.service"
    if not link.exists():
        link.symlink_to("/etc/systemd/system/imgstorage-guest.service")
    for name in MASKED_UNITS:
        masked = etc / "systemd/system" / name
        if masked.exists() or masked.is_symlink():
            masked.unlink()
        masked.symlink_to("/dev/null")
    # The initiator name is written per guest at boot; a baked one would be shared.
    (etc / "iscsi/initiatorname.iscsi").write_text("")
    for rel in PRUNE_PATHS:
        path = root / rel
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True, exist_ok=True)
    return root


def add_modules(root: Path, kernel: str, modules: Path) -> None:
    """The ZFS modules where dkms would have put them; unused trees pruned; depmod."""
    moddir = root / "lib/modules" / kernel
    dest = moddir / "updates" / "dkms"
    dest.mkdir(parents=True, exist_ok=True)
    for ko in modules.iterdir():
        shutil.copy2(ko, dest / ko.name)
    for sub in PRUNE_MODULES:
        shutil.rmtree(moddir / "kernel" / sub, ignore_errors=True)
    run(["chroot", root, "depmod", "-a", kernel])


def make_disk(root: Path, out: Path) -> None:
    used = int(run(["du", "-sxb", root], capture_output=True, text=True).stdout.split()[0])
    size_mb = max(1024, int(used * 1.5 / 2**20) + 256)
    run(["mkfs.ext4", "-q", "-F", "-L", "imgroot", "-E", "root_owner=0:0", "-d", root,
         out, f"{size_mb}M"])


def prune(kernel: str, keep: Path) -> None:
    """Older images (another builder, another kernel) and other kernels' ZFS modules go."""
    for path in cache_root().iterdir():
        older_image = (path != keep and (path / "manifest.json").exists())
        other_zfs = (path.name.startswith("zfs-modules-")
                     and path.name != f"zfs-modules-{kernel}")
        if older_image or other_zfs:
            say(f"removing the outdated {path.name}")
            shutil.rmtree(path, ignore_errors=True)


def build(kernel: str, reqs: list, dest: Path) -> None:
    started = time.monotonic()
    cache_root().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_root()))
    try:
        wheels = build_wheels(reqs, work)
        # The ZFS build is CPU-bound, the root mostly downloads and unpacks: side by side.
        zfs: dict = {}

        def zfs_step() -> None:
            try:
                zfs["dir"] = zfs_modules(kernel, work)
            except BaseException as exc:  # reported by the main thread
                zfs["error"] = exc

        thread = threading.Thread(target=zfs_step, name="zfs-build")
        thread.start()
        try:
            root = build_root(kernel, work, wheels)
        finally:
            thread.join()
        if "error" in zfs:
            raise zfs["error"]
        modules = zfs["dir"]
        add_modules(root, kernel, modules)
        boot = work / "out"
        boot.mkdir()
        shutil.copy2(root / "boot" / f"vmlinuz-{kernel}", boot / "vmlinuz")
        shutil.copy2(root / "boot" / f"initrd.img-{kernel}", boot / "initrd.img")
        say("writing the root file system image")
        make_disk(root, boot / "root.ext4")
        manifest = {"kernel": kernel, "key": image_key(kernel, reqs), "requirements": reqs,
                    "wheels": sorted(w.name for w in wheels.iterdir()),
                    "zfs_modules": sorted(m.name for m in modules.iterdir()),
                    "packages": GUEST_PACKAGES, "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "build_seconds": round(time.monotonic() - started, 1)}
        (boot / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        boot.rename(dest)
        prune(kernel, dest)
        say(f"image ready in {dest} after {time.monotonic() - started:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_image(force: bool = False) -> Path:
    ensure_host_tools()
    cache_root().mkdir(parents=True, exist_ok=True)
    kernel = resolve_kernel(cache_root())
    reqs = python_requirements()
    dest = image_dir(kernel, reqs)
    if force or not (dest / "manifest.json").exists():
        build(kernel, reqs, dest)
    else:
        say(f"using the cached image {dest}")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--print-dir", action="store_true",
                        help="print only the image folder on standard output")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("building the guest image needs root (mmdebstrap, chroot)")
    dest = ensure_image(args.force)
    if args.print_dir:
        print(dest)


if __name__ == "__main__":
    main()
