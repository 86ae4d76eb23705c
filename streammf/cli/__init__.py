"""The ``streammf`` command line. Reads settings from the environment once and hands plain objects down."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click

from streammf import __version__
from streammf.cli.read import recommend, similar
from streammf.cli.stream import generate, replay_command
from streammf.config import Settings
from streammf.logs import configure_logging
from streammf.stream.learner import LearnerParams

# Longer than any refresh should take; released at the end, so it only matters if the command dies.
CLI_LEASE_S = 3600.0


def load_settings() -> Settings:
    """`Settings()` from the environment. A bad variable becomes an error naming it and what is wrong, never
    its value: that may be a secret (pydantic's own message would print a mistyped
    STREAMMF_REDIS__PASSWROD, an extra field of a section that forbids them, with its value)."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    try:
        return Settings()
    except ValidationError as exc:
        problems = [
            f"{_variable(error['loc'])}: {error['msg'][:1].lower()}{error['msg'][1:]}"
            for error in exc.errors(include_input=False, include_url=False)
        ]
        message = "invalid STREAMMF_* settings:\n  " + "\n  ".join(problems)
    except SettingsError as exc:  # a section given as JSON that does not parse; the message names the field
        message = f"invalid STREAMMF_* settings: {exc}"
    raise click.ClickException(message)  # outside the except: no chained exception carrying the input


