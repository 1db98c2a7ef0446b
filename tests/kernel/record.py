"""Record what the real tools print, inside the guests, as unit-test fixtures.

The drivers' unit tests replay files under ``tests/fixtures/`` (format in
tests/unit/replay.py).  Fixtures recorded here come from Debian bookworm's
own tools on its own kernel, so a driver that parses them is tested against
the real thing, not against what someone thought it prints.

Used through ``tests/kernel/run --record`` (any scenario's ``c.rec(...)`` calls),
which writes into ``tests/fixtures/<tool>/real_*.txt``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def fixture_text(argv: Sequence[str], result: Dict, note: Optional[str] = None) -> str:
    lines = [f"command: {' '.join(argv)}"]
    if note:
        lines.append(f"note: {note}")
    lines.append(f"exit: {result['rc']}")
    lines.append("--- stdout")
    lines += result["stdout"].splitlines()
    lines.append("--- stderr")
    lines += result["stderr"].splitlines()
    return "\n".join(lines) + "\n"


def record(guest, name: str, argv: Sequence[str], note: Optional[str] = None,
           timeout: float = 120.0) -> Dict:
    """Run ``argv`` in ``guest`` and keep what it printed as ``tests/fixtures/<name>.txt``."""
    result = guest.call("run", argv=list(argv), timeout=timeout)
    path = FIXTURES / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(fixture_text(argv, result, note), encoding="utf-8")
    return result
