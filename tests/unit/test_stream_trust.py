"""What one node tells another about a stream is checked before it is used."""
from __future__ import annotations

import pytest

from imgstorage.drivers.zfs import ZfsCli
from imgstorage.errors import ImgStorageError, ValidationError
from imgstorage.nas import transport
from tests.unit.replay import ReplayRunner, load_fixture

FIXTURE = "zfs/real_send_resume_estimate.txt"     # a token whose toname is tank/ksr-a@s1


def token() -> str:
    words = load_fixture(FIXTURE).command.split()
    return words[words.index("-t") + 1]


def estimate(pool: str, zvol: str) -> int:
    runner = ReplayRunner().expect(["zfs", "send", "-nP", "-t", token()], FIXTURE)
    return ZfsCli(runner, path_exists=lambda path: True).send_resume_size(pool, zvol, token())


def test_a_resume_token_of_the_zvol_itself_is_estimated():
    assert estimate("tank", "ksr-a") == 4472952


@pytest.mark.parametrize("pool, zvol", [("tank", "vol1"), ("tank", "ksr"), ("tank", "ksr-a-2"),
                                        ("other", "ksr-a")])
def test_a_resume_token_naming_another_dataset_is_refused(pool, zvol):
    with pytest.raises(ValidationError, match=f"names tank/ksr-a@s1, not a snapshot of "
                                              f"{pool}/{zvol}"):
        estimate(pool, zvol)


GOOD = {"address": "127.0.0.1", "port": 40000, "token": "A" * 43}


@pytest.mark.parametrize("change", [
    {"address": None}, {"address": "127.0.0.1:22"}, {"address": "-oProxyCommand=x"},
    {"address": "a b"}, {"port": 0}, {"port": 65536}, {"port": True}, {"port": "40000"},
    {"token": None}, {"token": "short"}, {"token": "A" * 54}, {"token": "A" * 42 + " "},
])
def test_a_container_answer_without_a_usable_endpoint_is_refused(change):
    with pytest.raises(ImgStorageError, match="the container answered without a valid stream"):
        transport._endpoint({**GOOD, **change})


def test_a_usable_endpoint_is_taken_as_answered():
    assert transport._endpoint(dict(GOOD, address="compute-0-3.ibnet")) == (
        "compute-0-3.ibnet", 40000, "A" * 43)
    assert transport._endpoint(GOOD) == ("127.0.0.1", 40000, "A" * 43)


@pytest.mark.parametrize("size", [-1, True, 1.5, "100", 1 << 61])
def test_an_absurd_stream_size_is_refused(size):
    with pytest.raises(ImgStorageError, match="invalid stream size"):
        transport._stream_size({"size": size})


def test_a_stream_size_is_optional():
    assert transport._stream_size({}) is None and transport._stream_size({"size": 0}) == 0
