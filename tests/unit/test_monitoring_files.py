"""The shipped dashboard and alert rules against what the daemons really export.

The exported names come from registries filled the way the daemons fill
them (tests/unit/metrics_sample.py), not from a list kept beside this test.
promtool (Debian's prometheus package, installed by ``scripts/bootstrap
--test``) checks the rules, tests when each alert fires, and lints a scrape.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest
import yaml

from ..promtool import find_promtool
from .metrics_sample import family_names, nas_metrics, sample_names, vm_metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "contrib" / "grafana" / "imgstorage.json"
ALERTS = ROOT / "contrib" / "prometheus" / "imgstorage-alerts.yml"
ALERT_TESTS = ROOT / "tests" / "fixtures" / "prometheus" / "alerts_test.yml"
README = ROOT / "README.rst"
PROMETHEUS_OWN = {"up"}          # series Prometheus makes for every target

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> Set[str]:
    """The metric names a PromQL expression reads (Grafana's ``$variables`` allowed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)            # strings
    text = re.sub(r"\{[^{}]*\}", "", text)                       # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                       # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for found in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        before = text[found.start() - 1] if found.start() else " "
        if before.isdigit() or before in ".$":
            continue                                             # 1e3, 5m, $__interval
        if text[found.end():].lstrip().startswith("("):
            continue                                             # a function
        if found.group(0).lower() in _KEYWORDS:
            continue
        names.add(found.group(0))
    return names


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Dict[str, Set[str]]:
    with nas_metrics(tmp_path_factory.mktemp("nas")) as (nas, _service):
        vm = vm_metrics()
        return {"samples": sample_names(nas.registry, vm.registry),
                "families": family_names(nas.registry, vm.registry)}


def promtool() -> str:
    found = find_promtool()
    assert found, ("promtool not found: `scripts/bootstrap --test` (which scripts/test runs) "
                   "takes it out of Debian's prometheus package into the virtualenv")
    return found


# ------------------------------------------------------------ the dashboard
def panels(dashboard: Dict) -> Iterator[Dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: Dict) -> Iterator[tuple]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert found, (variable["name"], query)
            yield f"variable {variable['name']}", found.group(1)


def test_every_dashboard_query_reads_metrics_the_daemons_export(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(dashboard_queries(dashboard))
    assert len(queries) > 20
    for where, expr in queries:
        names = metric_names(expr)
        assert names, (where, expr)
        unknown = names - exported["samples"] - PROMETHEUS_OWN
        assert not unknown, f"{where}: {expr} reads {sorted(unknown)}, which no daemon exports"


def test_the_dashboard_shows_what_an_operator_asked_for():
    dashboard = json.loads(DASHBOARD.read_text())
    kinds = {p["type"] for p in panels(dashboard)}
    assert {"timeseries", "heatmap", "stat"} <= kinds
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["targets"] and panel.get("gridPos") and panel.get("description")
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    every = " ".join(expr for _where, expr in dashboard_queries(dashboard))
    for wanted in ("imgstorage_zvol_state{",                          # disks by state
                   "imgstorage_zvol_recovery_point_age_seconds",       # recovery points
                   "imgstorage_zvol_transfer_rate_bytes_per_second",   # transfer rates
                   'outcome!="success"'):                              # request errors
        assert wanted in every, wanted
    heatmaps = [p for p in panels(dashboard) if p["type"] == "heatmap"]
    assert heatmaps and all("imgstorage_phase_duration_seconds_bucket" in t["expr"]
                            and t.get("format") == "heatmap"
                            for p in heatmaps for t in p["targets"])


# ------------------------------------------------------------ the alert rules
def alert_rules() -> List[Dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_reads_metrics_the_daemons_export(exported):
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {"ImgstorageRecoveryPointStale",
                                           "ImgstorageTransferFailing", "ImgstorageZvolStuck",
                                           "ImgstorageDaemonDown"}
    for rule in rules:
        names = metric_names(rule["expr"])
        unknown = names - exported["samples"] - PROMETHEUS_OWN
        assert names and not unknown, (rule["alert"], sorted(unknown))


def test_promtool_accepts_the_alert_rules():
    proc = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout


def test_each_alert_fires_where_it_should_and_only_there():
    proc = subprocess.run([promtool(), "test", "rules", ALERT_TESTS.name], capture_output=True,
                          text=True, timeout=120, cwd=ALERT_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested == {r["alert"] for r in alert_rules()}


# ------------------------------------------------------------ a scrape
def test_promtool_finds_nothing_to_say_about_what_a_daemon_serves(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with nas_metrics(tmp_path) as (metrics, _service):
        metrics.listen(port)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as got:
                text = got.read()
        finally:
            metrics.close()
    assert b"imgstorage_zvol_recovery_point_age_seconds{" in text
    proc = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                          timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.stdout.decode() + proc.stderr.decode())
    vm = subprocess.run([promtool(), "check", "metrics"], input=vm_metrics().exposition(),
                        capture_output=True, timeout=120)
    assert vm.returncode == 0 and not vm.stdout.strip() and not vm.stderr.strip(), (
        vm.stdout.decode() + vm.stderr.decode())


# ------------------------------------------------------------ the manual
def readme_metrics() -> Set[str]:
    """The metric names README.rst's Monitoring section lists in its table."""
    text = README.read_text()
    section = text[text.index("\nMonitoring\n"):]
    section = section[:section.index("\nBenchmarks\n")]
    return set(re.findall(r"^``(imgstorage_\w+)``", section, re.M))


def test_the_readme_lists_exactly_the_exported_metrics(exported):
    assert readme_metrics() == exported["families"]
