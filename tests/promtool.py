"""Where the tests find promtool: on the PATH, or in the virtualenv they run from
(``scripts/bootstrap --test`` puts it there when the system has none)."""
from __future__ import annotations

import os
import shutil
import sys
from typing import Optional


def find_promtool() -> Optional[str]:
    here = os.path.dirname(sys.executable)
    return shutil.which("promtool", path=os.pathsep.join([os.environ.get("PATH", ""), here]))
