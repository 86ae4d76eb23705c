"""The container image's files: the Dockerfile passes hadolint and keeps the properties deploy/README.md
promises; the entry point seeds the writable numba cache from the warmed one and execs streammf.

No Docker engine runs here, so the image is not built by the tests (see deploy/README.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.deploy.tools import REPO, run, tool

DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "deploy" / "docker" / "entrypoint.sh"


def test_dockerfile_passes_hadolint():
    run(tool("hadolint"), "--failure-threshold", "info", DOCKERFILE)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in joined.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_is_multi_stage_non_root_exec_form_and_warms_the_kernels():
    instructions = _instructions()
    stages = [args for op, args in instructions if op == "FROM"]
    assert len(stages) == 2 and " AS build" in stages[0]
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    user = [args for op, args in final if op == "USER"]
    assert user and not user[-1].startswith(("root", "0")), user
    entrypoint = [args for op, args in final if op == "ENTRYPOINT"]
    assert entrypoint and isinstance(json.loads(entrypoint[-1]), list)  # exec form: signals reach PID 1
    assert any(op == "HEALTHCHECK" and "/healthz" in args for op, args in final)
    warmup = [i for i, (op, args) in enumerate(final) if op == "RUN" and "streammf warmup" in args]
    copy_venv = [i for i, (op, args) in enumerate(final) if op == "COPY" and "/opt/streammf" in args]
    assert warmup and copy_venv and warmup[0] > copy_venv[0]  # compiled where the sources finally live
    env = " ".join(args for op, args in final if op == "ENV")
    assert "NUMBA_CACHE_DIR=/tmp/numba-cache" in env


def test_entrypoint_seeds_the_writable_cache_then_execs_streammf(tmp_path: Path):
    seed = tmp_path / "seed" / "model_0123"
    seed.mkdir(parents=True)
    (seed / "kernel.nbi").write_bytes(b"index")
    cache = tmp_path / "writable"
    env = dict(
        os.environ,
        STREAMMF_NUMBA_CACHE_SEED=str(seed.parent),
        NUMBA_CACHE_DIR=str(cache),
    )
    shell = shutil.which("sh")
    assert shell is not None
    result = subprocess.run([shell, ENTRYPOINT, "--version"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("streammf")  # it ran streammf with the container's arguments
    assert (cache / "model_0123" / "kernel.nbi").read_bytes() == b"index"
    (cache / "model_0123" / "kernel.nbi").write_bytes(b"updated by numba")
    subprocess.run([shell, ENTRYPOINT, "--version"], env=env, check=True, capture_output=True)
    assert (cache / "model_0123" / "kernel.nbi").read_bytes() == b"updated by numba"  # seeded only once
