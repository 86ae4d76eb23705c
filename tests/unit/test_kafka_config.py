"""`client_kwargs`: our Kafka settings as kwargs every kafka-python client accepts."""

from __future__ import annotations

from pydantic import SecretStr

from streammf.config import KafkaSettings
from streammf.stream.kafka_config import client_kwargs


def test_defaults_give_plaintext_connection_only() -> None:
    assert client_kwargs(KafkaSettings()) == {
        "bootstrap_servers": ["127.0.0.1:9092"],
        "client_id": "streammf",
        "security_protocol": "PLAINTEXT",
        "reconnect_backoff_max_ms": 1000,
    }


def test_every_client_accepts_the_kwargs() -> None:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    for client in (KafkaAdminClient, KafkaConsumer, KafkaProducer):
        assert set(client_kwargs(KafkaSettings())) <= set(client.DEFAULT_CONFIG), client.__name__


def test_security_settings_pass_through_with_the_secret_revealed() -> None:
    settings = KafkaSettings(
        bootstrap_servers="b1:9093, b2:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username="svc",
        sasl_plain_password=SecretStr("hunter2"),
        ssl_cafile="/etc/ca.pem",
        ssl_certfile="/etc/cert.pem",
        ssl_keyfile="/etc/key.pem",
    )
    kwargs = client_kwargs(settings)
    assert kwargs["bootstrap_servers"] == ["b1:9093", "b2:9093"]
    assert kwargs["sasl_plain_password"] == "hunter2"
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert (kwargs["ssl_cafile"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (
        "/etc/ca.pem",
        "/etc/cert.pem",
        "/etc/key.pem",
    )
    # The settings object itself still hides it (what logs and reprs show).
    assert "hunter2" not in repr(settings)


def test_every_key_is_accepted_by_all_three_clients() -> None:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    settings = KafkaSettings(
        sasl_mechanism="PLAIN",
        sasl_plain_username="u",
        sasl_plain_password=SecretStr("p"),
        ssl_cafile="a",
        ssl_certfile="b",
        ssl_keyfile="c",
    )
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(client_kwargs(settings)) <= set(client.DEFAULT_CONFIG), client.__name__
