"""Packaging for imgstorage: VM disks on ZFS NAS servers, exported over iSCSI."""
from setuptools import find_packages, setup

setup(
    name="imgstorage",
    version="0.1.0",
    description="VM disk images on ZFS NAS servers, exported over iSCSI and synced to VM containers",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.9",
    packages=find_packages(include=["imgstorage", "imgstorage.*", "admin", "admin.*"]),
    install_requires=[
        "pika>=1.3",
        "SQLAlchemy>=2.0",
        "click>=8.0",
        "rtslib-fb>=2.1",
        "tqdm>=4.60",       # the progress bar of commands on many VMs, on a terminal only
        "prometheus-client>=0.17",   # the daemons' metrics endpoint (metrics_port)
        "rich>=13",         # watch=: the listing redrawn with transfer bars, on a terminal only
    ],
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6",
                         "PyYAML>=6"]},     # reads the shipped alert rules
    # The service files, for an administrator to copy: the two LSB scripts and
    # the functions they share go together into /etc/init.d (the scripts also
    # look in /usr/lib/imgstorage), the units into /etc/systemd/system.
    data_files=[("share/imgstorage/init.d", [
        "init.d/img-storage-nas", "init.d/img-storage-vm", "init.d/img-storage-functions",
        "init.d/img-storage-nas.service", "init.d/img-storage-vm.service",
    ])],
    entry_points={
        "console_scripts": [
            "img-storage-nas=imgstorage.nas.main:main",
            "img-storage-vm=imgstorage.vm.main:main",
            "rocks=imgstorage.frontend.cli:main",
            "imgstorage=imgstorage.frontend.cli:main",
            "imgstorage-sim=imgstorage.drivers.sim.cli:main",
            "imgstorageadmin=admin.imgstorageadmin:main",
        ],
    },
)
