"""imgstorage: virtual machine disks kept as ZFS volumes on NAS servers.

The NAS exports each volume over iSCSI to the VM container that runs the VM;
in sync mode the container boots from the remote disk while a copy moves it
to local ZFS.  See README.rst for the operator's view.
"""

__version__ = "0.1.0"
