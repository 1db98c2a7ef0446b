"""A Runner that answers from recorded output of the real tools.

Driver tests must prove two things: that the driver builds exactly the argv
the real tool expects, and that it understands exactly what the real tool
prints.  ``ReplayRunner`` checks the first (every argv must have been
announced with :meth:`ReplayRunner.expect`, anything else fails the test at
once) and serves the second from the files under ``tests/fixtures/``.

A fixture file is a few ``key: value`` header lines (``command`` says what was
run, ``exit`` is the exit status) followed by ``--- stdout`` and
``--- stderr`` sections holding the output verbatim, one line per line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, Union

from imgstorage.errors import CommandError
from imgstorage.runner import DEFAULT_TIMEOUT, Result, Runner

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


class UnexpectedCommand(AssertionError):
    """The driver ran a command the test did not announce."""


class _Any:
    """Matches any single argument (a temporary file name, for instance)."""

    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()


@dataclass
class Recording:
    """What one run of a real tool produced."""
    stdout: str = ""
    stderr: str = ""
    returncode: int = 0
    command: str = ""


def load_fixture(name: Union[str, Path]) -> Recording:
    """Read ``tests/fixtures/<name>`` (or an absolute path) into a Recording."""
    path = Path(name)
    if not path.is_absolute():
        path = FIXTURES / path
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the file's last line
    header = {}
    sections = {"stdout": [], "stderr": []}
    current: Optional[List[str]] = None
    for line in lines:
        if line in ("--- stdout", "--- stderr"):
            current = sections[line[4:]]
            continue
        if current is not None:
            current.append(line)
            continue
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or key.strip() not in ("command", "exit", "note"):
            raise ValueError(f"{path}: bad header line {line!r}")
        header[key.strip()] = value.strip()
    if "exit" not in header:
        raise ValueError(f"{path}: no 'exit:' header")

    def text(chunk: List[str]) -> str:
        return "".join(part + "\n" for part in chunk)

    return Recording(stdout=text(sections["stdout"]), stderr=text(sections["stderr"]),
                     returncode=int(header["exit"]), command=header.get("command", ""))


@dataclass
class _Expectation:
    argv: Tuple[object, ...]
    recording: Recording
    times: Optional[int]              # None: any number of times
    on_run: Optional[Callable[[List[str]], None]] = None
    not_found: bool = False           # the program is not installed
    timed_out: bool = False
    used: int = 0

    def matches(self, argv: Sequence[str]) -> bool:
        if self.times is not None and self.used >= self.times:
            return False
        if len(argv) != len(self.argv):
            return False
        return all(want is ANY or want == got for want, got in zip(self.argv, argv))


@dataclass
class Call:
    argv: List[str]
    input: Optional[str] = None
    timeout: float = DEFAULT_TIMEOUT
    check: bool = True
    env: Optional[Mapping[str, str]] = None


@dataclass
class ReplayRunner(Runner):
    """Replays fixtures for announced argv lists; records every call."""

    expectations: List[_Expectation] = field(default_factory=list)
    calls: List[Call] = field(default_factory=list)
    redacted: List[str] = field(default_factory=list)

    def expect(self, argv: Sequence[object], fixture: Optional[str] = None, *,
               stdout: str = "", stderr: str = "", returncode: int = 0,
               times: Optional[int] = 1,
               on_run: Optional[Callable[[List[str]], None]] = None,
               not_found: bool = False, timed_out: bool = False) -> "ReplayRunner":
        """Announce a command and what it answers (a fixture, or literal output).

        ``not_found`` and ``timed_out`` fail the way the real Runner does,
        with a CommandError whatever ``check`` says.
        """
        if fixture is not None:
            recording = load_fixture(fixture)
        else:
            recording = Recording(stdout, stderr, returncode)
        self.expectations.append(_Expectation(tuple(argv), recording, times, on_run,
                                              not_found, timed_out))
        return self

    @property
    def argvs(self) -> List[List[str]]:
        return [call.argv for call in self.calls]

    def run(self, argv: Sequence[str], *, input: Optional[str] = None,
            timeout: float = DEFAULT_TIMEOUT, check: bool = True,
            env: Optional[Mapping[str, str]] = None, redact: Sequence[str] = ()) -> Result:
        argv = [str(a) for a in argv]
        self.redacted.extend(redact)
        self.calls.append(Call(argv, input, timeout, check, env))
        for expectation in self.expectations:
            if expectation.matches(argv):
                expectation.used += 1
                if expectation.on_run is not None:
                    expectation.on_run(argv)
                rec = expectation.recording
                if expectation.not_found:
                    raise CommandError(argv, 127, f"{argv[0]}: command not found")
                if expectation.timed_out:
                    raise CommandError(argv, None, rec.stderr, rec.stdout, timed_out=True)
                if check and rec.returncode != 0:
                    raise CommandError(argv, rec.returncode, rec.stderr, rec.stdout)
                return Result(argv, rec.returncode, rec.stdout, rec.stderr)
        announced = "\n  ".join(repr(list(e.argv)) for e in self.expectations) or "(none)"
        raise UnexpectedCommand(f"unexpected command {argv!r}; announced:\n  {announced}")

    def popen(self, argv: Sequence[str], **kwargs):
        raise UnexpectedCommand(f"unexpected streaming command {list(argv)!r}")

    def assert_all_used(self) -> None:
        """Fail when an announced command (with a fixed count) never ran."""
        unused = [list(e.argv) for e in self.expectations
                  if e.times is not None and e.used < e.times]
        assert not unused, f"announced commands never ran: {unused!r}"
