"""The one settings model. Only the CLI entry point reads the environment; everything below it takes
plain arguments (or one of these frozen sections).

Environment: prefix ``STREAMMF_``, nested sections with ``__``, e.g. ``STREAMMF_KAFKA__BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    # kafka-python (the default), or confluent-kafka (librdkafka: `pip install 'streammf[confluent]'`),
    # which parses fetched records in C: more events/s from the same loop (README, "Throughput").
    client: Literal["kafka-python", "confluent"] = "kafka-python"
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "streammf.stream.events"
    group_id: str = "streammf"
    client_id: str = "streammf"
    # Passed through to the client unchanged (librdkafka's names for confluent); secrets never logged.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # Upper bound of a batch: under a backlog polls fill it (fewer Redis calls and less per-batch work per
    # event, and users and items repeat more within a batch, so fewer rows are written per event: Redis
    # time per event about -30% at 10,000 against 2,000 in streammf bench); idle, a poll returns what has
    # arrived, so batches stay small and latency low.
    max_poll_records: int = Field(10_000, ge=1)
    poll_timeout_ms: int = Field(200, ge=1)
    max_record_bytes: int = Field(4096, ge=64)
    # How soon a crashed replica's partitions move to a live one (the broker's minimum is 6 s).
    session_timeout_ms: int = Field(10000, ge=1000)

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.topic}.dlq"


class RedisSettings(_Section):
    # One Redis server, or any node of a Redis Cluster (found out by asking it).
    url: str = "redis://127.0.0.1:6379/0"
    # A new model is split into this many shards (streammf.store.shards); an existing one keeps its own.
    shards: int = Field(1, ge=1, le=1024)
    password: SecretStr | None = None
    socket_timeout_s: float = Field(5.0, gt=0)
    # Refused by default: a policy that may evict our keys silently deletes parts of the model.
    allow_eviction: bool = False
    # A writer keeps a copy of the users it wrote (rows and interactions; streammf.store.user_cache), so a
    # batch reads only users it has not seen: at most this many interactions (16-byte slots, at most half
    # of them used), 0 for none.
    user_cache_pairs: int = Field(3_000_000, ge=0)  # user_cache.DEFAULT_USER_CACHE_PAIRS


# Default input bounds per mode: (value_min, value_max, weight_max). Explicit values are ratings (any
# common scale: 1-5 stars, 1-10, -1/+1 likes); implicit values are strengths (clicks, counts, seconds).
MODE_BOUNDS: dict[str, tuple[float, float, float]] = {
    "explicit": (-10.0, 10.0, 100.0),
    "implicit": (0.0, 10_000.0, 1_000.0),
}


# The factor learning rate when STREAMMF_MODEL__LEARNING_RATE is unset, per mode: explicit SGD takes plain
# gradient steps and needs a large one to grow factors from their init in one pass; implicit mode's
# proximal steps are stiff (confidence weights, the Gramian) and do best small. bench/quality.py measured
# both (README, "Figures").
MODE_LEARNING_RATE: dict[str, float] = {"explicit": 0.15, "implicit": 0.01}


class ModelSettings(_Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    mode: Literal["explicit", "implicit"] = "explicit"
    factors: int = Field(32, ge=1, le=1024)
    learning_rate: float | None = Field(None, gt=0)  # None: the mode's (MODE_LEARNING_RATE)
    bias_learning_rate: float = Field(0.02, ge=0)
    reg: float = Field(0.05, ge=0)
    # Count-independent priors on every row with observations, in both solvers: λ_b·b² on its bias (λ_b
    # pseudo-ratings of zero in each bias's mean) and λ_0·‖u‖² on its factors (on top of λ·n·‖u‖²).
    reg_bias: float = Field(5.0, ge=0)
    reg_prior: float = Field(5.0, ge=0)
    # Implicit mode: confidence w = 1 + alpha * strength; unobserved entries pulled to 0 with weight w0.
    alpha: float = Field(10.0, ge=0)
    w0: float = Field(10.0, ge=0)
    init_std: float = Field(0.1, ge=0)
    # Cold start: users with fewer interactions than this (0 for an unknown user) are served the item
    # popularity decayed with this half-life, counted in events (streammf.model.popularity).
    popularity_half_life_events: float = Field(2000.0, gt=0)
    fallback_below_events: int = Field(1, ge=0)
    seed: int = 42
    # Input bounds: an event outside them is dead-lettered (`out_of_range`) before it reaches the model.
    # None takes the mode's default (MODE_BOUNDS): ratings in explicit mode, strengths in implicit mode.
    value_min: float | None = None
    value_max: float | None = None
    weight_max: float | None = Field(None, ge=0)
    # A computed row with a coordinate (factor or bias) beyond this, or not finite, is never written: the
    # event that caused it is dead-lettered (`diverged`) and the rest of its batch applies.
    max_abs_factor: float = Field(100.0, gt=0)

    @property
    def factor_learning_rate(self) -> float:
        """`learning_rate`, or the mode's default when it is unset."""
        return MODE_LEARNING_RATE[self.mode] if self.learning_rate is None else self.learning_rate

    @property
    def bounds(self) -> tuple[float, float, float]:
        """(value_min, value_max, weight_max) with the mode's defaults filled in."""
        value_min, value_max, weight_max = MODE_BOUNDS[self.mode]
        return (
            value_min if self.value_min is None else self.value_min,
            value_max if self.value_max is None else self.value_max,
            weight_max if self.weight_max is None else self.weight_max,
        )

    @model_validator(mode="after")
    def _bounds_make_sense(self) -> ModelSettings:
        value_min, value_max, _ = self.bounds
        if not value_min < value_max:
            raise ValueError(f"value_min ({value_min}) must be below value_max ({value_max})")
        if self.mode == "implicit" and value_min < 0:
            # A negative strength lowers a confidence below what the solver can take (non-SPD systems).
            raise ValueError("implicit mode needs value_min >= 0 (strengths are not negative)")
        return self


class RefreshSettings(_Section):
    every_s: float = Field(3600.0, gt=0)
    # Also refresh once this many events were applied since the last published refresh (None: clock only).
    every_events: int | None = Field(None, ge=1)
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
