"""The NAS daemon's API, as the CLI, administrators and containers call it.

Each method is one action of ``img-storage-nas`` with its fields as typed
arguments; the message it sends is the original's where the original had one
(``map_zvol``, ``unmap_zvol``, ``del_zvol``, ``list_zvols``, the attribute
actions, ``zvol_synced``), so an older node still understands it.  An error
reply raises ``RemoteError`` whose ``code`` (errors.py) says what kind of
failure it was; its text is for the operator.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .. import paging
from ..errors import ImgStorageError
from ..rpcapi import NodeClient


class NasClient(NodeClient):
    """Requests to one NAS (``node``)."""

    def _malformed(self, what: str) -> ImgStorageError:
        return ImgStorageError(f"{self.node} sent a malformed {what}")

    # -- mappings -------------------------------------------------------------
    def map_zvol(self, zvol: str, *, zpool: str, remotehost: str, size: int,
                 remotepool: Optional[str], sync: bool, keep_local: bool = False,
                 timeout: Optional[float] = None) -> Optional[str]:
        """Map (creating the zvol if needed); the block device on ``remotehost``, or
        None when the reply named none (the caller decides what undoes the map).
        ``keep_local``: the container keeps its copy after the VM stops (sync mode)."""
        fields: Dict[str, Any] = dict(zpool=zpool, zvol=zvol, remotehost=remotehost,
                                      remotepool=remotepool, size=size, sync=sync)
        if keep_local:
            fields["keep_local"] = True
        reply = self._request("map_zvol", timeout, **fields)
        bdev = reply.get("bdev")
        return bdev if isinstance(bdev, str) and bdev else None

    def unmap_zvol(self, zvol: str, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        return self._request("unmap_zvol", timeout, zvol=zvol)

    def del_zvol(self, zvol: str, *, zpool: str, timeout: Optional[float] = None) -> None:
        self._request("del_zvol", timeout, zpool=zpool, zvol=zvol)

    def clean_zvol(self, zvol: str, *, force: bool = False,
                   timeout: Optional[float] = None) -> Dict[str, Any]:
        return self._request("clean_zvol", timeout, zvol=zvol, force=force)

    def list_zvols(self, *, timeout: Optional[float] = None) -> List[Dict[str, Any]]:
        """Every zvol row, page after page when the NAS sends its listing in pages."""
        return paging.fetch_all(lambda message: self._send(message, timeout),
                                self.message("list_zvols"), keyed=False,
                                malformed=lambda: self._malformed("zvol list"))

    # -- attributes -----------------------------------------------------------
    def get_zvol_attrs(self, zvol: str, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        body = self._request("get_zvol_attrs", timeout, zvol=zvol).get("body")
        if not isinstance(body, dict):
            raise self._malformed("zvol attribute list")
        return body

    def set_zvol_attrs(self, zvol: str, attrs: Dict[str, Optional[int]], *,
                       timeout: Optional[float] = None) -> None:
        self._request("set_zvol_attrs", timeout, zvol=zvol, attrs=dict(attrs))

    def get_attrs(self, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        attrs = self._request("get_attrs", timeout).get("attrs")
        if not isinstance(attrs, dict):
            raise self._malformed("attribute list")
        return attrs

    def set_attrs(self, attrs: Dict[str, Optional[str]], *,
                  timeout: Optional[float] = None) -> None:
        self._request("set_attrs", timeout, attrs=dict(attrs))

    def del_attrs(self, names: List[str], *, timeout: Optional[float] = None) -> None:
        self._request("del_attrs", timeout, attrs=list(names))

    # -- liveness -------------------------------------------------------------
    def ping(self, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        return self._request("ping", timeout)

    # -- notifications from a container ---------------------------------------
    def kept_dropped(self, zvol: str, *, host: str, snapshot: str,
                     timeout: Optional[float] = None) -> None:
        """A container destroyed the copy it kept of ``zvol`` as of ``snapshot``: the NAS
        may let go of its own hold on that snapshot.  No reply comes."""
        self._notify("kept_dropped", timeout, zvol=zvol, host=host, snapshot=snapshot)

    def zvol_synced(self, zvol: str, *, ok: bool, error: Optional[str] = None,
                    timeout: Optional[float] = None) -> None:
        """The container's report that a merge finished (or failed): no reply comes."""
        if ok:
            self._notify("zvol_synced", timeout, zvol=zvol, status="success")
        else:
            self._notify("zvol_synced", timeout, zvol=zvol, status="error", error=error)
