"""The `streammf` group's reading of STREAMMF_* variables: a bad one is named in a one-line-per-variable
error and its value (maybe a secret) never printed; and `refresh` failing is an error line, not a traceback.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner, Result

from streammf.cli import cli

SECRET = "hunter2-do-not-print"


def invoke(args: list[str], env: dict[str, str]) -> Result:
    return CliRunner().invoke(cli, args, env=env)


def assert_clean_error(result: Result) -> None:
    """A click error (exit 1 or 2, 'Error: ...'), not an exception escaping the command."""
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Error: " in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("variable", "command"),
    [
        ("STREAMMF_REDIS__PASSWROD", "run"),
        ("STREAMMF_KAFKA__SASL_PLAIN_PASSWRD", "run"),
        ("STREAMMF_REDIS__PASSWROD", "refresh"),
        ("STREAMMF_KAFKA__SASL_PLAIN_PASSWRD", "recommend"),
    ],
)
def test_a_mistyped_secret_is_named_not_printed(variable: str, command: str) -> None:
    result = invoke([command, "alice"] if command == "recommend" else [command], {variable: SECRET})
    assert_clean_error(result)
    assert SECRET not in result.output
    assert f"{variable}: extra inputs are not permitted" in result.output
    assert "input_value" not in result.output


def test_every_bad_variable_is_named_without_its_value() -> None:
    env = {
        "STREAMMF_MODEL__FACTORS": "0",
        "STREAMMF_KAFKA__SECURITY_PROTOCOL": "SASL_" + SECRET,
        "STREAMMF_REDIS__SOCKET_TIMEOUT_S": "not-a-number",
        "STREAMMF_KAFKA__SASL_PLAIN_PASSWORD": SECRET,  # valid: not reported
    }
    result = invoke(["run"], env)
    assert_clean_error(result)
    assert SECRET not in result.output
    assert "not-a-number" not in result.output
    assert "STREAMMF_MODEL__FACTORS: input should be greater than or equal to 1" in result.output
    assert "STREAMMF_KAFKA__SECURITY_PROTOCOL: input should be 'PLAINTEXT'" in result.output
    assert "STREAMMF_REDIS__SOCKET_TIMEOUT_S: input should be a valid number" in result.output
    assert "STREAMMF_KAFKA__SASL_PLAIN_PASSWORD" not in result.output


def test_an_unparsable_section_is_named_without_its_value() -> None:
    result = invoke(["run"], {"STREAMMF_REDIS": '{"password": "' + SECRET})
    assert_clean_error(result)
    assert SECRET not in result.output
    assert "redis" in result.output


def test_an_unknown_log_level_is_an_error_line() -> None:
    result = invoke(["run"], {"STREAMMF_LOG_LEVEL": "chatty"})
    assert_clean_error(result)
    assert "STREAMMF_LOG_LEVEL" in result.output


def test_good_settings_still_reach_the_command() -> None:
    result = invoke(["recommend", "--help"], {"STREAMMF_REDIS__PASSWORD": SECRET})
    assert result.exit_code == 0, result.output
    assert "--redis-url" in result.output and "--model" in result.output


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


def test_refresh_against_an_unreachable_redis_is_one_error_line() -> None:
    env = {"STREAMMF_REDIS__URL": f"redis://127.0.0.1:{_closed_port()}/0", "STREAMMF_REDIS__PASSWORD": SECRET}
    result = invoke(["refresh"], env)
    assert_clean_error(result)
    assert result.output.strip().count("\n") == 0, result.output
    assert "connect" in result.output.lower()
    assert SECRET not in result.output


@pytest.mark.parametrize("command", ["recommend", "similar"])
def test_recommend_and_similar_against_an_unreachable_redis(command: str) -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    result = invoke([command, "x", "--redis-url", url], {"STREAMMF_REDIS__PASSWORD": SECRET})
    assert_clean_error(result)
    assert result.output.strip().count("\n") == 0, result.output
    assert SECRET not in result.output


def test_the_daemon_process_freezes_start_up_objects_collects_young_ones_rarely_and_switches_often():
    """`tune_interpreter` (called by `streammf run`) in a fresh interpreter: the GC state and the switch
    interval are the process's, so not in this one."""
    code = (
        "import gc, sys\n"
        "from streammf.stream.daemon import GC_YOUNG_THRESHOLD, GIL_SWITCH_INTERVAL_S, tune_interpreter\n"
        "assert gc.get_freeze_count() == 0 and gc.get_threshold()[0] < GC_YOUNG_THRESHOLD\n"
        "assert sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S\n"
        "tune_interpreter()\n"
        "print(gc.get_threshold()[0] == GC_YOUNG_THRESHOLD, gc.get_freeze_count(), sys.getswitchinterval())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    at_threshold, frozen, interval = done.stdout.split()
    assert at_threshold == "True" and int(frozen) > 10_000  # modules, numpy, pydantic, numba: far more
    assert abs(float(interval) - 0.0005) < 1e-9


def test_streammf_run_tunes_the_interpreter_before_running_the_daemon(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr("streammf.stream.daemon.tune_interpreter", lambda: calls.append("tune"))
    monkeypatch.setattr("streammf.stream.daemon.run_daemon", lambda *a, **k: calls.append("run"))
    result = CliRunner().invoke(cli, ["run"])
    assert result.exit_code == 0, result.output
    assert calls == ["tune", "run"]


def test_streammf_run_stops_with_a_clear_error_when_the_learner_process_keeps_dying(monkeypatch):
    from streammf.stream.learner_process import LearnerProcessError

    def dies(*args: object, **kwargs: object) -> None:
        raise LearnerProcessError("the learner process died 3 times in a row without finishing a call")

    monkeypatch.setattr("streammf.stream.daemon.tune_interpreter", lambda: None)
    monkeypatch.setattr("streammf.stream.daemon.run_daemon", dies)
    result = CliRunner().invoke(cli, ["run"])
    assert_clean_error(result)
    assert "died 3 times in a row" in result.output
