"""The one settings model. Only the CLI entry point reads the environment; everything below it takes
plain arguments (or one of these frozen sections).

Environment: prefix ``STREAMMF_``, nested sections with ``__``, e.g. ``STREAMMF_KAFKA__BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "streammf.events"
    group_id: str = "streammf"
    client_id: str = "streammf"
    # Passed through to kafka-python unchanged; secrets never logged.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    max_poll_records: int = Field(500, ge=1)
    poll_timeout_ms: int = Field(200, ge=1)
    max_record_bytes: int = Field(4096, ge=64)
    # How soon a crashed replica's partitions move to a live one (the broker's minimum is 6 s).
    session_timeout_ms: int = Field(10000, ge=1000)

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.topic}.dlq"


class RedisSettings(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    password: SecretStr | None = None
    socket_timeout_s: float = Field(5.0, gt=0)


class ModelSettings(_Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    mode: Literal["explicit", "implicit"] = "explicit"
    factors: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(0.01, gt=0)
    bias_learning_rate: float = Field(0.04, gt=0)
    bias_damping: float = Field(5.0, gt=0)
    reg: float = Field(0.05, ge=0)
    reg_bias: float = Field(0.02, ge=0)
    # Implicit mode: confidence w = 1 + alpha * strength; unobserved entries pulled to 0 with weight w0.
    alpha: float = Field(10.0, ge=0)
    w0: float = Field(1.0, ge=0)
    init_std: float = Field(0.01, ge=0)
    seed: int = 42


class RefreshSettings(_Section):
    every_s: float = Field(3600.0, gt=0)
    iterations: int = Field(5, ge=1)


class MetricsSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(9108, ge=0, le=65535)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMMF_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    model: ModelSettings = ModelSettings()
    refresh: RefreshSettings = RefreshSettings()
    metrics: MetricsSettings = MetricsSettings()
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
