"""The one way this project runs an external command.

Argument lists only, never a shell string; every call has a timeout; a failure
becomes a CommandError whose text holds the command and the tail of its
stderr.  Drivers take a runner object so tests can hand them a runner that
answers from recorded output of the real tools.
"""
from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .errors import CommandError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0


@dataclass
class Result:
    argv: list
    returncode: int
    stdout: str
    stderr: str


class Runner:
    """Runs commands with subprocess; subclassed by tests to replay fixtures."""

    def run(self, argv: Sequence[str], *, input: Optional[str] = None,
            timeout: float = DEFAULT_TIMEOUT, check: bool = True,
            env: Optional[Mapping[str, str]] = None, redact: Sequence[str] = ()) -> Result:
        """Run ``argv``; ``redact`` lists secrets (CHAP passwords) kept out of logs and errors."""
        argv = [str(a) for a in argv]
        if not argv:
            raise ValueError("empty command")
        shown = [("********" if a in redact else a) for a in argv]
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                                  timeout=timeout, env=dict(env) if env is not None else None,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise CommandError(shown, None, _scrub(exc.stderr, redact), _scrub(exc.stdout, redact),
                               timed_out=True) from None
        except FileNotFoundError:
            raise CommandError(shown, 127, f"{argv[0]}: command not found") from None
        log.debug("ran %s -> %d in %.3fs", shown, proc.returncode, time.monotonic() - started)
        result = Result(argv, proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise CommandError(shown, proc.returncode, _scrub(proc.stderr, redact),
                               _scrub(proc.stdout, redact))
        return result

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a long-running command (a send or receive stream).

        The caller owns the pipes and the wait; only a missing program is
        reported here, in the same words as :meth:`run`, so a node without
        ``zfs`` or ``ssh`` fails the same way whether it streams or not.
        """
        argv = [str(a) for a in argv]
        if not argv:
            raise ValueError("empty command")
        log.debug("starting %s", argv)
        try:
            return subprocess.Popen(argv, **kwargs)
        except FileNotFoundError:
            raise CommandError(argv, 127, f"{argv[0]}: command not found") from None


def _scrub(data, redact: Sequence[str]) -> str:
    text = _text(data)
    for secret in redact:
        if secret:
            text = text.replace(secret, "********")
    return text


def _text(data) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data


default_runner = Runner()
