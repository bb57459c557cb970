"""The operations files in docker/: alert rules, Prometheus config, Grafana dashboard.

promtool (Debian's `prometheus` package, installed by .ci/run) checks the rules
and the config and runs the rules' own unit tests (alerts_test.yml), so a rule
that no longer fires on the series it is meant for fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.metrics import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "appointment-consumer.json"
README = (ROOT / "README.md").read_text()

# Metrics that the rules and dashboard read but this process does not export:
# RabbitMQ's own (rabbitmq_prometheus), Prometheus's `up`, and the practice
# status gauge that the practices work (issue 14) defines.
EXTERNAL = {"up", "rabbitmq_detailed_queue_messages_ready"}
DEFINED_ELSEWHERE = {"appt_practice_status"}


def _promtool(*args: str) -> str:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus (.ci/run does it)"
    done = subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}


def _exported_names() -> set[str]:
    """Every series name the process can export, also for labelled metrics not yet used."""
    return {metric.name + suffix for metric in REGISTRY.collect() for suffix in SUFFIXES[metric.type]}


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:appt|rabbitmq)_[a-z_]+|up)\b(?=\s*[{\[)])", expr))


def test_promtool_accepts_the_rules_and_the_config() -> None:
    assert "SUCCESS: 7 rules found" in _promtool("check", "rules", "alerts.yml")
    _promtool("check", "config", "prometheus.yml")


def test_each_alert_fires_on_its_series_and_not_before() -> None:
    _promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_a_runbook_line_in_the_readme() -> None:
    section = README.split("### Alerts and runbook", 1)[1].split("\n#", 1)[0]
    for rule in _alerts():
        assert f"`{rule['alert']}`" in section, rule["alert"]


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_rules_and_dashboard_read_only_metrics_that_exist(source: str) -> None:
    if source == "alerts":
        exprs = [rule["expr"] for rule in _alerts()]
    else:
        panels = json.loads(DASHBOARD.read_text())["panels"]
        exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    used = set().union(*(_metric_names(expr) for expr in exprs))
    assert used, exprs
    unknown = used - _exported_names() - EXTERNAL - DEFINED_ELSEWHERE
    assert not unknown, f"{source} read metrics nobody exports: {sorted(unknown)}"


def test_compose_wires_prometheus_and_grafana_to_these_files() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())["services"]
    assert "./prometheus:/etc/prometheus:ro" in compose["prometheus"]["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in compose["grafana"]["volumes"]
    plugins = (ROOT / "docker" / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_prometheus" in plugins
