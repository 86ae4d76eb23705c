"""`streammf recommend` and `streammf similar`: ask a live model from the shell (via `StreamMFClient`).

Both connect as the daemon does (`streammf.store.connect.redis_client`: STREAMMF_REDIS__URL, __PASSWORD,
__SOCKET_TIMEOUT_S) to the model STREAMMF_MODEL__NAME; `--redis-url` and `--model` override those two.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import redis

from streammf.client import DamagedRowError, StreamMFClient, VersionUnavailableError
from streammf.config import Settings
from streammf.store.contract import StoreError

_count_option = click.option(
    "-k", "count", default=10, show_default=True, type=click.IntRange(min=1), help="How many items to print."
)
_titles_option = click.option(
    "--titles",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="MovieLens u.item file (id|title|…, latin-1) to print titles next to ids.",
)
# Overrides of the settings (streammf.config) the daemon reads too, so one environment serves both; the
# password and timeouts come from the settings alone.
_redis_url_option = click.option(
    "--redis-url", metavar="URL", help="Overrides STREAMMF_REDIS__URL (default redis://127.0.0.1:6379/0)."
)
_model_option = click.option(
    "--model", metavar="NAME", help="Overrides STREAMMF_MODEL__NAME (default 'default')."
)


@click.command("recommend")
@click.argument("user")
@_count_option
@_titles_option
@_redis_url_option
@_model_option
@click.pass_context
def recommend(
    ctx: click.Context, user: str, count: int, titles: Path | None, redis_url: str | None, model: str | None
) -> None:
    """Print the top items for USER (items the user has seen are left out)."""
    settings = _settings(ctx, redis_url, model)
    name = settings.model.name
    with _client(settings) as client:
        results = client.recommend(user, k=count)
        if not results:
            why = (
                "unknown user"
                if client.user_vector(user) is None
                else "the user has seen every item, or the model has no usable items"
            )
            raise click.ClickException(f"no recommendations for user {user!r} in model {name!r}: {why}")
    _print(results, titles)


@click.command("similar")
@click.argument("item")
@_count_option
@_titles_option
@_redis_url_option
@_model_option
@click.pass_context
def similar(
    ctx: click.Context, item: str, count: int, titles: Path | None, redis_url: str | None, model: str | None
) -> None:
    """Print the items most similar to ITEM (cosine similarity of item factors)."""
    settings = _settings(ctx, redis_url, model)
    name = settings.model.name
    with _client(settings) as client:
        results = client.similar_items(item, k=count)
        if not results:
            why = "unknown item" if not client.item_vectors([item]) else "the model has no other usable items"
            raise click.ClickException(f"no similar items for item {item!r} in model {name!r}: {why}")
    _print(results, titles)


def _settings(ctx: click.Context, redis_url: str | None, model: str | None) -> Settings:
    """The `streammf` group's settings (read here when the command runs on its own), with the overrides."""
    settings = ctx.find_object(Settings)
    if settings is None:
        from streammf.cli import load_settings  # the group's reader; imported here: streammf.cli imports us

        settings = load_settings()
    update: dict[str, object] = {}
    if redis_url is not None:
        update["redis"] = settings.redis.model_copy(update={"url": redis_url})
    if model is not None:
        update["model"] = settings.model.model_copy(update={"name": model})
    return settings.model_copy(update=update)


@contextmanager
def _client(settings: Settings) -> Iterator[StreamMFClient]:
    """A client for the command; what can go wrong becomes a one-line error instead of a traceback."""
    from streammf.store.connect import redis_client

    try:
        with redis_client(settings) as connection:
            yield StreamMFClient(
                connection, settings.model.name, fallback_below_events=settings.model.fallback_below_events
            )
    except (redis.RedisError, StoreError, VersionUnavailableError, ValueError) as exc:
        raise click.ClickException(failure_message(exc)) from exc


def failure_message(exc: Exception) -> str:
    """One line for an expected failure of a command that reads or writes a model in Redis.

    Never shows the Redis URL or password (the messages of redis-py and of the store name hosts and keys).
    """
    if isinstance(exc, DamagedRowError):
        return f"{exc}; run `streammf refresh` to rebuild it"
    text = " ".join(str(exc).split())  # one line, whatever the message
    if isinstance(exc, redis.AuthenticationError):
        return (
            f"{type(exc).__name__}: Redis refused the connection ({text}); check STREAMMF_REDIS__PASSWORD "
            "(or the credentials in the Redis URL)"
        )
    return f"{type(exc).__name__}: {text}"


def _print(results: list[tuple[str, float]], titles: Path | None) -> None:
    names = read_titles(titles) if titles else {}
    for item, score in results:
        title = names.get(item)
        click.echo(f"{item}\t{score:.4f}" + (f"\t{title}" if title is not None else ""))


def read_titles(path: Path) -> dict[str, str]:
    """item id -> title from a MovieLens 100k u.item file."""
    names: dict[str, str] = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        fields = line.split("|")
        if len(fields) >= 2:
            names[fields[0]] = fields[1]
    return names
