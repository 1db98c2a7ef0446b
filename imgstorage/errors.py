"""Exceptions that carry a message meant for the operator.

Every error that can reach a user derives from ``ImgStorageError``; its text is
what gets printed (one line) or put in a reply's ``error`` field.  Anything
else that escapes is a bug, and the daemons log it with its traceback.
"""
from __future__ import annotations

from typing import Optional, Sequence


class ImgStorageError(Exception):
    """Base class: ``str(exc)`` is a complete, user-facing sentence."""


class ConfigError(ImgStorageError):
    """The node configuration is missing a key or has an invalid one."""


class ValidationError(ImgStorageError):
    """Input (from the command line or from a message) was rejected."""


class NotFoundError(ImgStorageError):
    """A named object (zvol, host, VM, target) does not exist."""


class BusyError(ImgStorageError):
    """Another operation holds the zvol's lock."""


class StateError(ImgStorageError):
    """The operation is not allowed in the object's current state."""


class DriverError(ImgStorageError):
    """A kernel-facing operation failed."""


class CommandError(DriverError):
    """An external command exited non-zero or timed out."""

    def __init__(self, argv: Sequence[str], returncode: Optional[int], stderr: str = "",
                 stdout: str = "", timed_out: bool = False):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.stdout = stdout
        self.timed_out = timed_out
        cmd = " ".join(self.argv)
        if timed_out:
            msg = f"`{cmd}` timed out"
        else:
            msg = f"`{cmd}` failed (exit {returncode})"
        detail = (stderr or stdout).strip()
        if detail:
            msg += ": " + " ".join(detail.splitlines()[-3:])
        super().__init__(msg)


class MessagingError(ImgStorageError):
    """Talking to the broker, or to another node through it, failed."""


class BrokerUnavailable(MessagingError):
    """The broker cannot be reached."""


class NoSuchNode(MessagingError):
    """No queue is bound for that node name: the request was returned."""

    def __init__(self, node: str):
        self.node = node
        super().__init__(f"no such node: {node}")


class RpcTimeout(MessagingError):
    """A node did not answer in time."""

    def __init__(self, node: str, timeout: float):
        self.node = node
        self.timeout = timeout
        super().__init__(f"node {node} did not answer within {timeout:g} s")


class RemoteError(ImgStorageError):
    """A node answered a request with an error reply."""

    def __init__(self, node: str, action: str, message: str):
        self.node = node
        self.action = action
        super().__init__(message)
