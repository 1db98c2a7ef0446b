"""The ssh transport, as the original roll had it: ``zfs send`` | ``zfs receive`` over ssh."""
from __future__ import annotations

import shlex
from typing import List, Optional

from ..drivers.base import ByteSink, ByteSource
from ..drivers.zfs import (CommandSink, CommandSource, check_resume_token, receive_argv,
                           send_argv, send_resume_argv)
from ..errors import ValidationError
from ..runner import Runner

SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]


def _ssh_argv(user: str, host: str, remote: List[str]) -> List[str]:
    for kind, value in (("user", user), ("host", host)):
        if not value or value.startswith("-") or "@" in value or any(c.isspace() for c in value):
            # ssh would read it as an option or a different destination.
            raise ValidationError(f"invalid ssh {kind} {value!r}")
    # ssh joins the remote command's words with spaces and hands the result
    # to the remote user's shell.  Pool, zvol and snapshot names were
    # validated (imgstorage.naming) before reaching here; quoting each word
    # anyway keeps the remote argv exactly the local one if that ever changes.
    return ["ssh", *SSH_OPTIONS, f"{user}@{host}", *(shlex.quote(word) for word in remote)]


def ssh_source(runner: Runner, user: str, host: str, pool: str, zvol: str, snap: str,
               base: Optional[str] = None, resume_token: Optional[str] = None) -> ByteSource:
    """``zfs send`` on ``host``, read through ssh (the pull of a VM container's copy).

    With ``resume_token`` (the receiver's, after a cut resumable receive) the
    remote command is ``zfs send -t TOKEN``, which continues where the
    receiver stopped; the token names the snapshot, so ``snap`` and ``base``
    are not used then.  The token is checked before it goes on the command line.
    """
    if resume_token is not None:
        remote = send_resume_argv(check_resume_token(resume_token))
    else:
        remote = send_argv(pool, zvol, snap, base)
    return CommandSource(runner, _ssh_argv(user, host, remote))


def ssh_sink(runner: Runner, user: str, host: str, pool: str, zvol: str,
             resumable: bool = False) -> ByteSink:
    """``zfs receive -F`` on ``host``, written through ssh (the upload to a VM container).

    ``resumable`` makes it ``zfs receive -s -F``: a stream cut short (the
    connection broke) leaves a resume token on ``host`` instead of nothing.
    """
    return CommandSink(runner, _ssh_argv(user, host, receive_argv(pool, zvol, resumable)))
