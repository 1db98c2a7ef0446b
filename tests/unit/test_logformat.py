"""``log_format: "json"``: every line one object a log shipper can index."""
from __future__ import annotations

import io
import json
import logging
import re
from datetime import datetime, timezone

import pytest

from imgstorage.config import from_dict
from imgstorage.daemon import setup_logging
from imgstorage.logformat import JsonFormatter, formatter, zvol_of
from imgstorage.nas.states import Event

from .nas_stub import nas_service

FIELDS = {"time", "level", "node", "logger", "thread", "event", "message"}


@pytest.fixture
def captured():
    """The root logger writing JSON lines into a buffer, as a daemon's would."""
    root = logging.getLogger()
    kept = (list(root.handlers), root.level)
    buffer = io.StringIO()
    setup_logging(from_dict({"name": "nas-0-0", "log_format": "json"}), stream=buffer)
    yield buffer
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in kept[0]:
        root.addHandler(handler)
    root.setLevel(kept[1])


def lines(buffer: io.StringIO):
    text = buffer.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def record(msg, *args, **kw) -> logging.LogRecord:
    return logging.LogRecord("imgstorage.test", logging.INFO, __file__, 1, msg, args or None,
                             None, **kw)


def test_every_line_parses_with_the_fields_every_line_has(captured):
    log = logging.getLogger("imgstorage.test")
    log.info("zvol %s runs from its local copy on %s", "vol1", "compute-0-3")
    log.warning("no zvol here:\nbut a second line, \"quotes\" and \u00e9")
    log.info("progress %d%% of zvol %s", 42, "vol2", extra={"event": "copy", "bytes": 1024,
                                                            "odd": object()})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("could not recover zvol %s (%s)", "vol3", "mapping")
    got = lines(captured)
    assert len(got) == 4
    for line in got:
        assert FIELDS <= set(line), line
        assert line["node"] == "nas-0-0" and line["logger"] == "imgstorage.test"
        when = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
        assert when.tzinfo == timezone.utc
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    first, second, third, fourth = got
    assert (first["level"], first["event"], first["zvol"]) == ("INFO", "log", "vol1")
    assert first["message"] == "zvol vol1 runs from its local copy on compute-0-3"
    assert second["level"] == "WARNING" and "zvol" not in second
    assert second["message"] == "no zvol here:\nbut a second line, \"quotes\" and \u00e9"
    assert (third["event"], third["zvol"], third["bytes"]) == ("copy", "vol2", 1024)
    assert third["odd"].startswith("<object object")          # what JSON cannot hold: its text
    assert (fourth["level"], fourth["zvol"]) == ("ERROR", "vol3")
    assert "RuntimeError: boom" in fourth["exception"] and "Traceback" in fourth["exception"]


def test_a_transition_carries_its_zvol_and_its_states(tmp_path, captured):
    service, _containers = nas_service(tmp_path)
    store = service.store
    store.add("vol1", "tank", 1 << 30)
    store.transition("vol1", Event.MAP, remotehost="compute-0-3")
    store.transition("vol1", Event.ATTACHED)
    moves = [line for line in lines(captured) if line["event"] == "transition"]
    assert [(m["zvol"], m["from"], m["to"], m["on"]) for m in moves] == [
        ("vol1", "unmapped", "mapping", "map"), ("vol1", "mapping", "mapped", "attached")]
    for m in moves:
        assert m["host"] == "compute-0-3" and m["logger"] == "imgstorage.rowstore"
        assert isinstance(m["seconds_in_from"], float)
        assert m["message"].startswith(f"zvol vol1: {m['from']} -> {m['to']} on {m['on']}")


def test_the_zvol_is_read_from_messages_that_name_one():
    assert zvol_of(record("zvol %s: merge report ignored in state %s", "v1", "local")) == "v1"
    assert zvol_of(record("created zvol %s/%s of %d GB", "tank", "v2", 3)) == "v2"
    assert zvol_of(record("%s let go of %s; %d%% done; zvol %s", "h", "x", 5, "v3")) == "v3"
    assert zvol_of(record("re-exported %s (zvol %s%s)", "dev", "v4", "")) == "v4"
    assert zvol_of(record("NAS->VM copy of %s done", "v5")) is None   # says no "zvol"
    assert zvol_of(record("zvol %s", 5)) is None                        # not a name
    assert zvol_of(record("width %*d then zvol %s", 3, 4, "v6")) is None
    assert zvol_of(record("zvol %s")) is None                           # no arguments


def test_text_stays_the_default_line():
    cfg = from_dict({"name": "nas-0-0"})
    assert cfg.log_format == "text"
    line = formatter(cfg.log_format).format(record("zvol %s is home", "v1"))
    assert re.fullmatch(r"\S+ \S+ INFO imgstorage.test \[MainThread\]: zvol v1 is home", line)
    assert isinstance(formatter("json", "n"), JsonFormatter)
    with pytest.raises(ValueError):
        formatter("xml")


def test_extra_fields_cannot_replace_the_lines_own():
    rec = _with(record("hello"), node="elsewhere", level="LOUD", zvol="v9")
    line = json.loads(JsonFormatter("vm-container-0-14").format(rec))
    assert (line["node"], line["level"], line["zvol"]) == ("vm-container-0-14", "INFO", "v9")


def _with(rec: logging.LogRecord, **fields) -> logging.LogRecord:
    for key, value in fields.items():
        setattr(rec, key, value)
    return rec
