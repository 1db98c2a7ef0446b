"""The CLI imports what the command it runs needs, and no more.

Importing SQLAlchemy (the registry's mapped classes) and every command module
made ``rocks list host storagemap`` take two seconds on a busy frontend; the
listing needs the broker client, the registry file read through sqlite3 and
the table.  Checked on ``sys.modules`` in a fresh interpreter, not by timing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from imgstorage.frontend import cli
from imgstorage.frontend.commands_base import COMMANDS
from imgstorage.frontend.registry import Registry

HEAVY = ("sqlalchemy", "imgstorage.frontend.registry", "imgstorage.frontend.commands_vm",
         "imgstorage.frontend.commands_hosts", "imgstorage.frontend.commands_broker",
         "imgstorage.drivers", "rich", "tqdm")

LISTING = textwrap.dedent("""
    import json, sys
    from imgstorage.frontend import cli, commands_base

    class Broker:                      # the listing's one request, answered here
        def __init__(self, config): pass
        def __enter__(self): return self
        def __exit__(self, *exc): pass
        def request(self, node, message, timeout):
            return {"status": "success", "more": False, "body": [
                {"zvol": "vol1", "zpool": "tank", "state": "unmapped",
                 "lifecycle": "unmapped"}]}

    before = sorted(m for m in sys.modules if m.split(".")[0] in ("sqlalchemy", "pika"))
    commands_base.RpcClient = Broker
    try:
        cli.main(["list", "host", "storagemap", "nas-0-0"] + sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    loaded = [m for m in %r if m in sys.modules]
    print(json.dumps({"code": code, "loaded": loaded, "before": before}))
""" % (HEAVY,))


def run_listing(tmp_path, *words: str) -> dict:
    db = str(tmp_path / "frontend.db")
    with Registry(db) as r:
        r.add_host("nas-0-0", "nas")
    conf = tmp_path / "imgstorage.conf"
    conf.write_text(json.dumps({"frontend_db": db}))
    env = dict(os.environ, IMGSTORAGE_CONF=str(conf))
    proc = subprocess.run([sys.executable, "-c", LISTING, *words], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *table, last = [line for line in proc.stdout.splitlines() if not line.startswith("--- ")]
    assert table[0].split()[:2] == ["ZVOL", "HOST"] and table[1].split()[0] == "vol1"
    return json.loads(last)


def test_the_storagemap_listing_imports_no_sqlalchemy_nor_other_commands(tmp_path):
    result = run_listing(tmp_path)
    assert result["code"] == 0
    assert result["before"] == []          # importing the CLI loads neither ORM nor broker
    assert result["loaded"] == []


def test_a_watch_into_a_pipe_imports_no_terminal_library(tmp_path):
    result = run_listing(tmp_path, "watch=1", "count=1")
    assert result["code"] == 0
    assert result["loaded"] == []


def test_every_command_is_indexed_under_the_module_that_declares_it():
    cli.declare_all()
    declared = {name: spec.handler.__module__.rsplit(".", 1)[1]
                for name, spec in COMMANDS.items()}
    indexed = {name: module for module, names in cli.COMMAND_MODULES.items()
               for name in names}
    assert indexed == declared
