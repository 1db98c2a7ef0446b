"""Rocks table output: the seed's tables rebuilt from rows."""
from __future__ import annotations

import json

import pytest

from imgstorage.errors import ValidationError
from imgstorage.frontend.tables import OutputOptions, Table, elapsed, render_lines

IQN = "iqn.2001-04.com.nas-0-0-"

# (zvol, remotehost, zpool, target, state, time) of the seed's first storagemap listing
SEED_STORAGEMAP_ROWS = [
    ("hpcdev-pub03-vol", "hpcdev-pub02", "tank", IQN + "hpcdev-pub03-vol", "mapped", None),
    ("vm-hpcdev-pub03-4-vol", None, "tank", None, "unmapped", None),
    ("vm-hpcdev-pub03-3-vol", None, "tank", None, "unmapped", None),
    ("vm-hpcdev-pub03-2-vol", None, "tank", None, "unmapped", None),
    ("vm-hpcdev-pub03-0-vol", "compute-0-1", "tank", None, "mapped", None),
    ("vm-hpcdev-pub03-1-vol", "compute-0-3", "tank", IQN + "vm-hpcdev-pub03-1-vol", "mapped", None),
    ("vm-hpcdev-pub03-5-vol", "compute-0-3", "tank", None, "mapped", None),
]

SEED_STORAGEMAP = """\
ZVOL                     HOST            ZPOOL   TARGET                                           STATE    TIME
hpcdev-pub03-vol         hpcdev-pub02    tank    iqn.2001-04.com.nas-0-0-hpcdev-pub03-vol         mapped   ----
vm-hpcdev-pub03-4-vol    --------------- tank    ------------------------------------------------ unmapped ----
vm-hpcdev-pub03-3-vol    --------------- tank    ------------------------------------------------ unmapped ----
vm-hpcdev-pub03-2-vol    --------------- tank    ------------------------------------------------ unmapped ----
vm-hpcdev-pub03-0-vol    compute-0-1     tank    ------------------------------------------------ mapped   ----
vm-hpcdev-pub03-1-vol    compute-0-3     tank    iqn.2001-04.com.nas-0-0-vm-hpcdev-pub03-1-vol    mapped   ----
vm-hpcdev-pub03-5-vol    compute-0-3     tank    ------------------------------------------------ mapped   ----"""

SEED_STORAGEDEV = """\
ZVOL                     LVM                           STATUS            SIZE (GB) BLOCK DEV IS STARTED SYNCED                    TIME   
vm-hpcdev-pub03-3-vol    vm-hpcdev-pub03-3-vol-snap    snapshot          35        sdd       ---------- 32/73400320 32            -------
vm-hpcdev-pub03-1-vol    vm-hpcdev-pub03-1-vol-snap    snapshot-merge    36        sdc       1          8950592/73400320 17472    0:36:36
vm-hpcdev-pub03-5-vol    vm-hpcdev-pub03-5-vol-snap    linear            36        --------- ---------- ------------------------- -------"""


def storagemap_table(nas: str = "nas-0-0") -> Table:
    table = Table(["nas", "zvol", "host", "zpool", "target", "state", "time"])
    for row in SEED_STORAGEMAP_ROWS:
        table.add(nas, *row)
    return table


def normalised(text: str):
    """Tokens of each line, every run of dashes counted as one empty cell.

    The seed's listings come from an older build whose columns were a few
    characters wider than their widest value; content and order must match.
    """
    return [[("-" if set(tok) == {"-"} else tok) for tok in line.split()]
            for line in text.splitlines()]


def test_seed_storagemap_layout_exact():
    out = storagemap_table().render()
    assert out.splitlines()[:3] == [
        "ZVOL                  HOST         ZPOOL TARGET                                        STATE    TIME",
        "hpcdev-pub03-vol      hpcdev-pub02 tank  iqn.2001-04.com.nas-0-0-hpcdev-pub03-vol      mapped   ----",
        "vm-hpcdev-pub03-4-vol ------------ tank  --------------------------------------------- unmapped ----",
    ]


def test_seed_storagemap_same_content_as_the_seed():
    assert normalised(storagemap_table().render()) == normalised(SEED_STORAGEMAP)


def test_empty_cells_are_dashes_of_the_column_width():
    lines = storagemap_table().render().splitlines()
    header = lines[0]
    host_width = header.index("ZPOOL") - header.index("HOST") - 1
    target_width = header.index("STATE") - header.index("TARGET") - 1
    assert "-" * host_width + " " in lines[2]
    assert " " + "-" * target_width + " " in lines[2]
    assert lines[1].endswith(" ----")   # TIME is as wide as its header


def test_owner_column_dropped_when_one_owner_and_shown_otherwise():
    one = storagemap_table().render()
    assert not one.startswith("NAS")
    table = storagemap_table("nas-0-0")
    table.add("nas-0-1", "vol1", None, None, None, "unmapped", None)
    lines = table.render().splitlines()
    assert lines[0].startswith("NAS      ZVOL")
    assert lines[1].startswith("nas-0-0: hpcdev-pub03-vol")
    assert lines[-1].startswith("nas-0-1: vol1")


def test_trim_owner_off_keeps_a_single_owner():
    table = Table(["VM-HOST", "NAS"], trim_owner=False)
    table.add("compute-0-14-0", "nas-0-0")
    assert table.render() == "VM-HOST         NAS    \ncompute-0-14-0: nas-0-0"


