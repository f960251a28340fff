"""The shipped Prometheus artefacts (config/fleet/prometheus*.yml, rules.yml): promtool checks
and unit tests, then a real site Prometheus scraping three running daemons and evaluating the
rules, federated into a real central Prometheus."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import yaml

from tests.fleet.fleet import FLEET_CONFIG, Fleet, wait_until
from tests.fleet.prometheus import Prometheus, binary

RULES = FLEET_CONFIG / "rules.yml"


def _promtool(*args: str) -> None:
    result = subprocess.run([binary("promtool"), *args], check=False, cwd=FLEET_CONFIG, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_pass_promtool_check_and_their_unit_tests() -> None:
    """rules.test.yml shows every alert firing for one series and silent for a near miss."""
    _promtool("check", "rules", "rules.yml")
    _promtool("test", "rules", "rules.test.yml")
    _promtool("check", "config", "prometheus.yml")
    _promtool("check", "config", "prometheus-central.yml")


def _site_config(fleet: Fleet) -> dict:
    """prometheus.yml with the fleet's daemons as targets (one group per box, `site` as shipped)
    and intervals of a second, so that the test takes seconds."""
    config = yaml.safe_load((FLEET_CONFIG / "prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    assert len(job["static_configs"]) == len(fleet.sites)
    job["scrape_timeout"] = "1s"
    for group, site in zip(job["static_configs"], fleet.sites):
        group["targets"] = [f"127.0.0.1:{site.metrics_port}"]
        group["labels"] = {"site": site.name}
    return config


def _central_config(site: Prometheus) -> dict:
    config = yaml.safe_load((FLEET_CONFIG / "prometheus-central.yml").read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{site.port}"]}]
    return config


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with closing(Fleet(tmp_path / "fleet", consumers_count=1)) as running:
        running.start()
        running.start_daemons()
        wait_until(lambda: all(site.metrics_port for site in running.sites), 30, lambda: "metrics endpoints not serving")
        yield running


def test_a_site_prometheus_scrapes_every_daemon_and_the_centre_federates_it(fleet: Fleet, tmp_path: Path) -> None:
    site_prometheus = Prometheus(tmp_path / "site-prometheus", _site_config(fleet))
    central = Prometheus(tmp_path / "central-prometheus", _central_config(site_prometheus))
    site_prometheus.start()
    central.start()
    sites = {site.name for site in fleet.sites}
    try:
        # Every daemon's series arrive centrally, through the site Prometheus, with their site.
        central.wait(lambda: {r["metric"]["site"] for r in central.query('up{job="asd-monitor"} == 1')} == sites,
                     30, "every daemon up at the centre")
        scored = central.query('asd_machine_state{state=~"normal|alert"} == 1')
        assert {r["metric"]["site"] for r in scored} == sites
        # The recording rules are evaluated at the site and federated.
        central.wait(lambda: {r["metric"]["site"]: float(r["value"][1])
                              for r in central.query("site:asd_machines_monitored:sum")} == dict.fromkeys(sites, 1.0),
                     20, "site:asd_machines_monitored:sum of every site at the centre")
        rules = [rule for group in site_prometheus.api("rules")["groups"] for rule in group["rules"]]
        assert len(rules) == 11 and all(rule["health"] == "ok" for rule in rules), rules
        # A daemon dies: its target goes down and AsdDaemonDown is pending (for: 5m) at the site,
        # and the centre sees it through federation.
        dead = fleet.sites[0]
        dead.kill_daemon()
        site_prometheus.wait(lambda: any(a["labels"]["alertname"] == "AsdDaemonDown" and a["labels"]["site"] == dead.name
                                         and a["state"] == "pending" for a in site_prometheus.api("alerts")["alerts"]),
                             20, "AsdDaemonDown pending for the killed daemon")
        central.wait(lambda: [r["metric"]["site"] for r in central.query('ALERTS{alertname="AsdDaemonDown"}')] == [dead.name],
                     20, "AsdDaemonDown of the killed daemon at the centre")
        assert {r["metric"]["site"] for r in central.query('up{job="asd-monitor"} == 1')} == sites - {dead.name}
    finally:
        central.stop()
        site_prometheus.stop()
