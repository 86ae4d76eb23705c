"""The `generate` and `replay` commands: feed the pipeline with synthetic events or a rating log.

Registered on the main group in `streammf.cli`; the group's context object is the `Settings`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import click

from streammf.config import Settings
from streammf.tools.generate import SyntheticStream

F = TypeVar("F", bound=Callable[..., Any])
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def synthetic_options(command: F) -> F:
    """The synthetic world's options, shared by `generate` and `replay --synthetic`."""
    options = [
        click.option(
            "--mode", type=click.Choice(["explicit", "implicit"]), help="Default: STREAMMF_MODEL__MODE."
        ),
        click.option("--users", type=click.IntRange(min=1), default=1000, show_default=True),
        click.option("--items", type=click.IntRange(min=1), default=500, show_default=True),
        click.option("--k-true", type=click.IntRange(min=1), default=8, show_default=True, help="True rank."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--poison-rate",
            type=click.FloatRange(0.0, 1.0),
            default=0.0,
            show_default=True,
            help="Share of records replaced by invalid payloads (fault tests).",
        ),
        click.option(
            "--fixed-clock",
            is_flag=True,
            help="Timestamps from a synthetic clock (reproducible) instead of the time each event is made.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _stream(
    settings: Settings,
    mode: str | None,
    users: int,
    items: int,
    k_true: int,
    seed: int,
    poison_rate: float,
    fixed_clock: bool,
) -> SyntheticStream:
    # Oversized poison must exceed the consumer's record limit to be rejected as oversized.
    return SyntheticStream(
        mode or settings.model.mode,  # type: ignore[arg-type]  # click.Choice guarantees the literal
        users,
        items,
        k_true,
        seed,
        poison_rate=poison_rate,
        oversized_bytes=max(16_384, 2 * settings.kafka.max_record_bytes),
        # Now-stamped by default, so freshness and event age mean what they say in demos and benches.
        clock=None if fixed_clock else time.time,
    )


@click.command()
@click.option("--events", "-n", type=click.IntRange(min=0), default=10_000, show_default=True)
@synthetic_options
@click.option("--output", "-o", type=click.File("wb"), default="-", help="Default: stdout.")
@click.pass_obj
def generate(
    settings: Settings,
    events: int,
    mode: str | None,
    users: int,
    items: int,
    k_true: int,
    seed: int,
    poison_rate: float,
    fixed_clock: bool,
    output: BinaryIO,
) -> None:
    """Print synthetic events as JSON lines (one record value per line; with --poison-rate some lines are
    deliberately invalid). Same options and seed, same events; with --fixed-clock, the same bytes."""
    stream = _stream(settings, mode, users, items, k_true, seed, poison_rate, fixed_clock)
    for _key, value in stream.records(events):
        output.write(value + b"\n")


@click.command("replay")
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--synthetic", type=click.IntRange(min=0), help="Replay N events of the built-in generator.")
@synthetic_options
@click.option("--topic", help="Default: STREAMMF_KAFKA__TOPIC.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Events per second (default: max).")
@click.option(
    "--partitions", type=click.IntRange(min=1), help="Create the topic with this many partitions if missing."
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_obj
def replay_command(
    settings: Settings,
    file: Path | None,
    synthetic: int | None,
    mode: str | None,
    users: int,
    items: int,
    k_true: int,
    seed: int,
    poison_rate: float,
    fixed_clock: bool,
    topic: str | None,
    rate: float | None,
    partitions: int | None,
    progress: bool,
) -> None:
    """Send events to Kafka, keyed by user id. FILE is a MovieLens rating log (u.data, ratings.dat,
    ratings.csv, replayed in time order with its timestamps) or JSON lines from `generate` (*.jsonl,
    *.ndjson, *.json, sent unchanged); or use --synthetic N instead of FILE."""
    from streammf.stream.clients import KafkaClientMissingError, replay_producer
    from streammf.tools.ratings import RatingsFormatError, load_ratings
    from streammf.tools.replay import ensure_topic, jsonl_records, ratings_records, replay

    if (file is None) == (synthetic is None):
        raise click.UsageError("give either FILE or --synthetic N")
    topic = topic or settings.kafka.topic

    records: Iterable[tuple[bytes, bytes]]
    total: int | None
    if synthetic is not None:
        stream = _stream(settings, mode, users, items, k_true, seed, poison_rate, fixed_clock)
        records, total = stream.records(synthetic), synthetic
    elif file is not None and file.suffix.lower() in JSONL_SUFFIXES:
        records, total = jsonl_records(file), None
    else:
        assert file is not None
        try:
            log = load_ratings(file)
        except RatingsFormatError as exc:
            raise click.ClickException(str(exc)) from exc
        records, total = ratings_records(log), len(log)

    try:
        producer = replay_producer(settings.kafka)
    except KafkaClientMissingError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        if partitions is not None:
            existing = ensure_topic(settings.kafka, topic, partitions)
            if existing != partitions:
                click.echo(
                    f"topic {topic} already exists with {existing} partitions (not {partitions})", err=True
                )
        # A full collection scanning the start-up objects (modules, pydantic, the client) took up to
        # ~110 ms, five times in a 10 s replay: pauses a fixed rate cannot make up (see TokenBucket).
        # Frozen for the replay, they are not scanned.
        gc.freeze()
        try:
            report = replay(records, producer, topic, rate, progress, total=total)
        finally:
            gc.unfreeze()
    finally:
        producer.close(timeout=30)
    for line in report.lines():
        click.echo(line)
    if report.failed:
        raise click.exceptions.Exit(1)
