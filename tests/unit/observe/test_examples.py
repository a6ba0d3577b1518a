"""The examples for users' own tools (``docs/examples/``): the Prometheus scrape configuration passes
``promtool check config`` (with its alerting rules, ``promtool check rules``) and VictoriaMetrics' own strict check;
every query of the Grafana dashboard and of the rules names only series minicloud exports and runs against a real
VictoriaMetrics (the TSDB the agents run)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from minicloud.observe import names
from minicloud.observe.query import QueryService

EXAMPLES = Path(__file__).resolve().parents[3] / "docs" / "examples"
DASHBOARD = EXAMPLES / "grafana-dashboard.json"
#: Grafana's variables as a dashboard user with "All" selected would send them.
VARIABLES = {"$__rate_interval": "5m", "$node": ".*", "$project": ".*"}


def _ca_pem() -> bytes:
    """A self-signed CA certificate (VictoriaMetrics reads the CA file when it checks the configuration)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "minicloud example CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM)


def _local_copy(tmp_path: Path) -> Path:
    """The example with its /etc/prometheus files in ``tmp_path`` (promtool checks that they exist)."""
    (tmp_path / "minicloud-metrics.token").write_text("mcm_example\n")
    (tmp_path / "minicloud-ca.pem").write_bytes(_ca_pem())
    shutil.copy(EXAMPLES / "minicloud-alerts.yml", tmp_path)
    text = (EXAMPLES / "prometheus.yml").read_text().replace("/etc/prometheus/", f"{tmp_path}/")
    (tmp_path / "prometheus.yml").write_text(text)
    return tmp_path / "prometheus.yml"


def test_the_prometheus_example_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus, scripts/packages-test.txt) is not installed")
    config = _local_copy(tmp_path)
    out = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout and "rules found" in out.stdout  # the rule file was read and checked too
    rules = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "minicloud-alerts.yml")], capture_output=True, text=True, timeout=60
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_the_scrape_configuration_passes_victoriametrics_strict_check(tmp_path):
    """The scrape section is what VictoriaMetrics (``-promscrape.config``) accepts too, field by field."""
    config = yaml.safe_load(_local_copy(tmp_path).read_text())
    scrape_only = tmp_path / "scrape.yml"
    scrape_only.write_text(yaml.safe_dump({"scrape_configs": config["scrape_configs"]}))
    out = subprocess.run(
        ["victoria-metrics", f"-promscrape.config={scrape_only}", "-promscrape.config.dryRun", "-loggerLevel=ERROR"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def _rule_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load((EXAMPLES / "minicloud-alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


_NAME = re.compile(r"\b(minicloud_[a-z0-9_]+)")


def test_the_dashboard_covers_instances_nodes_storage_and_the_api_with_exported_series():
    dash = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Instances", "Nodes", "Storage", "API and control plane"]
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "node", "project"}
    for title, expr in _dashboard_queries() + _rule_queries():
        for name in _NAME.findall(expr):
            base = name.removesuffix("_bucket")
            assert base in names.BY_NAME, f"{title}: {name} is not a series minicloud exports"


async def test_every_dashboard_and_rule_query_runs_against_the_tsdb(victoria):
    service = QueryService(victoria.url, auth=victoria.auth, nocache=True, clock=lambda: victoria.now)
    answered = {}
    try:
        for title, expr in _dashboard_queries() + _rule_queries():
            for var, value in VARIABLES.items():
                expr = expr.replace(var, value)
            result = await service.query_range(expr, start="-10m", end="now", step="30s", project=None)
            answered[title] = result.result
    finally:
        await service.close()
    # the session's series (instance CPU of two projects) come back through the dashboard's own query
    assert answered["CPU (cores)"] != []
