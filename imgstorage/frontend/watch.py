"""``watch=SECONDS``: a listing shown again and again, until Ctrl-C.

An operator following a boot storm or a long copy would otherwise run the
same listing in a loop by hand.  On a terminal the table is redrawn in place,
with a progress bar under it for every running transfer (its share of the
estimated stream, its rate and the time left); in a pipe or a log file a
redrawn screen would be garbage, so each interval prints one table after a
line with the time, which a script or a person can split.

A NAS or a broker that stops answering is what an operator watches *for*:
its error is shown, said to be retried, and the next interval asks again.
Ctrl-C is how a watch ends, so it ends with status 0 and no traceback.

The terminal library (rich) is imported only when there is a terminal to
draw on: a watch into a pipe, like every other listing, starts without it.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import click

from ..errors import ValidationError
from .storagemap import Listing, Transfer
from .tables import OutputOptions, duration, rate

MIN_SECONDS = 1.0           # a listing a second is already more than anyone reads
MAX_SECONDS = 86400.0       # a day: beyond that, a cron job is the better tool
MIN_WAIT = 10.0             # a refresh's default time limit, however short the interval
BAR_WIDTH = 30


@dataclass
class Frame:
    """What one interval shows: a listing of those that answered, and what failed."""

    listing: Optional[Listing]
    errors: List[str] = field(default_factory=list)


def parse_seconds(text: str) -> float:
    """``watch=`` as a number of seconds between two tables."""
    try:
        value = float(text)
    except ValueError:
        raise ValidationError(f"invalid watch {text!r}: expected a number of seconds "
                              "between two tables") from None
    if not math.isfinite(value) or value <= 0:
        raise ValidationError(f"invalid watch {text!r}: expected a positive number of seconds")
    if value < MIN_SECONDS:
        raise ValidationError(f"invalid watch {text!r}: at least {MIN_SECONDS:g} second "
                              "between two tables")
    if value > MAX_SECONDS:
        raise ValidationError(f"invalid watch {text!r}: at most {MAX_SECONDS:g} seconds "
                              "(a day) between two tables")
    return value


def parse_count(text: str) -> int:
    """``count=`` as the number of tables after which a watch ends by itself."""
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ValidationError(f"invalid count {text!r}: expected a whole number of tables, "
                              "at least 1")
    return value


def refresh_timeout(seconds: float, configured: float) -> float:
    """How long one refresh waits for a NAS when ``timeout=`` does not say: about the
    interval (a NAS that does not answer must not freeze the screen for a minute),
    but never less than MIN_WAIT nor more than the configured timeout."""
    return min(configured, max(seconds, MIN_WAIT))


def on_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def watch(fetch: Callable[[], Frame], seconds: float, count: Optional[int],
          options: OutputOptions, title: str, *, terminal: Optional[bool] = None,
          console: Any = None) -> int:
    """Show ``fetch()`` every ``seconds`` until Ctrl-C or ``count`` tables; the exit status.

    The status is 0, unless the watch ended by its count with a refresh that
    failed (1), as the listing alone would have.  ``console`` is the rich
    Console a terminal view draws on (default: standard output's).
    """
    if terminal is None:
        terminal = on_terminal()
    show = (_TerminalView(options, title, seconds, console) if terminal
            else _PlainView(options, seconds))
    clock, sleep = time.time, time.sleep
    failed = False
    try:
        with show:
            shown = 0
            due = clock()
            while True:
                frame = fetch()
                shown += 1
                last = count is not None and shown >= count
                failed = bool(frame.errors)
                show.frame(frame, clock(), retry=not last)
                if last:
                    break
                due += seconds
                now = clock()
                if due < now:       # a refresh took longer than the interval: skip, not catch up
                    due = now
                sleep(due - now)
    except KeyboardInterrupt:
        return 0
    return 1 if failed else 0


def _stamp(now: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))


def _retry_note(seconds: float) -> str:
    return f" (trying again in {seconds:g} s)"


class _PlainView:
    """One table per interval, after a line with the time; errors on standard error."""

    def __init__(self, options: OutputOptions, seconds: float):
        self.options = options
        self.seconds = seconds

    def __enter__(self) -> "_PlainView":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def frame(self, frame: Frame, now: float, retry: bool) -> None:
        click.echo(f"--- {_stamp(now)} ---")
        if frame.listing is not None:
            text = frame.listing.table.render(self.options)
            if text:
                click.echo(text)
        sys.stdout.flush()
        for error in frame.errors:
            click.echo(f"error - {error}" + (_retry_note(self.seconds) if retry else ""),
                       err=True)


class _TerminalView:
    """The table redrawn in place, a progress bar per transfer under it."""

    def __init__(self, options: OutputOptions, title: str, seconds: float, console: Any = None):
        from rich.console import Console
        from rich.live import Live
        self.options = options
        self.title = title
        self.seconds = seconds
        self.console = console if console is not None else Console()
        self.live = Live(console=self.console, auto_refresh=False, transient=False,
                         vertical_overflow="crop")

    def __enter__(self) -> "_TerminalView":
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)

    def frame(self, frame: Frame, now: float, retry: bool) -> None:
        self.live.update(render_frame(frame, now, self.title, self.seconds, retry,
                                      self.options), refresh=True)


def render_frame(frame: Frame, now: float, title: str, seconds: float, retry: bool = True,
                 options: OutputOptions = OutputOptions()):
    """One screen of a watch on a terminal, as a rich renderable."""
    from rich.console import Group
    from rich.text import Text

    parts: List[Any] = [Text(f"Every {seconds:g} s: {title}", style="bold")
                        + Text(f"    {_stamp(now)}", style="dim"), Text("")]
    if frame.listing is not None:
        text = frame.listing.table.render(options)
        parts.append(Text(text or "(no zvols)", no_wrap=True, overflow="crop"))
        if frame.listing.transfers:
            parts += [Text(""), transfer_bars(frame.listing.transfers)]
    for error in frame.errors:
        parts.append(Text(f"error - {error}" + (_retry_note(seconds) if retry else ""),
                          style="bold red"))
    parts += [Text(""), Text("Ctrl-C ends the watch", style="dim")]
    return Group(*parts)


def transfer_bars(transfers: List[Transfer]):
    """A bar per transfer: which zvol, its share done, its rate, the time left."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table as RichTable

    several = len({t.nas for t in transfers}) > 1
    grid = RichTable.grid(padding=(0, 1))
    for _ in range(6):
        grid.add_column(no_wrap=True)
    for t in transfers:
        name = f"{t.nas}:{t.zvol}" if several else t.zvol
        known = t.percent is not None
        bar = ProgressBar(total=100.0 if known else None, completed=t.percent or 0.0,
                          width=BAR_WIDTH)
        eta = duration(math.ceil(t.eta)) if t.eta is not None else "-"
        grid.add_row(name, t.state, bar, f"{t.percent:3.0f}%" if known else "  ?%",
                     rate(t.rate) or "-", f"ETA {eta}")
    return grid
