"""The Prometheus alert rules: valid (promtool check rules), each one unit-tested (promtool test rules), and
the files Compose and the chart use are what the generator writes."""

from __future__ import annotations

import subprocess
import sys

import yaml

from tests.deploy.tools import DEPLOY, observability, run, tool

RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
CHART_RULES = DEPLOY / "helm" / "streammf" / "files" / "alerts.yml"


def test_generated_files_are_up_to_date():
    generator = DEPLOY / "observability" / "generate.py"
    result = subprocess.run([sys.executable, generator, "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_rules_are_valid():
    output = run(tool("promtool"), "check", "rules", RULES, CHART_RULES).stdout
    assert output.count("SUCCESS") == 2


def test_every_alert_fires_in_a_promtool_unit_test():
    run(tool("promtool"), "test", "rules", RULE_TESTS)
    groups = yaml.safe_load(RULES.read_text())["groups"]
    names = {rule["alert"] for group in groups for rule in group["rules"]}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert names == fired, f"alerts without a firing test: {sorted(names - fired)}"
    assert names == quiet, f"alerts without a not-firing case: {sorted(names - quiet)}"


def test_each_alert_signal_is_part_of_its_condition():
    """The PromQL test checks the signals on live data; they must be what the condition compares."""
    module = observability()
    rendered = {
        rule["alert"]: rule["expr"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }
    for alert in module.ALERTS:
        assert alert.signals, alert.name
        for signal in alert.signals:
            assert signal in rendered[alert.name]
