"""NAS message handlers: validate, take the zvol's lock, call the service, reply."""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Optional

from .. import naming, paging, protocol, trust
from ..errors import ImgStorageError, ValidationError
from ..messaging import Envelope
from ..protocol import field, optional_name
from .service import NasService

log = logging.getLogger(__name__)

QUICK = {"list_zvols", "get_zvol_attrs", "get_attrs", "ping"}
# Actions that change or destroy something.  In strict mode every action but ping
# and a container's notifications is an administrator's (imgstorage/trust.py).
MANAGEMENT = {"map_zvol", "unmap_zvol", "del_zvol", "set_zvol_attrs", "set_attrs", "del_attrs",
              "clean_zvol"}


def _zvol_of(env: Envelope) -> Optional[str]:
    """The zvol a refused request names, for the log line, when it is a valid name."""
    try:
        return naming.zvol_name(env.body.get("zvol"))
    except (ImgStorageError, TypeError):
        return None


def guarded(config, handler: Callable[[Envelope], Optional[dict]]
            ) -> Callable[[Envelope], Optional[dict]]:
    """``handler`` behind the sender check: a refused request changes nothing."""
    def run(env: Envelope) -> Optional[dict]:
        why = trust.nas_refusal(config, env.user_id, env.action)
        if why:
            raise trust.refused(config, env.user_id, env.action, _zvol_of(env), why)
        return handler(env)
    run.__name__ = getattr(handler, "__name__", "handler")
    return run


