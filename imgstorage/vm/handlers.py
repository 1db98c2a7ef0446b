"""VM-container message handlers: validate, hold the zvol, call the service, reply."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

from .. import naming, paging, protocol, trust
from ..drivers.base import ChapCredentials
from ..errors import ValidationError
from ..messaging import Envelope
from ..protocol import field, optional_name
from . import streams
from .service import VmService
from .states import KEPT_STATES, PULLABLE, RECEIVING

QUICK = {"list_dev", "initiator_name", "ping"}
LOCK_WAIT = 10.0          # at most this long, and a third of the budget, for a held zvol


def _chap(value) -> ChapCredentials:
    if not isinstance(value, dict) or not isinstance(value.get("userid"), str) \
            or not isinstance(value.get("password"), str) \
            or not (0 < len(value["userid"]) <= 64) or not (0 < len(value["password"]) <= 64):
        raise ValidationError("invalid chap credentials")
    return ChapCredentials(value["userid"], value["password"])


def _stream_request(body: dict) -> bool:
    """Whether the requester asks for a stream endpoint; it may not bring the token."""
    if "token" in body:
        # A token the requester chose is one it (or whoever wrote the message)
        # knows before the endpoint opens: the serving side draws it instead.
        raise ValidationError('a stream token is drawn by the container that serves the '
                              'stream: ask with "stream": true and no "token"')
    return field(body, "stream", lambda v: naming.parse_bool(v, "stream flag"),
                 required=False, default=False)


def _snap(value) -> str:
    return naming.zvol_name(value)


def _guid(value) -> int:
    """A snapshot's guid: a 64-bit number, as zfs prints it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 64:
        raise ValidationError("invalid snapshot guid")
    return value


