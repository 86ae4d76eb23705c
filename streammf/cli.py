"""The ``streammf`` command line. Reads settings from the environment once and hands plain objects down."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click

from streammf import __version__
from streammf.cli_client import recommend, similar
from streammf.cli_stream import generate, replay_command
from streammf.config import ModelSettings, Settings
from streammf.factors import LossParams
from streammf.learner import LearnerParams
from streammf.logs import configure_logging
from streammf.sgd import SgdParams

# Longer than any refresh should take; released at the end, so it only matters if the command dies.
CLI_LEASE_S = 3600.0


def learner_params(model: ModelSettings) -> LearnerParams:
    loss = LossParams(mode=model.mode, reg=model.reg, reg_bias=model.reg_bias, alpha=model.alpha, w0=model.w0)
    sgd = SgdParams(loss, model.learning_rate, model.bias_learning_rate, model.bias_damping)
    return LearnerParams(sgd, init_std=model.init_std, seed=model.seed)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="streammf")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """streammf: a streaming online matrix-factorisation recommender (Kafka -> SGD -> Redis, WALS refresh)."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
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
    predicted, then learned, through the daemon's own update code on an in-memory store."""
    from streammf.evaluate import evaluate as run_evaluation
    from streammf.ratings import RatingsFormatError, load_ratings
    from streammf.store import MemoryStore

    overrides = {key: value for key, value in {"mode": mode, "factors": factors}.items() if value is not None}
    model = settings.model.model_copy(update=overrides)
    params = learner_params(model)
    try:
        log = load_ratings(file)
    except RatingsFormatError as exc:
        raise click.ClickException(str(exc)) from exc
    store = MemoryStore(model.name, model.mode, model.factors)
    iterations = refresh_iterations if refresh_iterations is not None else settings.refresh.iterations
    report = run_evaluation(log, store, params, batch_size, refresh_every, iterations, progress)
    for line in report.lines():
        click.echo(line)


@cli.command()
@click.pass_obj
def run(settings: Settings) -> None:
    """Run the daemon: consume events from Kafka, learn, keep the factors in Redis fresh.

    Configured entirely by STREAMMF_* environment variables (see README); stops cleanly on SIGTERM/SIGINT.
    """
    from streammf.daemon import run_daemon

    run_daemon(settings, learner_params(settings.model))


@cli.command()
@click.option("--iterations", type=int, default=None, help="Default: STREAMMF_REFRESH__ITERATIONS.")
@click.pass_obj
def refresh(settings: Settings, iterations: int | None) -> None:
    """One WALS refresh of the live model in Redis: snapshot -> WALS -> new version -> pointer flip."""
    from streammf.daemon import open_store, redis_client
    from streammf.refresh import refresh as run_refresh

    params = learner_params(settings.model)
    store = open_store(settings, redis_client(settings), params)
    # The lease keeps this refresh from racing a daemon's: two refreshes tracking one version would each
    # take part of what the stream changed, and the winner would miss the loser's part.
    owner = f"cli:{socket.gethostname()}:{os.getpid()}"
    if not store.hold_refresh_lease(owner, CLI_LEASE_S):
        raise click.ClickException(
            f"the refresh lease is held by {store.refresh_lease_holder()}: a daemon refreshes this model "
            f"every STREAMMF_REFRESH__EVERY_S ({settings.refresh.every_s:g} s); lower that, or stop the "
            "daemons, to refresh now"
        )
    try:
        report = run_refresh(
            store, params.loss, iterations or settings.refresh.iterations, params.init_std, params.seed
        )
    finally:
        store.release_refresh_lease(owner)
    if report.version is None:
        raise click.ClickException("the live version was replaced as the refresh began; run it again")
    state = "published" if report.published else "NOT published (another version won the race)"
    click.echo(
        f"version {report.version} {state}: {report.users} users, {report.items} items, "
        f"objective {report.objective_before:.4g} -> {report.objective_after:.4g} in {report.seconds:.1f} s; "
        f"caught up {report.caught_up_rows} rows the stream changed meanwhile "
        f"(writers paused {report.paused_seconds * 1000:.0f} ms)"
    )


cli.add_command(generate)
cli.add_command(replay_command)
cli.add_command(recommend)
cli.add_command(similar)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
