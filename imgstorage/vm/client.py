"""The VM-container daemon's API, as a NAS, the CLI and administrators call it.

Each method is one action of ``img-storage-vm`` with its fields as typed
arguments.  ``map_zvol``, ``unmap_zvol`` and ``sync_zvol`` carry the
original's fields (new ones are added beside them); the rest are this
implementation's own.  An error reply raises ``RemoteError`` whose ``code``
(errors.py) the caller tests: ``not_resumable`` for a resume token the
container's zfs refused, ``busy`` for a zvol another request holds, ``state``
for a request the zvol's state does not allow.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

from .. import paging
from ..errors import ImgStorageError
from ..rpcapi import NodeClient

if TYPE_CHECKING:       # the CLI's commands import this module: no drivers for them
    from ..drivers.base import ChapCredentials


class VmClient(NodeClient):
    """Requests to one VM container (``node``)."""

    def _malformed(self, what: str) -> ImgStorageError:
        return ImgStorageError(f"{self.node} sent a malformed {what}")

    def initiator_name(self, *, timeout: Optional[float] = None) -> str:
        """The container's iSCSI initiator name (the target's ACL admits only it)."""
        initiator = self._request("initiator_name", timeout).get("initiator")
        if not isinstance(initiator, str) or not initiator:
            raise self._malformed("initiator name")
        return initiator

    # -- mappings -------------------------------------------------------------
    def map_zvol(self, zvol: str, *, target: str, nas: str, nas_node: str, size: int,
                 volsize: Optional[int], sync: bool, remotehost: str,
                 remotepool: Optional[str], chap: Optional[ChapCredentials] = None,
                 timeout: Optional[float] = None) -> Dict[str, Any]:
        """Log in to ``target`` on ``nas`` (the portal name) and, with ``sync``, prepare
        the local copy; the reply names the block device (``bdev``)."""
        fields: Dict[str, Any] = dict(target=target, nas=nas, nas_node=nas_node, zvol=zvol,
                                      size=size, volsize=volsize, sync=sync,
                                      remotehost=remotehost, remotepool=remotepool)
        if chap is not None:
            fields["chap"] = {"userid": chap.userid, "password": chap.password}
        return self._request("map_zvol", timeout, **fields)

    def unmap_zvol(self, zvol: str, *, target: Optional[str], sync: Optional[bool] = None,
                   timeout: Optional[float] = None) -> Dict[str, Any]:
        """Let go of the disk; ``local`` in the reply: the container holds a copy
        with the VM's writes, to be pulled home."""
        fields: Dict[str, Any] = dict(zvol=zvol, target=target)
        if sync is not None:
            fields["sync"] = sync
        return self._request("unmap_zvol", timeout, **fields)

    def clean_zvol(self, zvol: str, *, target: Optional[str],
                   timeout: Optional[float] = None) -> Dict[str, Any]:
        """Tear down whatever the container has of ``zvol``; ``done`` lists it."""
        return self._request("clean_zvol", timeout, zvol=zvol, target=target)

    # -- sync mode ------------------------------------------------------------
    def sync_zvol(self, zvol: str, *, target: Optional[str], snap: Optional[str],
                  timeout: Optional[float] = None) -> Dict[str, Any]:
        """The copy arrived (``snap``): merge the VM's writes into it."""
        return self._request("sync_zvol", timeout, zvol=zvol, target=target, snap=snap)

    def recv_zvol(self, zvol: str, *, restart: bool = False, stream: bool = False,
                  base: Optional[str] = None, base_guid: Optional[int] = None,
                  fresh: bool = False, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Where the copy stands there (state, ``resume_token``, ``snapshots``, and
        the ``base``/``base_guid`` of a copy kept there); ``restart`` throws a
        partial receive away first; ``base`` rolls the kept copy back to that
        snapshot for an incremental stream, ``fresh`` replaces it with an empty
        zvol for a full one; ``stream`` asks the container to open an endpoint
        (``address``, ``port``, ``token``) the NAS streams into."""
        fields: Dict[str, Any] = {"zvol": zvol}
        if restart:
            fields["restart"] = True
        if fresh:
            fields["fresh"] = True
        if base is not None:
            fields.update(base=base, base_guid=base_guid)
        if stream:
            fields["stream"] = True
        return self._request("recv_zvol", timeout, **fields)

    def send_zvol(self, zvol: str, *, snap: Optional[str] = None, base: Optional[str] = None,
                  resume_token: Optional[str] = None, stream: bool = False,
                  timeout: Optional[float] = None) -> Dict[str, Any]:
        """A stream of ``snap`` from ``base`` (None: a full one) or, with
        ``resume_token``, the rest of one cut short; the reply's ``size`` is its
        estimate.  ``stream`` asks for an endpoint to read it from."""
        fields: Dict[str, Any] = {"zvol": zvol}
        if resume_token is not None:
            fields["resume_token"] = resume_token
        else:
            if snap is None:
                raise ValueError("send_zvol needs snap or resume_token")
            fields.update(snap=snap, base=base)
        if stream:
            fields["stream"] = True
        return self._request("send_zvol", timeout, **fields)

    def del_local(self, zvol: str, *, keep: Optional[str] = None,
                  timeout: Optional[float] = None) -> bool:
        """The NAS has every byte: destroy the local copy, or with ``keep`` (the NAS's
        newest snapshot) keep it as the base of the next start there; True: kept."""
        fields: Dict[str, Any] = {"zvol": zvol}
        if keep is not None:
            fields["keep"] = keep
        return self._request("del_local", timeout, **fields).get("kept") is True

    # -- listings -------------------------------------------------------------
    def list_dev(self, *, timeout: Optional[float] = None) -> Dict[str, Dict[str, Any]]:
        """Every device of the container by zvol, page after page."""
        return paging.fetch_all(lambda message: self._send(message, timeout),
                                self.message("list_dev"), keyed=True,
                                malformed=lambda: self._malformed("device list"))

    def ping(self, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        return self._request("ping", timeout)
