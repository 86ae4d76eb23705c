"""deploy/docker-compose.yml against the Compose Specification's JSON schema (no Docker engine here, so
`docker compose config` cannot run), plus what the schema cannot know: the promised Redis settings, the
services, the job profile, mounted files that exist, and a Prometheus config promtool accepts."""

from __future__ import annotations

import hashlib
import json

import jsonschema
import yaml

from tests.deploy.tools import DEPLOY, run, tool

COMPOSE = DEPLOY / "docker-compose.yml"
SCHEMA = DEPLOY / "compose-spec" / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"  # see SOURCE.md


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_schema_is_the_recorded_upstream_copy():
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256


def test_compose_file_is_valid_under_the_compose_specification():
    schema = json.loads(SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(_compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_schema_check_rejects_a_broken_file():
    """The check can fail: an unknown service key and a bad depends_on condition are errors."""
    schema = json.loads(SCHEMA.read_text())
    broken = _compose()
    broken["services"]["streammf"]["restart_policy"] = "always"
    broken["services"]["streammf"]["depends_on"]["redis"]["condition"] = "service_ready"
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert len(list(validator.iter_errors(broken))) >= 1


def test_stack_has_every_part_and_redis_is_durable_and_never_evicts():
    services = _compose()["services"]
    assert {"kafka", "redis", "streammf", "replay", "prometheus", "grafana"} <= services.keys()
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    redis_args = services["redis"]["command"]
    settings = dict(zip(redis_args[1::2], redis_args[2::2], strict=True))
    assert settings["--appendonly"] == "yes"
    assert settings["--appendfsync"] == "everysec"
    # The default (64mb) rewrites the AOF every few seconds under a steady stream: latency tails.
    assert settings["--auto-aof-rewrite-min-size"] == "1gb"
    assert settings["--maxmemory-policy"] == "noeviction"
    assert services["replay"]["profiles"] == ["replay"]  # a job, not started by `up`
    daemon = services["streammf"]
    assert daemon["read_only"] is True and "/tmp" in daemon["tmpfs"]


def test_mounted_files_exist_and_prometheus_config_is_valid():
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    run(tool("promtool"), "check", "config", DEPLOY / "prometheus" / "prometheus.yml")