def _variable(loc: tuple[int | str, ...]) -> str:
    """The environment variable of a settings field: ('redis', 'password') -> STREAMMF_REDIS__PASSWORD."""
    return "STREAMMF_" + ("__".join(str(part) for part in loc).upper() if loc else "*")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="streammf")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """streammf: a streaming online matrix-factorisation recommender (Kafka -> SGD -> Redis, WALS refresh)."""
    settings = load_settings()
    try:
        configure_logging(settings.log_level, settings.log_format)
    except ValueError:  # logging's "Unknown level"
        raise click.ClickException(
            "STREAMMF_LOG_LEVEL: not a logging level (use DEBUG, INFO, WARNING, ERROR or CRITICAL)"
        ) from None
    ctx.obj = settings


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--mode", type=click.Choice(["explicit", "implicit"]), help="Overrides STREAMMF_MODEL__MODE.")
@click.option("--factors", "-k", type=int, help="Overrides STREAMMF_MODEL__FACTORS.")
@click.option("--batch-size", type=int, default=500, show_default=True)
@click.option("--refresh-every", type=int, default=0, show_default=True, help="WALS refresh every N events.")
@click.option("--refresh-iterations", type=int, default=None, help="Default: STREAMMF_REFRESH__ITERATIONS.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_obj
def evaluate(
    settings: Settings,
    file: Path,
    mode: str | None,
    factors: int | None,
    batch_size: int,
    refresh_every: int,
    refresh_iterations: int | None,
    progress: bool,
) -> None:
    """Prequential evaluation of a rating log (MovieLens u.data, ratings.dat, ratings.csv): every event is
    scored with the model after every earlier event, then learned, through the daemon's own update code on
    an in-memory store. Explicit: RMSE and MAE beside the mean of earlier ratings. Implicit: recall@10 and
    NDCG@10 on all / warm / cold events beside popularity under the same rules."""
    from streammf.store.memory import MemoryStore
    from streammf.tools.evaluate import evaluate as run_evaluation
    from streammf.tools.ratings import RatingsFormatError, load_ratings

    overrides = {key: value for key, value in {"mode": mode, "factors": factors}.items() if value is not None}
    model = settings.model.model_copy(update=overrides)
    params = LearnerParams.from_settings(model)
    try:
        log = load_ratings(file)
    except RatingsFormatError as exc:
        raise click.ClickException(str(exc)) from exc
    store = MemoryStore(model.name, model.mode, model.factors)
    iterations = refresh_iterations if refresh_iterations is not None else settings.refresh.iterations
    report = run_evaluation(
        log,
        store,
        params,
        batch_size,
        refresh_every,
        iterations,
        progress,
        popularity_half_life=model.popularity_half_life_events,
        min_user_events=model.fallback_below_events,
    )
    for line in report.lines():
        click.echo(line)


@cli.command()
@click.option(
    "--rebuild",
    is_flag=True,
    help="If the store lost state it had (Redis restarted empty, FLUSHALL, evicted keys), delete what is "
    "left of the model and learn it again from the earliest offsets Kafka retains, instead of refusing. "
    "Stop every other replica first.",
)
@click.pass_obj
def run(settings: Settings, rebuild: bool) -> None:
    """Run the daemon: consume events from Kafka, learn, keep the factors in Redis fresh.

    Configured entirely by STREAMMF_* environment variables (see README); stops cleanly on SIGTERM/SIGINT.
    Exits with status 3 when the store lost state (see --rebuild) or may evict the model's keys.
    """
    from streammf.store.contract import StoreLostStateError, StoreUnsafeError
    from streammf.stream.clients import KafkaClientMissingError
    from streammf.stream.daemon import run_daemon, tune_interpreter
    from streammf.stream.learner_process import LearnerProcessError

    tune_interpreter()
    try:
        run_daemon(settings, LearnerParams.from_settings(settings.model), rebuild=rebuild)
    except (KafkaClientMissingError, LearnerProcessError) as exc:
        raise click.ClickException(str(exc)) from None
    except StoreLostStateError as exc:
        click.echo(
            f"Error: the store lost state: {exc}. Refusing to go on; to rebuild the model from the earliest "
            "offsets Kafka retains, stop every replica and run `streammf run --rebuild`.",
            err=True,
        )
        raise SystemExit(3) from None
    except StoreUnsafeError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(3) from None


@cli.command()
def warmup() -> None:
    """Compile the numba kernels into numba's cache (NUMBA_CACHE_DIR), so that a daemon started later
    neither waits for them before its first event nor before its first refresh. Image build, demo."""
    from streammf.tools.warmup import warm_up

    click.echo(f"kernels compiled and cached in {warm_up():.1f} s")


@cli.command()
@click.option("--iterations", type=int, default=None, help="Default: STREAMMF_REFRESH__ITERATIONS.")
@click.pass_obj
def refresh(settings: Settings, iterations: int | None) -> None:
    """One WALS refresh of the live model in Redis: snapshot -> WALS -> new version -> pointer flip."""
    import redis

    from streammf.cli.read import failure_message
    from streammf.model.factors import NonFiniteFactorsError
    from streammf.store.connect import redis_client
    from streammf.store.contract import StoreError
    from streammf.store.redis_store import ModelMismatchError
    from streammf.stream.daemon import attach_store
    from streammf.stream.refresh import RefreshLeaseHeldError, refresh_with_lease

    params = LearnerParams.from_settings(settings.model)
    owner = f"cli:{socket.gethostname()}:{os.getpid()}"
    # Expected failures are one line; anything else is a bug and keeps its traceback.
    try:
        with redis_client(settings) as client:
            store = attach_store(settings, client)
            report = refresh_with_lease(
                store, params, iterations or settings.refresh.iterations, owner, CLI_LEASE_S
            )
    except RefreshLeaseHeldError as exc:
        raise click.ClickException(
            f"{exc}: a daemon refreshes this model every STREAMMF_REFRESH__EVERY_S "
            f"({settings.refresh.every_s:g} s); lower that, or stop the daemons, to refresh now"
        ) from exc
    except ModelMismatchError as exc:
        raise click.ClickException(
            f"{exc} (STREAMMF_MODEL__MODE and STREAMMF_MODEL__FACTORS must match the stored model)"
        ) from exc
    except NonFiniteFactorsError as exc:
        raise click.ClickException(
            f"refresh failed, nothing published: WALS produced non-finite factors ({exc}); stored rows "
            "may be damaged, or the regularisation (STREAMMF_MODEL__REG, __REG_BIAS) too weak for this data"
        ) from exc
    except (redis.RedisError, StoreError, ValueError) as exc:
        raise click.ClickException(f"refresh failed: {failure_message(exc)}") from exc
    if report.version is None:
        raise click.ClickException("the live version was replaced as the refresh began; run it again")
    state = "published" if report.published else "NOT published (another version won the race)"
    click.echo(
        f"version {report.version} {state}: {report.users} users, {report.items} items, "
        f"objective {report.objective_before:.4g} -> {report.objective_after:.4g} in {report.seconds:.1f} s; "
        f"caught up {report.caught_up_rows} rows the stream changed meanwhile "
        f"(writers paused {report.paused_seconds * 1000:.0f} ms)"
    )


@cli.command()
@click.option(
    "--events", "-n", type=click.IntRange(min=100), default=200_000, show_default=True, help="Backlog size."
)
@click.option("--offered-rate", type=click.FloatRange(min=1), default=20_000, show_default=True)
@click.option("--live-seconds", type=click.FloatRange(min=1), default=10, show_default=True)
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    help="Partitions of the bench topic.  [default: --replicas]",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1, max=64),
    default=1,
    show_default=True,
    help="Daemons sharing the topic's partitions in one consumer group.",
)
@click.option(
    "--mode", type=click.Choice(["explicit", "implicit", "both"]), default="both", show_default=True
)
@click.option("--factors", "-k", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--shards",
    type=click.IntRange(min=1, max=1024),
    default=1,
    show_default=True,
    help="Split the model in this many shards (STREAMMF_REDIS__SHARDS of the daemon under test). Above 1, "
    "each mode first runs with 1 shard on the same Redis as the reference (see --no-reference).",
)
@click.option(
    "--reference/--no-reference",
    default=True,
    show_default=True,
    help="With --shards above 1: also run each mode with 1 shard first, and give each server's Redis "
    "time per event as a share of that run's total.",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write JSON here."
)
@click.pass_obj
def bench(
    settings: Settings,
    events: int,
    offered_rate: float,
    live_seconds: float,
    partitions: int | None,
    replicas: int,
    mode: str,
    factors: int,
    shards: int,
    reference: bool,
    json_path: Path | None,
) -> None:
    """Measure the pipeline on the configured Kafka and Redis (the local stack by default): raw consume
    rate of the daemon's Kafka client, the daemon's end-to-end rate from a backlog, Redis server time
    per event, update latency and freshness at a fixed offered rate. Prints a table; --json writes it.

    Redis server time is measured on each primary when STREAMMF_REDIS__URL names a Redis Cluster. With
    --shards N (N > 1) each mode runs twice on that same Redis: with 1 shard (the whole model on one
    primary: the single-node reference), then with N; a second table gives each primary's time per
    event and, in brackets, its share of the 1-shard total. On a cluster of N primaries, shares near
    1/N say the load splits evenly over them.

    With --replicas N, N daemons share the topic's partitions (at least N) in one consumer group; their
    rate counts from when every one of them has applied a batch."""
    from streammf.tools.bench import BenchPlan, run_bench, table, write_json

    modes = ("explicit", "implicit") if mode == "both" else (mode,)
    try:
        plan = BenchPlan(
            events, offered_rate, live_seconds, partitions or replicas, modes, factors, shards, reference,
            replicas,
        )  # fmt: skip
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    runs = run_bench(settings, plan, say=lambda line: click.echo(f"bench: {line}", err=True))
    for line in table(runs):
        click.echo(line)
    if json_path is not None:
        write_json(json_path, runs, plan)
        click.echo(f"bench: wrote {json_path}", err=True)


