"""Exceptions that carry a message meant for the operator.

Every error that can reach a user derives from ``ImgStorageError``; its text is
what gets printed (one line) or put in a reply's ``error`` field.  Anything
else that escapes is a bug, and the daemons log it with its traceback.
"""
from __future__ import annotations

from typing import Optional, Sequence


class ImgStorageError(Exception):
    """Base class: ``str(exc)`` is a complete, user-facing sentence.

    ``code`` is the stable, machine-readable name an error reply carries
    besides the text (``protocol.error``), so that a caller tests the kind of
    failure and never a wording that may change.
    """

    code = "error"


class ConfigError(ImgStorageError):
    """The node configuration is missing a key or has an invalid one."""

    code = "config"


class ValidationError(ImgStorageError):
    """Input (from the command line or from a message) was rejected."""

    code = "invalid"


class NotFoundError(ImgStorageError):
    """A named object (zvol, host, VM, target) does not exist."""

    code = "not_found"


class BusyError(ImgStorageError):
    """Another operation holds the zvol's lock."""

    code = "busy"


class StateError(ImgStorageError):
    """The operation is not allowed in the object's current state."""

    code = "state"


class DriverError(ImgStorageError):
    """A kernel-facing operation failed."""

    code = "driver"


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

    code = "messaging"


class BrokerUnavailable(MessagingError):
    """The broker cannot be reached."""

    code = "broker_unavailable"


class NoSuchNode(MessagingError):
    """No queue is bound for that node name: the request was returned."""

    code = "no_such_node"

    def __init__(self, node: str):
        self.node = node
        super().__init__(f"no such node: {node}")


class RpcTimeout(MessagingError):
    """A node did not answer in time."""

    code = "timeout"

    def __init__(self, node: str, timeout: float):
        self.node = node
        self.timeout = timeout
        super().__init__(f"node {node} did not answer within {timeout:g} s")


class ForbiddenError(ImgStorageError):
    """The caller's broker user may not ask for this (or not for this zvol)."""

    code = "forbidden"


class NotResumableError(DriverError):
    """A resume token can no longer be resumed: the transfer must start over."""

    code = "not_resumable"


# codes a reply may carry that name no local exception class
INTERNAL = "internal"          # a bug on the answering node
UNKNOWN_ACTION = "unknown_action"
TOO_LARGE = "too_large"        # a reply over the size a reply may carry


class RemoteError(ImgStorageError):
    """A node answered a request with an error reply; ``code`` is the reply's."""

    def __init__(self, node: str, action: str, message: str, code: str = "error"):
        self.node = node
        self.action = action
        self.code = code
        super().__init__(message)
