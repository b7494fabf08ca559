"""The alert rules of deploy/prometheus/blkserve-alerts.yml, exercised with
`promtool test rules` (tests/prometheus/blkserve-alerts.test.yml): every
alert fires on a synthetic series that breaks its condition, with its
labels and rendered annotations, only after its `for:`, and stays quiet on
a healthy series evaluated alongside."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "deploy" / "prometheus" / "blkserve-alerts.yml"
RULE_TESTS = HERE / "prometheus" / "blkserve-alerts.test.yml"
PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (Debian package prometheus)")
def test_every_alert_fires_on_a_bad_series_and_not_on_a_healthy_one():
    p = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout, p.stdout


def test_the_rule_tests_cover_every_alert():
    alerts = set(re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M))
    tested = set(re.findall(r"^\s*alertname: (\w+)", RULE_TESTS.read_text(), re.M))
    assert len(alerts) >= 6 and alerts == tested, (alerts, tested)
