"""Benchmark streammf's WALS against implicit's CPU ALS on one identical implicit-feedback problem.

    python bench/bench_wals.py [--users 100000 --items 20000 --nnz 1800000 --factors 64
                                --iterations 5 --threads 2] [--small]

Both solve  Σ_obs w_ij (1 − p_ij)² + 1·Σ_unobs p_ij² + λ(‖U‖² + ‖V‖²)  with w_ij = 1 + α·s_ij:

* implicit 0.7 forms its confidence as ``alpha * data`` (``Cui = self.alpha * Cui``) and pulls unobserved
  entries to 0 with weight 1. It is given data = w_ij (our weights) and alpha = 1, constant λ.
* streammf gets w0 = 1 and λ_i = λ for every row (a constant vector instead of weighted-λ).

Same random initial factors, same thread count (numba threads = implicit ``num_threads``; BLAS limited
to 1 thread for implicit, as it requires, and to ``--threads`` for streammf, which only uses BLAS for the
k×k Gramian). Every contender runs in a fresh process, so peak memory is its own and JIT compilation
(or loading numba's cache) is done by a warm-up on a tiny matrix, reported separately. Seconds per
iteration is the median over iterations; the objective is streammf's `objective` on each result.
Figures only: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CONTENDERS = ("implicit cg", "implicit cholesky", "streammf cg", "streammf cholesky")


def make_synthetic(
    n_users: int, n_items: int, n_events: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, strengths) of ``n_events`` events; duplicates later sum into one entry.

    Item popularity is Zipf-like (p ∝ 1/(rank + 10)^0.9, ranks shuffled over ids so popular items are
    not adjacent), user activity log-normal (σ = 1, at least one event), event strengths 1 + Poisson(0.5).
    """
    rng = np.random.default_rng(seed)
    ranks = np.arange(n_items, dtype=np.float64)
    popularity = 1.0 / (ranks + 10.0) ** 0.9
    popularity = popularity[rng.permutation(n_items)]
    popularity /= popularity.sum()
    activity = rng.lognormal(mean=0.0, sigma=1.0, size=n_users)
    per_user = np.maximum(1, np.round(activity / activity.sum() * n_events)).astype(np.int64)
    users = np.repeat(np.arange(n_users, dtype=np.int64), per_user)
    items = rng.choice(n_items, size=users.size, p=popularity)
    strengths = 1.0 + rng.poisson(0.5, size=users.size)
    return users, items, strengths


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_contender(name: str, data_file: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Warm up, then time ``settings['iterations']`` iterations of one solver (in its own process)."""
    import numba
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    from streammf.model.factors import DTYPE, Factors, LossParams
    from streammf.model.interactions import Interactions
    from streammf.model.objective import objective

    threads, iterations, reg = settings["threads"], settings["iterations"], settings["reg"]
    numba.set_num_threads(threads)
    stored = np.load(data_file)
    shape = (int(stored["shape"][0]), int(stored["shape"][1]))
    targets = sp.csr_matrix((stored["strengths"], stored["indices"], stored["indptr"]), shape=shape)
    interactions = Interactions(targets, stored["weights"], "implicit")
    init_user, init_item = stored["init_user"], stored["init_item"]
    params = LossParams("implicit", reg=reg, alpha=settings["alpha"], w0=1.0)
    user_reg = np.full(shape[0], reg)
    item_reg = np.full(shape[1], reg)

    def score(user: np.ndarray, item: np.ndarray) -> float:
        zeros_u, zeros_i = np.zeros(shape[0], DTYPE), np.zeros(shape[1], DTYPE)
        return objective(interactions, Factors(user, item, zeros_u, zeros_i), params, user_reg, item_reg)

    durations: list[float] = []
    trace: list[float] = []
    tiny = sp.random(60, 40, density=0.2, format="csr", dtype=np.float32, random_state=0)
    tiny.data[:] = 1.0

    if name.startswith("implicit"):
        from implicit.cpu.als import AlternatingLeastSquares

        # implicit's confidence is alpha·data: hand it w_ij itself with alpha = 1.
        confidences = sp.csr_matrix((interactions.weights, targets.indices, targets.indptr), shape=shape)

        def model(n_iterations: int) -> AlternatingLeastSquares:
            return AlternatingLeastSquares(
                factors=init_user.shape[1],
                regularization=reg,
                alpha=1.0,
                use_cg=name.endswith("cg"),
                iterations=n_iterations,
                num_threads=threads,
                random_state=0,
            )

        with threadpool_limits(1, "blas"):
            started = time.perf_counter()
            model(1).fit(tiny, show_progress=False)
            warmup = time.perf_counter() - started
            baseline_rss = _peak_rss_mb()  # after the warm-up: count the solve, not library start-up

            als = model(iterations)
            als.user_factors = init_user.copy()
            als.item_factors = init_item.copy()

            def on_iteration(iteration: int, elapsed: float, loss: float | None) -> None:
                durations.append(elapsed)  # implicit times the two half-steps, not this callback
                trace.append(score(als.user_factors, als.item_factors))

            als.fit(confidences, show_progress=False, callback=on_iteration)
    else:
        from streammf.model import wals as streammf_wals

        solver = "cg" if name.endswith("cg") else "cholesky"
        with threadpool_limits(threads, "blas"):
            tiny_interactions = Interactions.from_coo(*tiny.nonzero(), np.ones(tiny.nnz), tiny.shape, params)
            tiny_factors = Factors(
                np.full((60, init_user.shape[1]), 0.01, DTYPE),
                np.full((40, init_user.shape[1]), 0.01, DTYPE),
                np.zeros(60, DTYPE),
                np.zeros(40, DTYPE),
            )
            started = time.perf_counter()
            streammf_wals.wals(tiny_interactions, tiny_factors, params, 1, solver=solver)
            warmup = time.perf_counter() - started
            baseline_rss = _peak_rss_mb()  # after the warm-up: count the solve, not numba's start-up

            _ = interactions.transposed  # implicit transposes inside fit, outside its per-iteration timer
            factors = Factors(
                init_user.copy(), init_item.copy(), np.zeros(shape[0], DTYPE), np.zeros(shape[1], DTYPE)
            )
            mark = time.perf_counter()

            def on_iteration(iteration: int, current: Factors) -> None:
                nonlocal mark
                durations.append(time.perf_counter() - mark)
                trace.append(score(current.user, current.item))
                mark = time.perf_counter()  # the objective above is not part of the iteration

            streammf_wals.wals(
                interactions, factors, params, iterations, user_reg, item_reg, on_iteration, solver=solver
            )

    initial_objective = score(init_user, init_item)
    return {
        "name": name,
        "warmup_s": warmup,
        "median_s": statistics.median(durations),
        "durations": durations,
        "initial_objective": initial_objective,
        "trace": trace,
        "extra_rss_mb": max(0.0, _peak_rss_mb() - baseline_rss),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=1_800_000, help="events drawn; duplicates merge")
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reg", type=float, default=0.1, help="constant λ for both libraries")
    parser.add_argument("--alpha", type=float, default=10.0, help="confidence w = 1 + alpha·strength")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="quick run: 10k × 2k, 150k events, k = 32")
    parser.add_argument("--repeat", type=int, default=1, help="round-robin runs; the best median is kept")
    parser.add_argument("--only", choices=CONTENDERS, action="append", help="run only these (repeatable)")
    args = parser.parse_args(argv)
    if args.small:
        args.users, args.items, args.nnz, args.factors = 10_000, 2_000, 150_000, 32

    from streammf.model.factors import DTYPE, LossParams
    from streammf.model.interactions import Interactions

    started = time.perf_counter()
    users, items, strengths = make_synthetic(args.users, args.items, args.nnz, args.seed)
    params = LossParams("implicit", reg=args.reg, alpha=args.alpha, w0=1.0)
    interactions = Interactions.from_coo(users, items, strengths, (args.users, args.items), params)
    rng = np.random.default_rng(args.seed + 1)
    # implicit's own initialisation: uniform [0, 0.01).
    init_user = (rng.random((args.users, args.factors)) * 0.01).astype(DTYPE)
    init_item = (rng.random((args.items, args.factors)) * 0.01).astype(DTYPE)
    counts = interactions.row_counts()
    print(
        f"data: {args.users} users × {args.items} items, {interactions.nnz} entries "
        f"(from {users.size} events; per user median {int(np.median(counts))}, max {counts.max()}; "
        f"per item max {interactions.col_counts().max()}), k = {args.factors}, λ = {args.reg}, "
        f"α = {args.alpha}, w0 = 1, threads = {args.threads}, built in {time.perf_counter() - started:.1f} s"
    )
    settings = {"threads": args.threads, "iterations": args.iterations, "reg": args.reg, "alpha": args.alpha}
    results: dict[str, dict[str, Any]] = {}
    medians: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        data_file = str(Path(scratch) / "problem.npz")
        np.savez(
            data_file,
            shape=np.array(interactions.shape),
            indptr=interactions.targets.indptr,
            indices=interactions.targets.indices,
            strengths=interactions.targets.data,
            weights=interactions.weights,
            init_user=init_user,
            init_item=init_item,
        )
        spawn = multiprocessing.get_context("spawn")
        # Round-robin repeats, best median kept: on a shared machine the slowest figures measure the
        # neighbours, and interleaving spreads their load over all contenders alike.
        for repeat in range(args.repeat):
            for name in args.only or CONTENDERS:
                with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                    result = pool.submit(run_contender, name, data_file, settings).result()
                medians.setdefault(name, []).append(result["median_s"])
                if name not in results or result["median_s"] < results[name]["median_s"]:
                    results[name] = result
                print(
                    f"  [{repeat + 1}/{args.repeat}] {name:<18} median {result['median_s']:.3f} s/iter "
                    f"(iterations: {', '.join(f'{d:.2f}' for d in result['durations'])})",
                    flush=True,
                )

    reference = results.get("implicit cg")
    print()
    print(
        f"{'solver':<18} {'s/iter':>8} {'vs impl.cg':>10} {'warm-up s':>9} "
        f"{'final objective':>16} {'vs impl.cg':>10} {'peak +MB':>9}  all medians (s/iter)"
    )
    for name, result in results.items():
        time_ratio = f"{result['median_s'] / reference['median_s']:.2f}x" if reference else "-"
        objective_ratio = f"{result['trace'][-1] / reference['trace'][-1]:.5f}" if reference else "-"
        print(
            f"{name:<18} {result['median_s']:>8.3f} {time_ratio:>10} {result['warmup_s']:>9.2f} "
            f"{result['trace'][-1]:>16.2f} {objective_ratio:>10} {result['extra_rss_mb']:>9.0f}  "
            + ", ".join(f"{m:.3f}" for m in medians[name])
        )
    print()
    print(
        f"objective after each iteration (initial: {next(iter(results.values()))['initial_objective']:.2f}):"
    )
    for name, result in results.items():
        print(f"  {name:<18} " + "  ".join(f"{value:.2f}" for value in result["trace"]))


if __name__ == "__main__":
    sys.exit(main())
