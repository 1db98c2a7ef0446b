import pytest

from imgstorage import naming
from imgstorage.errors import ValidationError

HOSTILE = ["a/b", "a;b", "a b", "..", "a..b", "$(reboot)", "`id`", "", "-x", "a\nb",
           "x" * 300, "tank/../etc", "a|b", "a&b", "a>b", "*"]


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_names_rejected_everywhere(bad):
    for check in (naming.zvol_name, naming.zpool_name, naming.host_name, naming.attr_name):
        with pytest.raises(ValidationError):
            check(bad)


@pytest.mark.parametrize("bad", [None, 3, ["a"], {"a": 1}, True])
def test_non_strings_rejected(bad):
    with pytest.raises(ValidationError, match="expected a string"):
        naming.zvol_name(bad)


def test_good_names():
    assert naming.zvol_name("compute-0-14-0-vol") == "compute-0-14-0-vol"
    assert naming.zvol_name("vm_1.data:x") == "vm_1.data:x"
    assert naming.zpool_name("tank") == "tank"
    assert naming.host_name("compute-0-3.ibnet") == "compute-0-3.ibnet"
    assert naming.attr_name("img_zpools") == "img_zpools"


def test_pool_names_follow_zfs_rules():
    with pytest.raises(ValidationError):
        naming.zpool_name("1tank")
    with pytest.raises(ValidationError):
        naming.zpool_name("mirror")


@pytest.mark.parametrize("value,expected", [("10", 10), (10, 10), ("35gb", 35), ("2G", 2), (3.0, 3)])
def test_sizes(value, expected):
    assert naming.size_gb(value) == expected


@pytest.mark.parametrize("value", ["-1", -1, 0, "0", "1.5", 1.5, "ten", True, None, [], str(1 << 30)])
def test_bad_sizes(value):
    with pytest.raises(ValidationError, match="size"):
        naming.size_gb(value)


def test_negative_size_message_is_clear():
    with pytest.raises(ValidationError, match="must be a positive number of GB"):
        naming.size_gb("-5")


def test_bool_parsing():
    assert naming.parse_bool("True") is True
    assert naming.parse_bool("no") is False
    with pytest.raises(ValidationError):
        naming.parse_bool("maybe")


def test_target_names_follow_the_original_convention():
    assert naming.target_iqn("nas-0-0", "vol1") == "iqn.2001-04.com.nas-0-0-vol1"
    assert naming.iqn("iqn.2001-04.com.nas-0-0-vol1")
    with pytest.raises(ValidationError):
        naming.iqn("iqn.2001-04.com.nas;rm")


def test_attr_values():
    assert naming.attr_value(300) == "300"
    assert naming.attr_value(None) is None
    with pytest.raises(ValidationError):
        naming.attr_value("a\nb")
    with pytest.raises(ValidationError):
        naming.attr_value({"x": 1})


def test_non_negative_int():
    assert naming.non_negative_int("frequency", "60", minimum=1) == 60
    assert naming.non_negative_int("x", "none") is None
    with pytest.raises(ValidationError):
        naming.non_negative_int("frequency", "0", minimum=1)
    with pytest.raises(ValidationError):
        naming.non_negative_int("x", "-3")


@pytest.mark.parametrize("check", [naming.zvol_name, naming.zpool_name, naming.host_name,
                                   naming.attr_name, naming.iqn])
def test_trailing_newline_is_not_a_name(check):
    good = "iqn.2001-04.com.nas-0-0-v" if check is naming.iqn else "vol1"
    assert check(good) == good
    with pytest.raises(ValidationError):
        check(good + "\n")


# ---------------------------------------------------------- target names
LIO_NAME = __import__("re").compile(r"^iqn\.\d{4}-\d{2}\.[a-z0-9.:-]+\Z")


@pytest.mark.parametrize("zvol", ["compute-0-1-0-vol", "vol1", "x:b", "a.b-c", "9"])
def test_a_name_lio_keeps_as_given_keeps_the_original_target_name(zvol):
    assert naming.target_iqn("nas-0-0", zvol) == f"iqn.2001-04.com.nas-0-0-{zvol}"


@pytest.mark.parametrize("zvol", ["Vol1", "a_b", "VM_1.Data:X", "A" * 200, "a" * 200])
def test_every_target_name_is_one_lio_and_tgt_keep_as_given(zvol):
    name = naming.target_iqn("nas-0-0", zvol)
    assert LIO_NAME.match(name) and len(name) <= 200
    assert naming.iqn(name) == name


def test_names_lio_would_change_get_a_lowercase_form_and_a_hash_of_the_original():
    name = naming.target_iqn("nas-0-0", "Vol1")
    assert name.startswith("iqn.2001-04.com.nas-0-0:vol1-")
    assert name == naming.target_iqn("nas-0-0", "Vol1")        # stable
    assert naming.target_iqn("nas-0-0", "a_b").startswith("iqn.2001-04.com.nas-0-0:a-b-")


def test_target_names_are_one_per_zvol():
    zvols = ["Vol1", "vol1", "VOL1", "vOl1", "a_b", "a-b", "A_b", "a_B", "x:b", "y:b",
             "vol1-" + naming.target_iqn("nas-0-0", "Vol1").rsplit("-", 1)[1],
             "nas-0-0:vol1", "A" * 200, "A" * 199 + "a", "a" * 200, "a" * 199 + "b"]
    names = [naming.target_iqn("nas-0-0", z) for z in zvols]
    assert len(set(names)) == len(zvols)
    assert len({n.lower() for n in names}) == len(zvols)   # the kernel's view, too


def test_an_upper_case_nas_name_gives_lowercase_target_names():
    name = naming.target_iqn("NAS-0-0", "vol1")
    assert name == name.lower() and name.startswith("iqn.2001-04.com.nas-0-0:vol1-")
