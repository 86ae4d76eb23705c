"""`streammf recommend` and `streammf similar`: ask a live model from the shell (via `StreamMFClient`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import redis

from streammf.client import StreamMFClient, VersionUnavailableError
from streammf.store import StoreError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MODEL = "default"

_count_option = click.option(
    "-k", "count", default=10, show_default=True, type=click.IntRange(min=1), help="How many items to print."
)
_titles_option = click.option(
    "--titles",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="MovieLens u.item file (id|title|…, latin-1) to print titles next to ids.",
)
# Same environment variables as the daemon's settings (streammf.config), so one environment serves both.
_redis_url_option = click.option(
    "--redis-url",
    envvar="STREAMMF_REDIS__URL",
    default=DEFAULT_REDIS_URL,
    show_default=True,
    show_envvar=True,
)
_model_option = click.option(
    "--model", envvar="STREAMMF_MODEL__NAME", default=DEFAULT_MODEL, show_default=True, show_envvar=True
)


@click.command("recommend")
@click.argument("user")
@_count_option
@_titles_option
@_redis_url_option
@_model_option
def recommend(user: str, count: int, titles: Path | None, redis_url: str, model: str) -> None:
    """Print the top items for USER (items the user has seen are left out)."""
    with _client(redis_url, model) as client:
        results = client.recommend(user, k=count)
    if not results:
        raise click.ClickException(f"no recommendations for user {user!r} in model {model!r} (unknown user?)")
    _print(results, titles)


@click.command("similar")
@click.argument("item")
@_count_option
@_titles_option
@_redis_url_option
@_model_option
def similar(item: str, count: int, titles: Path | None, redis_url: str, model: str) -> None:
    """Print the items most similar to ITEM (cosine similarity of item factors)."""
    with _client(redis_url, model) as client:
        results = client.similar_items(item, k=count)
    if not results:
        raise click.ClickException(f"no similar items for item {item!r} in model {model!r} (unknown item?)")
    _print(results, titles)


@contextmanager
def _client(redis_url: str, model: str) -> Iterator[StreamMFClient]:
    """A client for the command; what can go wrong becomes a one-line error instead of a traceback."""
    try:
        with redis.Redis.from_url(redis_url) as connection:
            yield StreamMFClient(connection, model)
    except (redis.RedisError, StoreError, VersionUnavailableError, ValueError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


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
