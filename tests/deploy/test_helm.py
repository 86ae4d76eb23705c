"""The Helm chart: `helm lint`, and `helm template` rendered and parsed — kinds, probes, non-root with a
read-only root and an emptyDir for the numba cache, credentials only in the Secret, the PrometheusRule
carrying the same rules as deploy/prometheus/alerts.yml, and the replicas <= partitions guard."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.tools import DEPLOY, run, tool

CHART = DEPLOY / "helm" / "streammf"
WITH_MONITORING = ["--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true"]


def _render(*args: str) -> dict[str, dict[str, Any]]:
    """kind -> manifest of `helm template`; every document must parse as YAML."""
    output = run(tool("helm"), "template", "rel", CHART, *args).stdout
    documents = [doc for doc in yaml.safe_load_all(output) if doc]
    kinds = [doc["kind"] for doc in documents]
    assert len(kinds) == len(set(kinds)), kinds
    return {doc["kind"]: doc for doc in documents}


def _render_fails(*args: str) -> str:
    result = subprocess.run(
        [tool("helm"), "template", "rel", str(CHART), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0, "helm template accepted invalid values"
    return result.stderr


def test_chart_lints_with_and_without_the_monitoring_objects():
    run(tool("helm"), "lint", "--strict", CHART)
    run(tool("helm"), "lint", "--strict", CHART, *WITH_MONITORING)


def test_default_render_has_the_workload_and_no_operator_objects():
    assert set(_render()) == {"ConfigMap", "Secret", "Service", "Deployment"}
    assert {"ServiceMonitor", "PrometheusRule"} <= set(_render(*WITH_MONITORING))


def test_deployment_runs_non_root_read_only_with_separate_liveness_and_readiness():
    deployment = _render()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert mount["name"] == volume["name"] and "emptyDir" in volume
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["NUMBA_CACHE_DIR"].startswith(mount["mountPath"] + "/")  # writable despite the read-only root
    assert deployment["spec"]["replicas"] == 1


def test_settings_in_the_configmap_credentials_only_in_the_secret():
    rendered = _render(
        "--set", "credentials.redisPassword=s3cret", "--set", "credentials.kafkaPassword=k4fka",
        "--set", "kafka.securityProtocol=SASL_SSL",
    )  # fmt: skip
    config = rendered["ConfigMap"]["data"]
    assert config["STREAMMF_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    assert config["STREAMMF_METRICS__PORT"] == "9108"
    assert "s3cret" not in yaml.safe_dump(config) and "k4fka" not in yaml.safe_dump(config)
    secret = rendered["Secret"]["stringData"]
    assert secret == {"STREAMMF_REDIS__PASSWORD": "s3cret", "STREAMMF_KAFKA__SASL_PLAIN_PASSWORD": "k4fka"}
    env_from = rendered["Deployment"]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert {"configMapRef", "secretRef"} == {key for source in env_from for key in source}


def test_an_existing_secret_replaces_the_charts_own():
    rendered = _render("--set", "credentials.existingSecret=prod-credentials")
    assert "Secret" not in rendered
    env_from = rendered["Deployment"]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert {"name": "prod-credentials", "optional": True} in [s.get("secretRef") for s in env_from]


def test_prometheus_rule_renders_the_same_alert_rules():
    rule = _render(*WITH_MONITORING)["PrometheusRule"]
    assert rule["spec"] == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    monitor = _render(*WITH_MONITORING)["ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert "streammf" in _render()["Service"]["metadata"]["name"]  # the job name the rules select


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "replicaCount=5", "--set", "kafka.partitions=4"], "exceeds kafka.partitions"),
        (["--set", "model.mode=bogus"], "model/mode"),
        (["--set", "redis.url=http://redis"], "redis/url"),
    ],
)
def test_invalid_values_are_refused(values: list[str], message: str):
    assert message in _render_fails(*values)