@cli.command("forget-user")
@click.argument("user")
@click.pass_obj
def forget_user(settings: Settings, user: str) -> None:
    """Delete USER from the live model, atomically: their row in every version, their interactions, their
    share of item counts and statistics. Idempotent. To keep it in order with the user's events, produce
    {"user_id": USER, "event_type": "forget_user"} to the topic instead (keyed by the user)."""
    import redis

    from streammf.cli.read import failure_message
    from streammf.store.connect import redis_client
    from streammf.store.contract import ApplyOutcome, StoreError
    from streammf.stream.daemon import attach_store
    from streammf.stream.learner import Learner, VersionChurnError

    try:
        with redis_client(settings) as client:
            learner = Learner(attach_store(settings, client), LearnerParams.from_settings(settings.model))
            outcome = learner.forget_user(user)  # waits out a refresh's hand-over, if one is under way
    except (redis.RedisError, StoreError, ValueError, VersionChurnError) as exc:
        raise click.ClickException(f"forget-user failed: {failure_message(exc)}") from exc
    if outcome is not ApplyOutcome.APPLIED:
        raise click.ClickException(f"forget-user failed: the store answered {outcome.value}; run it again")
    click.echo(f"user {user!r} forgotten in model {settings.model.name!r}")


cli.add_command(generate)
cli.add_command(replay_command)
cli.add_command(recommend)
cli.add_command(similar)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
