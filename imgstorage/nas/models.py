"""The NAS daemon's database: zvols, their locks, attributes.

Tables are prefixed ``nas_`` so a node that runs both daemons can never mix
the two schemas up (the original shared one file and broke).
"""
from __future__ import annotations

import time
from typing import Optional

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Zvol(Base):
    """One zvol this NAS manages, with the one explicit state of its life cycle."""
    __tablename__ = "nas_zvols"

    zvol: Mapped[str] = mapped_column(String(200), primary_key=True)
    zpool: Mapped[str] = mapped_column(String(200))
    size_bytes: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(32), default="unmapped")
    iscsi_target: Mapped[Optional[str]] = mapped_column(String(300), nullable=True, unique=True)
    remotehost: Mapped[Optional[str]] = mapped_column(String(253), nullable=True)
    remotepool: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    sync: Mapped[bool] = mapped_column(Boolean, default=False)
    bdev: Mapped[Optional[str]] = mapped_column(String(300), nullable=True)
    initiator: Mapped[Optional[str]] = mapped_column(String(300), nullable=True)
    chap_user: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    chap_secret: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    state_since: Mapped[float] = mapped_column(Float, default=time.time)
    prior_state: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)
    last_snapshot: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    # The snapshot a transfer in flight delivers: kept until it arrived, so a
    # transfer cut short (a daemon killed, a link broken) resumes from the
    # receiver's token instead of starting over with a new snapshot.
    transfer_snapshot: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    retry_at: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[Optional[str]] = mapped_column(String(1000), nullable=True)
    # While the container holds writes the NAS does not have (states.SYNC_ACTIVE):
    # the time up to which every write is on the NAS (the map, then the snapshot
    # of the newest pull that arrived).  What a container's death would lose is
    # what was written since.
    recovery_point: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    # The container keeps its copy after the final pull (its img_keep_local
    # attribute, sent with the map), as the base of the next start there.
    keep_local: Mapped[Optional[bool]] = mapped_column(Boolean, nullable=True)


class KeptCopy(Base):
    """A container that kept its copy of a zvol after the VM stopped there.

    ``snapshot`` is the NAS's snapshot the copy is the same as; the NAS holds
    it (tag ``imgstorage-kept``) so that the next start on that container can
    be sent only what changed since, wherever the VM ran in between.
    """
    __tablename__ = "nas_kept_copies"

    zvol: Mapped[str] = mapped_column(String(200), ForeignKey("nas_zvols.zvol", ondelete="CASCADE"),
                                      primary_key=True)
    host: Mapped[str] = mapped_column(String(253), primary_key=True)
    snapshot: Mapped[str] = mapped_column(String(200))
    since: Mapped[float] = mapped_column(Float, default=time.time)


class Lock(Base):
    """The per-zvol busy lock: one operation per zvol at a time."""
    __tablename__ = "nas_locks"

    zvol: Mapped[str] = mapped_column(String(200), primary_key=True)
    action: Mapped[str] = mapped_column(String(64))
    owner: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)    # message id
    caller: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)   # broker user
    since: Mapped[float] = mapped_column(Float, default=time.time)
    pid: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)


class Attr(Base):
    """Global attributes of this NAS (``frequency``, ``uploadspeed``, ...)."""
    __tablename__ = "nas_attrs"

    attr: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[Optional[str]] = mapped_column(String(4096), nullable=True)


class ZvolAttr(Base):
    """Per-zvol sync attributes; a null falls back to the global attribute."""
    __tablename__ = "nas_zvol_attrs"

    zvol: Mapped[str] = mapped_column(String(200), ForeignKey("nas_zvols.zvol", ondelete="CASCADE"),
                                      primary_key=True)
    frequency: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    nextsync: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    # Epoch seconds of the last periodic pull that arrived (or of the hand-over
    # to the container's copy): the NAS holds the disk as it was then.  A
    # lowered frequency counts from here, not from a nextsync made with the old one.
    last_pull_at: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    # The frequency nextsync was computed with: a different one now is a change.
    pull_frequency: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    uploadspeed: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    downloadspeed: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
