import json

import pytest

from imgstorage import protocol
from imgstorage.errors import ValidationError


def test_decode_accepts_objects_with_action():
    assert protocol.decode(b'{"action": "list_zvols"}') == {"action": "list_zvols"}


@pytest.mark.parametrize("body,text", [
    (b"{not json", "malformed JSON"), (b"\xff\xfe", "malformed JSON"), (b"[1]", "JSON object"),
    (b'{"zvol": "x"}', "no action"), (b'{"action": 3}', "no action"),
    (b'{"action": "x", "pad": "' + b"a" * 70000 + b'"}', "too large"),
])
def test_decode_rejects(body, text):
    with pytest.raises(ValidationError, match=text):
        protocol.decode(body)


def test_replies_use_the_original_action_names():
    assert protocol.success("map_zvol", bdev="/dev/sdc") == {
        "action": "zvol_mapped", "status": "success", "bdev": "/dev/sdc"}
    assert protocol.error("unmap_zvol", "boom") == {
        "action": "zvol_unmapped", "status": "error", "error": "boom", "code": "error"}
    assert protocol.error("map_zvol", "held", code="busy")["code"] == "busy"
    assert protocol.error_code({"status": "error", "error": "x"}) == "error"   # an older node
    assert protocol.error_code(protocol.error("x", "y", code="forbidden")) == "forbidden"
    assert protocol.error(None, "bad")["action"] == "error"


def test_encode_roundtrip():
    msg = {"action": "map_zvol", "zvol": "vol1", "size": 10}
    assert json.loads(protocol.encode(msg)) == msg


def test_field_validation():
    from imgstorage import naming
    assert protocol.field({"zvol": "v"}, "zvol", naming.zvol_name) == "v"
    with pytest.raises(ValidationError, match="missing field 'zvol'"):
        protocol.field({}, "zvol", naming.zvol_name)
    assert protocol.field({}, "remotepool", naming.zpool_name, required=False) is None
