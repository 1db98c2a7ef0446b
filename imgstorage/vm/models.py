"""The VM-container daemon's database: the zvols attached to this host.

A row's ``state`` is one of imgstorage/vm/states.py and is written only by
imgstorage/vm/store.py.  A row keeps what the kernel needs to rebuild its
device after a reboot: the target and portal, the CHAP credentials of the
login, the pool of the local copy and the device's size; a copy kept after
the VM stopped keeps the snapshot it shares with the NAS.

Tables are prefixed ``vm_`` so they never collide with the NAS daemon's.
"""
from __future__ import annotations

import time
from typing import Optional

from sqlalchemy import Boolean, Float, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class VmZvol(Base):
    """A zvol of some NAS attached here, and how far its attachment got."""
    __tablename__ = "vm_zvols"

    zvol: Mapped[str] = mapped_column(String(200), primary_key=True)
    nas: Mapped[str] = mapped_column(String(253))            # portal host name
    iscsi_target: Mapped[Optional[str]] = mapped_column(String(300), nullable=True, unique=True)
    remotepool: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    sync: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(32), default="attaching")
    bdev: Mapped[Optional[str]] = mapped_column(String(300), nullable=True)   # iSCSI disk
    nas_node: Mapped[Optional[str]] = mapped_column(String(253), nullable=True)  # routing key
    devsize: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)       # sectors
    merge_started: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    merge_from: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)  # sectors at start
    last_error: Mapped[Optional[str]] = mapped_column(String(1000), nullable=True)
    state_since: Mapped[float] = mapped_column(Float, default=time.time)
    prior_state: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)  # broken from
    chap_user: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    chap_secret: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    # A kept copy (img_keep_local): the snapshot it shares with the NAS, and since
    # when it is kept (the oldest goes first when the pool needs room).  Set from
    # ``kept`` until a map that reused the copy has received the NAS's changes.
    kept_snapshot: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    kept_since: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