def build(service: NasService) -> Dict[str, object]:
    store = service.store
    config = service.config
    default_timeout = config.timeout

    def locked(env: Envelope, zvol: str):
        return store.locked(zvol, env.action, env.message_id, env.user_id)

    def map_zvol(env: Envelope) -> dict:
        m = env.body
        zvol = field(m, "zvol", naming.zvol_name)
        zpool = field(m, "zpool", naming.zpool_name)
        remotehost = field(m, "remotehost", naming.host_name)
        size = field(m, "size", naming.size_gb)
        remotepool = field(m, "remotepool", optional_name(naming.zpool_name), required=False)
        sync = field(m, "sync", protocol.bool_field, required=False, default=False)
        keep_local = field(m, "keep_local", protocol.bool_field, required=False, default=False)
        with locked(env, zvol):
            out = service.map_zvol(zvol, zpool, remotehost, size, remotepool, sync,
                                   env.budget(default_timeout), keep_local=keep_local)
        # the copy starts now, not at the scheduler's next look: it skips a held zvol
        service.sync.wake()
        service.metrics.observe_phase("map", time.time() - env.received)
        return protocol.success("map_zvol", **out)

    def unmap_zvol(env: Envelope) -> dict:
        zvol = field(env.body, "zvol", naming.zvol_name)
        with locked(env, zvol):
            service.unmap_zvol(zvol, env.budget(default_timeout))
        service.sync.wake()          # the final pull, if any, without waiting for a tick
        service.metrics.observe_phase("unmap", time.time() - env.received)
        return protocol.success("unmap_zvol", zvol=zvol)

    def del_zvol(env: Envelope) -> dict:
        zvol = field(env.body, "zvol", naming.zvol_name)
        zpool = field(env.body, "zpool", naming.zpool_name)
        with locked(env, zvol):
            service.del_zvol(zvol, zpool)
        return protocol.success("del_zvol", zvol=zvol)

    def list_zvols(env: Envelope) -> dict:
        request = paging.page_request(env.body)
        # one row beyond the limit tells whether more follow
        rows = service.list_zvols(after=request.after,
                                  limit=None if request.limit is None else request.limit + 1)
        page = paging.take(((r["zvol"], r) for r in rows), request)
        if page.more and len(page.items) < (request.limit or len(rows)):
            log.info("list_zvols: only %d zvols after %s fit in one reply; the caller asks "
                     "again for those after %s", len(page.items), request.after or "the start",
                     page.next)
        return protocol.success("list_zvols", body=[r for _, r in page.items],
                                **page.reply_fields())

    def get_zvol_attrs(env: Envelope) -> dict:
        zvol = field(env.body, "zvol", naming.zvol_name)
        return protocol.success("get_zvol_attrs", body=service.get_zvol_attrs(zvol))

    def set_zvol_attrs(env: Envelope) -> dict:
        m = env.body
        zvol = field(m, "zvol", naming.zvol_name)
        attrs = m.get("attrs")
        if attrs is None:  # the original put the attributes at the top level
            attrs = {k: m[k] for k in protocol.ZVOL_ATTRS if k in m}
        if not isinstance(attrs, dict) or not attrs:
            raise ValidationError("set_zvol_attrs needs 'attrs': {name: value}")
        values = {}
        for key, value in attrs.items():
            if key not in protocol.ZVOL_ATTRS:
                raise ValidationError(f"unknown zvol attribute {str(key)[:60]!r}: use one of "
                                      + ", ".join(protocol.ZVOL_ATTRS))
            values[key] = naming.non_negative_int(key, value,
                                                  minimum=1 if key == "frequency" else 0)
        with locked(env, zvol):
            store.set_zvol_attrs(zvol, values)
        return protocol.success("set_zvol_attrs", zvol=zvol)

    def get_attrs(env: Envelope) -> dict:
        return protocol.success("get_attrs", attrs=store.attrs())

    def set_attrs(env: Envelope) -> dict:
        attrs = env.body.get("attrs")
        if not isinstance(attrs, dict) or not attrs:
            raise ValidationError("set_attrs needs 'attrs': {name: value}")
        values = {naming.attr_name(k): naming.attr_value(v) for k, v in attrs.items()}
        for key in ("frequency", "uploadspeed", "downloadspeed"):
            if key in values:
                naming.non_negative_int(key, values[key], minimum=1 if key == "frequency" else 0)
        store.set_attrs(values)
        return protocol.success("set_attrs")

    def del_attrs(env: Envelope) -> dict:
        names = env.body.get("attrs")
        if not isinstance(names, list) or not names:
            raise ValidationError("del_attrs needs 'attrs': [names]")
        store.del_attrs([naming.attr_name(n) for n in names])
        return protocol.success("del_attrs")

    def clean_zvol(env: Envelope) -> dict:
        zvol = field(env.body, "zvol", naming.zvol_name)
        force = field(env.body, "force", protocol.bool_field, required=False, default=False)
        store.unlock(zvol)      # the point of cleaning: a lock nobody will release
        with locked(env, zvol):
            out = service.clean_zvol(zvol, force)
        return protocol.success("clean_zvol", zvol=zvol, **out)

    def zvol_synced(env: Envelope) -> None:
        """A container reports that its merge finished (a notification: no reply)."""
        zvol = field(env.body, "zvol", naming.zvol_name)
        row = store.get(zvol)
        why = trust.notification_refusal(config, env.user_id, row.remotehost if row else None)
        if why:
            trust.log_refusal(config, env.user_id, env.action, zvol, why)   # and dropped
            return None
        status = env.body.get("status")
        error = env.body.get("error")
        # No lock: a notification cannot be answered "busy" and retried.  The
        # state machine decides (an unmap that got there first makes it a no-op).
        service.zvol_synced(zvol, status == "success",
                            str(error)[:1000] if error is not None else None)
        return None

    def kept_dropped(env: Envelope) -> None:
        """A container destroyed the copy it kept (a notification: no reply)."""
        zvol = field(env.body, "zvol", naming.zvol_name)
        host = field(env.body, "host", naming.host_name)
        snapshot = field(env.body, "snapshot", naming.zvol_name)
        why = trust.kept_refusal(config, env.user_id, host)
        if why:
            trust.log_refusal(config, env.user_id, env.action, zvol, why)   # and dropped
            return None
        service.kept.forget(zvol, host, snapshot)
        return None

    def ping(env: Envelope) -> dict:
        return protocol.success("ping", node=service.name, role="nas")

    handlers = {
        "map_zvol": map_zvol, "unmap_zvol": unmap_zvol, "del_zvol": del_zvol,
        "list_zvols": list_zvols, "get_zvol_attrs": get_zvol_attrs,
        "set_zvol_attrs": set_zvol_attrs, "get_attrs": get_attrs, "set_attrs": set_attrs,
        "del_attrs": del_attrs, "zvol_synced": zvol_synced, "clean_zvol": clean_zvol,
        "kept_dropped": kept_dropped, "ping": ping,
    }
    return {action: guarded(config, handler) for action, handler in handlers.items()}
