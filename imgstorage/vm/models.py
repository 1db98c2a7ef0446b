"""The VM-container daemon's database: the zvols attached to this host.

Tables are prefixed ``vm_`` so they never collide with the NAS daemon's.
"""
from __future__ import annotations

import time
from typing import Optional

from sqlalchemy import Boolean, Float, String
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
    bdev: Mapped[Optional[str]] = mapped_column(String(300), nullable=True)
    state_since: Mapped[float] = mapped_column(Float, default=time.time)