def test_seed_list_host_vm_nas():
    table = Table(["VM-HOST", "NAS", "ZPOOL"])
    table.add("compute-0-0-0", "nas-0-0", "tank")
    table.add("compute-0-14-0", "nas-0-0", "tank")
    assert table.render() == ("VM-HOST         NAS     ZPOOL\n"
                              "compute-0-0-0:  nas-0-0 tank \n"
                              "compute-0-14-0: nas-0-0 tank ")


def test_seed_storagedev_from_rows():
    table = Table(["HOST", "ZVOL", "LVM", "STATUS", "SIZE (GB)", "BLOCK DEV", "IS STARTED",
                   "SYNCED", "TIME"])
    table.add("compute-0-3", "vm-hpcdev-pub03-3-vol", "vm-hpcdev-pub03-3-vol-snap", "snapshot",
              35, "sdd", None, "32/73400320 32", None)
    table.add("compute-0-3", "vm-hpcdev-pub03-1-vol", "vm-hpcdev-pub03-1-vol-snap",
              "snapshot-merge", 36, "sdc", 1, "8950592/73400320 17472", "0:36:36")
    table.add("compute-0-3", "vm-hpcdev-pub03-5-vol", "vm-hpcdev-pub03-5-vol-snap", "linear",
              36, None, None, None, None)
    out = table.render()
    assert normalised(out) == normalised(SEED_STORAGEDEV)
    lines = out.splitlines()
    # columns as wide as their header keep the seed's exact dashes
    assert lines[3].endswith("--------- ---------- ---------------------- -------")
    assert lines[0].endswith("BLOCK DEV IS STARTED SYNCED                 TIME   ")


def test_headers_upper_cased_booleans_and_numbers():
    table = Table(["name", "locked", "progress"], owner=False)
    table.add("vol1", True, 12.5)
    table.add("vol2", False, 0)
    assert table.render().splitlines() == ["NAME LOCKED PROGRESS",
                                           "vol1 True   12.5    ",
                                           "vol2 False  0       "]


def test_zero_and_false_are_not_empty_but_none_and_blank_are():
    table = Table(["a", "b", "c"], owner=False)
    table.add(0, "", None)
    assert table.render().splitlines()[1] == "0 - -"


def test_output_header_no():
    opts = OutputOptions.from_params({"output-header": "no"})
    assert storagemap_table().render(opts).splitlines()[0].startswith("hpcdev-pub03-vol ")


def test_output_col_chooses_and_orders_columns():
    opts = OutputOptions.from_params({"output-col": "state,zvol"})
    lines = storagemap_table().render(opts).splitlines()
    assert lines[0] == "STATE    ZVOL                 "
    assert lines[1] == "mapped   hpcdev-pub03-vol     "


def test_output_col_keeps_the_owner_when_first():
    table = storagemap_table()
    table.add("nas-0-1", "vol1", None, None, None, "unmapped", None)
    opts = OutputOptions.from_params({"output-col": "NAS,zvol"})
    assert table.render(opts).splitlines()[-1] == "nas-0-1: vol1                 "


def test_output_col_unknown_column():
    with pytest.raises(ValidationError, match="unknown output column 'nope'"):
        storagemap_table().render(OutputOptions.from_params({"output-col": "zvol,nope"}))


def test_output_format_json_same_rows_with_owner():
    opts = OutputOptions.from_params({"output-format": "json"})
    data = json.loads(storagemap_table().render(opts))
    assert len(data) == len(SEED_STORAGEMAP_ROWS)
    assert data[1] == {"nas": "nas-0-0", "zvol": "vm-hpcdev-pub03-4-vol", "host": None,
                       "zpool": "tank", "target": None, "state": "unmapped", "time": None}


def test_json_keys_are_lower_case_headers():
    table = Table(["ZVOL", "SIZE (GB)", "IS STARTED"], owner=False)
    table.add("v", 36, 1)
    opts = OutputOptions.from_params({"output-format": "JSON"})
    assert json.loads(table.render(opts)) == [{"zvol": "v", "size (gb)": 36, "is started": 1}]


def test_empty_table_prints_nothing_but_json_prints_a_list():
    table = Table(["A", "B"])
    assert table.render() == ""
    assert json.loads(table.render(OutputOptions(format="json"))) == []


@pytest.mark.parametrize("params, text", [
    ({"output-format": "xml"}, "invalid output-format"),
    ({"output-header": "maybe"}, "invalid output-header value"),
    ({"output-col": " , "}, "at least one column"),
])
def test_bad_output_params(params, text):
    with pytest.raises(ValidationError, match=text):
        OutputOptions.from_params(params)


def test_row_length_is_checked():
    with pytest.raises(ValueError):
        Table(["A", "B"]).add("only one")


def test_render_lines_without_owner_semantics():
    assert render_lines(["X"], [["a:"]], owner=False) == ["X ", "a:"]


@pytest.mark.parametrize("start, now, text", [
    (100.0, 104.9, "0:00:04"),
    (0, 1925, "0:32:05"),
    (0, 90061, "1 day, 1:01:01"),
    (200, 100, "0:00:00"),          # a clock a little ahead on the NAS
    (None, 100, None),
    ("junk", 100, None),
])
def test_elapsed(start, now, text):
    assert elapsed(start, now) == text


def test_transfer_figures_for_operators():
    from imgstorage.frontend.tables import percent, rate, synced
    assert percent(41.6) == "42%" and percent(None) is None and percent(True) is None
    assert rate(512) == "512 B/s" and rate(2_500_000) == "2.5 MB/s" and rate(0) is None
    assert synced("9099712/73400320 17760", 12.0) == "9099712/73400320 17760 (12%)"
    assert synced("32/73400320 32", None) == "32/73400320 32"
    assert synced(None, 50) is None
