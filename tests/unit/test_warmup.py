"""`streammf warmup` leaves every cached numba kernel in the cache, so a daemon started on that cache (the
container image, the demo) compiles nothing before its first event or its first refresh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from numba.core.registry import CPUDispatcher

from streammf.model import objective, sgd, wals


def _cached_kernels() -> set[str]:
    """`module.function` of every `@njit(cache=True)` kernel that is compiled on its own (not inlined)."""
    found = set()
    for module in (sgd, wals, objective):
        for name, value in vars(module).items():
            if (
                isinstance(value, CPUDispatcher)
                and value.__module__ == module.__name__
                and type(value._cache).__name__ == "FunctionCache"
                and value.targetoptions.get("inline") != "always"
            ):
                found.add(f"{module.__name__.rpartition('.')[2]}.{name}")
    return found


def test_warmup_caches_every_kernel(tmp_path: Path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "streammf.cli", "warmup"], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "kernels compiled and cached" in result.stdout
    # numba names an index file <module>.<function>-<line>.py<ver>.nbi
    cached = {path.name.partition("-")[0] for path in tmp_path.rglob("*.nbi")}
    expected = _cached_kernels()
    assert {"sgd._sgd_kernel", "wals._cholesky_rows_kernel", "wals._cg_rows_kernel"} <= expected
    assert expected <= cached, f"kernels the warm-up does not compile: {sorted(expected - cached)}"
