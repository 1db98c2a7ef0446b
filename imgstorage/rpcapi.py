"""What the two daemons' typed clients share: one node, one sender, one timeout.

A client method names an action and its fields; this base turns them into the
wire message (``{"action": ..., fields}``, fields left out when the method
says so) and hands it to a sender: an ``imgstorage.messaging.RpcClient``, or
anything with its ``request``/``notify`` methods (a command's own connection,
a fresh connection per request, a one-way notifier).  Message bodies are
written in the clients only, so the wire format lives in two small modules.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Dict, Optional, Protocol

from .config import Config
from .errors import ImgStorageError, MessagingError, RemoteError

DEFAULT_TIMEOUT = 60.0


class Sender(Protocol):
    """How a client reaches a node (RpcClient's interface)."""

    def request(self, node: str, message: Dict[str, Any], timeout: float) -> Dict[str, Any]: ...

    def notify(self, node: str, message: Dict[str, Any],
               timeout: Optional[float] = None) -> None: ...


class NodeClient:
    """One daemon's API on one node.

    ``rpc`` is a sender, or a Config: then the client opens its own
    RpcClient and closes it when used as a context manager (or ``close``).
    ``timeout`` is what each request waits unless the method is given its
    own: the caller's, else the configuration's.
    """

    def __init__(self, rpc: Any, node: str, timeout: Optional[float] = None):
        self._owned = None
        if isinstance(rpc, Config):
            from .messaging import RpcClient
            self._owned = rpc = RpcClient(rpc)
        self.rpc: Sender = rpc
        self.node = node
        config = getattr(rpc, "config", None)
        self.timeout = float(timeout if timeout is not None
                             else getattr(config, "timeout", None) or DEFAULT_TIMEOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        owned, self._owned = self._owned, None
        if owned is not None:
            owned.close()

    @staticmethod
    def message(action: str, **fields: Any) -> Dict[str, Any]:
        """The wire message: the action, then its fields (None where the method sends null)."""
        body: Dict[str, Any] = {"action": action}
        body.update(fields)
        return body

    def _request(self, action: str, timeout: Optional[float] = None,
                 **fields: Any) -> Dict[str, Any]:
        """Send a request; its successful reply (an error reply raises RemoteError)."""
        return self.rpc.request(self.node, self.message(action, **fields),
                                timeout if timeout is not None else self.timeout)

    def _send(self, message: Dict[str, Any], timeout: Optional[float] = None) -> Dict[str, Any]:
        """Send a message built here already (a listing's next page)."""
        return self.rpc.request(self.node, message,
                                timeout if timeout is not None else self.timeout)

    def _notify(self, action: str, timeout: Optional[float] = None, **fields: Any) -> None:
        """Send a message that gets no reply."""
        self.rpc.notify(self.node, self.message(action, **fields), timeout)


class PerRequest:
    """A sender that takes a connection for each request from ``factory`` (a daemon's
    RpcPool, or a new connection each time): a daemon's worker threads never share one,
    RpcClient is not thread-safe."""

    def __init__(self, factory: Callable[[], ContextManager[Any]]):
        self.factory = factory

    def request(self, node: str, message: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        with self.factory() as rpc:
            return rpc.request(node, message, timeout)

    def notify(self, node: str, message: Dict[str, Any],
               timeout: Optional[float] = None) -> None:
        with self.factory() as rpc:
            rpc.notify(node, message, timeout)


class Asking:
    """A sender over a function that sends a request and returns its reply (the
    CLI's ``Invocation.request``, which knows its own timeout)."""

    def __init__(self, ask: Callable[[str, Dict[str, Any]], Dict[str, Any]]):
        self.ask = ask

    def request(self, node: str, message: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        return self.ask(node, message)

    def notify(self, node: str, message: Dict[str, Any],
               timeout: Optional[float] = None) -> None:
        raise MessagingError(f"cannot send {message.get('action')} to {node} without a reply")


class OneWay:
    """A sender that only tells (a container's notifier, which logs what it cannot send)."""

    def __init__(self, tell: Callable[[str, Dict[str, Any]], None]):
        self.tell = tell

    def request(self, node: str, message: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        raise MessagingError(f"cannot ask {node} {message.get('action')}: this sender only "
                             "notifies")

    def notify(self, node: str, message: Dict[str, Any],
               timeout: Optional[float] = None) -> None:
        self.tell(node, message)


def code_of(exc: BaseException) -> Optional[str]:
    """The stable code of a failure, local or remote (None for anything else)."""
    return exc.code if isinstance(exc, ImgStorageError) else None


def remote_code(exc: BaseException) -> Optional[str]:
    """The code of an error reply; None when the failure was not the node's answer."""
    return exc.code if isinstance(exc, RemoteError) else None
