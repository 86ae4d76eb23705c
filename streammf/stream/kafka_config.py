"""Our `KafkaSettings` as keyword arguments of kafka-python's clients (producer, consumer, admin).

The connection and security part only: every key here is accepted by `KafkaProducer`, `KafkaConsumer` and
`KafkaAdminClient` alike (they reject unknown keys), so each caller adds its own role-specific options.
The returned dict holds the SASL password in clear text: pass it straight to the client, never log it.
"""

from __future__ import annotations

from typing import Any

from streammf.config import KafkaSettings


def bootstrap_list(bootstrap_servers: str) -> list[str]:
    """'a:9092, b:9092' -> ['a:9092', 'b:9092'] (the env var holds one comma-separated string)."""
    return [server.strip() for server in bootstrap_servers.split(",") if server.strip()]


def client_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """Connection and security kwargs for any kafka-python client; options left unset (None) are omitted
    so kafka-python keeps its own defaults."""
    password = kafka.sasl_plain_password.get_secret_value() if kafka.sasl_plain_password is not None else None
    candidates: dict[str, Any] = {
        "bootstrap_servers": bootstrap_list(kafka.bootstrap_servers),
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
        "sasl_mechanism": kafka.sasl_mechanism,
        "sasl_plain_username": kafka.sasl_plain_username,
        "sasl_plain_password": password,
        "ssl_cafile": kafka.ssl_cafile,
        "ssl_certfile": kafka.ssl_certfile,
        "ssl_keyfile": kafka.ssl_keyfile,
    }
    connection = {
        # kafka-python backs reconnects off up to 30 s by default: after a broker outage the daemon would
        # sit idle that long after the broker is back. One second is cheap and recovers in seconds.
        "reconnect_backoff_max_ms": 1000,
    }
    return connection | {key: value for key, value in candidates.items() if value is not None}