def build(service: VmService) -> Dict[str, object]:
    config = service.config
    default_timeout = config.timeout
    zfs = service.drivers.zfs

    def admit(env: Envelope, zvol: Optional[str] = None, target: Optional[str] = None) -> None:
        """Refuse a sender that may not ask for this (imgstorage/trust.py)."""
        if not config.strict:
            return
        row = service.row(zvol) if zvol else None
        if row is not None and env.action == "map_zvol" and row.state in {
                s.value for s in KEPT_STATES}:
            row = None      # a map replaces a kept copy, which any NAS of ours may do
        why = trust.vm_refusal(config, env.user_id, env.action, row is not None,
                               row.nas_node if row else None)
        if why is None and zvol is not None:
            why = trust.vm_target_refusal(config, env.user_id, zvol, target, row is not None,
                                          row.iscsi_target if row else None)
        if why:
            raise trust.refused(config, env.user_id, env.action, zvol, why)

    @contextmanager
    def held(env: Envelope, zvol: str, target: Optional[str] = None) -> Iterator[float]:
        """The zvol for this request, and the seconds left to work on it once held.

        The sender is checked before anything is touched (no lock either) and
        again once the zvol is held: a map by another NAS in between must not
        make its zvol this sender's.
        """
        admit(env, zvol, target)
        budget = env.budget(default_timeout)
        started = time.monotonic()
        with service.zvol_lock(zvol, wait=min(LOCK_WAIT, budget / 3)):
            admit(env, zvol, target)
            yield max(1.0, budget - (time.monotonic() - started))

    def map_zvol(env: Envelope) -> dict:
        m = env.body
        zvol = field(m, "zvol", naming.zvol_name)
        target = field(m, "target", naming.iqn)
        nas = field(m, "nas", naming.host_name)
        nas_node = field(m, "nas_node", naming.host_name, required=False)
        sync = field(m, "sync", protocol.bool_field, required=False, default=False)
        remotepool = field(m, "remotepool", optional_name(naming.zpool_name), required=False)
        chap = field(m, "chap", _chap, required=False)
        size = field(m, "size", naming.size_gb, required=False)
        volsize = field(m, "volsize", lambda v: naming.non_negative_int("volsize", v, minimum=1),
                        required=False)
        if sync and volsize is None:
            volsize = (size or 0) * naming.GIB or None
            if volsize is None:
                raise ValidationError("sync mode needs the volume's size")
        why = trust.vm_map_refusal(config, env.user_id, nas_node)
        if why:
            raise trust.refused(config, env.user_id, "map_zvol", zvol, why)
        nas_node = trust.map_as(config, env.user_id, nas_node)
        with held(env, zvol) as budget:
            bdev = service.map_zvol(zvol, target, nas, sync, remotepool, chap,
                                    budget, volsize=volsize,
                                    nas_node=nas_node)
        return protocol.success("map_zvol", target=target, bdev=bdev, zvol=zvol)

    def unmap_zvol(env: Envelope) -> dict:
        zvol = field(env.body, "zvol", naming.zvol_name)
        target = field(env.body, "target", optional_name(naming.iqn), required=False)
        with held(env, zvol, target) as budget:
            out = service.unmap_zvol(zvol, target, budget)
        return protocol.success("unmap_zvol", target=target, zvol=zvol, **out)

    def sync_zvol(env: Envelope) -> dict:
        zvol = field(env.body, "zvol", naming.zvol_name)
        snap = field(env.body, "snap", optional_name(_snap), required=False)
        with held(env, zvol):
            service.start_merge(zvol, snap)
        return protocol.success("sync_zvol", zvol=zvol, merging=True)

    def recv_zvol(env: Envelope) -> dict:
        """Without ``stream``: where the copy stands here (state, resume token, the
        snapshots that arrived whole, and the ``base`` a kept copy shares with the NAS);
        with ``restart``: the partial state is thrown away first; with ``base`` (and its
        ``base_guid``): the kept copy is rolled back to it for an incremental stream;
        with ``fresh``: the kept copy is replaced by an empty zvol for a full one; with
        ``stream``: the one-time endpoint the NAS streams into, and the token this
        container drew for it."""
        m = env.body
        zvol = field(m, "zvol", naming.zvol_name)
        stream = _stream_request(m)
        restart = field(m, "restart", protocol.bool_field, required=False, default=False)
        fresh = field(m, "fresh", protocol.bool_field, required=False, default=False)
        base = field(m, "base", optional_name(_snap), required=False)
        base_guid = field(m, "base_guid", _guid, required=base is not None)
        if fresh and base:
            raise ValidationError("recv_zvol: fresh and base exclude each other")
        with held(env, zvol), streams.reserve(service.config, stream) as slot:
            if not (slot or restart or fresh or base):
                return protocol.success("recv_zvol", **service.receive_state(zvol))
            row = service.require(zvol, *RECEIVING)
            if restart:
                zfs.abort_resume(row.remotepool, zvol)
            if fresh:
                service.kept.forget_base(row, "the NAS has no snapshot in common with it")
            if base:
                service.kept.prepare_base(row, base, base_guid)
            reply = {"zvol": zvol, "resume_token": zfs.resume_token(row.remotepool, zvol)}
            if slot:
                reply.update(slot.serve_receive(
                    lambda: zfs.receive(row.remotepool, zvol, resumable=True),
                    f"NAS->VM copy of {zvol} into {row.remotepool}"))
        return protocol.success("recv_zvol", **reply)

    def send_zvol(env: Envelope) -> dict:
        """A stream of a new snapshot (``snap`` from ``base``) or, with ``resume_token``,
        the rest of one the NAS received in part; with ``stream``, served on a one-time
        endpoint whose token this container drew."""
        m = env.body
        zvol = field(m, "zvol", naming.zvol_name)
        resume = field(m, "resume_token", optional_name(naming.resume_token), required=False)
        snap = field(m, "snap", _snap, required=resume is None)
        base = field(m, "base", optional_name(_snap), required=False)
        stream = _stream_request(m)
        with held(env, zvol), streams.reserve(service.config, stream) as slot:
            row = service.require(zvol, *PULLABLE)
            if resume:
                size = zfs.send_resume_size(row.remotepool, zvol, resume)
                what = f"NAS<-VM sync of {zvol} (resumed)"
            else:
                size = service.snapshot_for_pull(zvol, snap, base)
                what = f"NAS<-VM sync of {zvol} ({snap})"
            reply = {"zvol": zvol, "size": size}
            if slot:
                reply.update(slot.serve_send(
                    lambda: (zfs.send_resume(row.remotepool, zvol, resume) if resume
                             else zfs.send(row.remotepool, zvol, snap, base)),
                    what))
        return protocol.success("send_zvol", **reply)

    def del_local(env: Envelope) -> dict:
        zvol = field(env.body, "zvol", naming.zvol_name)
        keep = field(env.body, "keep", optional_name(_snap), required=False)
        with held(env, zvol):
            kept = service.del_local(zvol, keep)
        return protocol.success("del_local", zvol=zvol, kept=kept)

    def clean_zvol(env: Envelope) -> dict:
        zvol = field(env.body, "zvol", naming.zvol_name)
        target = field(env.body, "target", optional_name(naming.iqn), required=False)
        with held(env, zvol, target):
            out = service.clean_zvol(zvol, target)
        return protocol.success("clean_zvol", zvol=zvol, **out)

    def list_dev(env: Envelope) -> dict:
        admit(env)
        request = paging.page_request(env.body)
        page = paging.take(sorted(service.list_dev().items()), request)
        return protocol.success("list_dev", node_type="mixed", body=dict(page.items),
                                **page.reply_fields())

    def initiator_name(env: Envelope) -> dict:
        admit(env)
        return protocol.success("initiator_name", initiator=service.initiator_name())

    def ping(env: Envelope) -> dict:
        return protocol.success("ping", node=service.config.name, role="vm")

    return {"map_zvol": map_zvol, "unmap_zvol": unmap_zvol, "sync_zvol": sync_zvol,
            "recv_zvol": recv_zvol, "send_zvol": send_zvol, "del_local": del_local,
            "clean_zvol": clean_zvol,
            "list_dev": list_dev, "initiator_name": initiator_name, "ping": ping}
