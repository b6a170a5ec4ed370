"""An agent part's params are checked against its function's signature before anything runs:
`scanflow validate` and `scanflow agents start` refuse a typo with exit 2 and the spec path,
instead of an agent whose every tick fails with a TypeError."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scanflow.cli.main import app as cli_app
from scanflow.control import backends
from scanflow.settings import Settings

PARTS = '''
def big(obs, ctx, min_n):
    return obs.evidence.get("n", 0) >= min_n

def note(obs, ctx, *, path, mode="a"):
    return {}

def anything(obs, ctx, **options):
    return options

def no_ctx():
    return []
'''

SPEC = '''
app: demo
team: ops
services:
  svc: {model: m}
agents:
  monitor:
    role: monitor
    service: svc
    sensors:
      - name: windows
        func: prediction_window
        params: {SENSOR_PARAMS}
        trigger: {interval: 1}
        rule: {func: "parts:big", params: {RULE_PARAMS}}
        actuators:
          - {func: send, params: {to: receiver, kind: window, extra_is_fine: 1}}
          - {func: "parts:note", params: {NOTE_PARAMS}}
          - {func: "parts:anything", params: {whatever: 1, you: 2}}
'''


def write(tmp_path: Path, sensor: str = "window_size: 4", rule: str = "min_n: 4",
          note: str = "path: out.txt", parts: str = PARTS) -> Path:
    d = tmp_path / "app"
    d.mkdir(exist_ok=True)
    (d / "parts.py").write_text(textwrap.dedent(parts))
    (d / "scanflow.yaml").write_text(SPEC.replace("SENSOR_PARAMS", sensor).replace(
        "RULE_PARAMS", rule).replace("NOTE_PARAMS", note))
    return d


def cli(settings: Settings, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli_app, ["--workspace", str(settings.root), *args])
    assert "Traceback" not in res.output
    return res.exit_code, " ".join(res.output.split())  # unwrapped: rich wraps at 80 columns


def test_good_params_and_kwargs_pass(tmp_path: Path, settings: Settings) -> None:
    code, out = cli(settings, "validate", str(write(tmp_path)))
    assert code == 0, out


@pytest.mark.parametrize("change, path, message", [
    ({"sensor": "windowsize: 4"}, "agents.monitor.sensors[0].params.windowsize",
     "unknown param 'windowsize' of scanflow.agents.builtin:prediction_window "
     "(accepts: window_size, settle_s, service); did you mean 'window_size'?"),
    ({"rule": "min_n: 4, min: 4"}, "agents.monitor.sensors[0].rule.params.min",
     "unknown param 'min' of parts:big"),
    ({"rule": ""}, "agents.monitor.sensors[0].rule.params.min_n",
     "required param 'min_n' of parts:big is missing (accepts: min_n)"),
    ({"note": "mode: w"}, "agents.monitor.sensors[0].actuators[1].params.path",
     "required param 'path' of parts:note is missing (accepts: path, mode)"),
    ({"note": "path: x, fmt: csv"}, "agents.monitor.sensors[0].actuators[1].params.fmt",
     "unknown param 'fmt' of parts:note (accepts: path, mode)"),
])
def test_a_param_the_function_refuses_is_exit_2_with_its_path(
        tmp_path: Path, settings: Settings, change: dict[str, str], path: str, message: str) -> None:
    code, out = cli(settings, "validate", str(write(tmp_path, **change)))
    assert code == 2
    assert f"{path}: {message}" in out
    assert "1 problem(s)" in out


def test_agents_start_refuses_them_too_and_starts_nothing(tmp_path: Path, settings: Settings) -> None:
    code, out = cli(settings, "agents", "start", str(write(tmp_path, sensor="windowsize: 4")))
    assert code == 2
    assert "agents.monitor.sensors[0].params.windowsize: unknown param 'windowsize'" in out
    assert "nothing was started" in out
    assert backends.store(settings).list_agents() == []


def test_a_function_without_the_runtime_arguments_is_named(tmp_path: Path, settings: Settings) -> None:
    d = write(tmp_path)
    spec = (d / "scanflow.yaml").read_text()
    (d / "scanflow.yaml").write_text(spec.replace("parts:anything", "parts:no_ctx"))
    code, out = cli(settings, "validate", str(d))
    assert code == 2
    assert "agents.monitor.sensors[0].actuators[2].func: parts:no_ctx must take (obs, ctx, ...) first" in out


def test_a_module_that_cannot_be_imported_is_named_with_its_error(tmp_path: Path, settings: Settings) -> None:
    code, out = cli(settings, "validate", str(write(tmp_path, parts="def big(obs, ctx:\n")))
    assert code == 2
    assert "agents.monitor.sensors[0].rule.func: cannot import 'parts:big': SyntaxError:" in out
    assert "agents.monitor.sensors[0].actuators[1].func: cannot import 'parts:note': SyntaxError:" in out
    d = write(tmp_path)
    spec = (d / "scanflow.yaml").read_text()
    (d / "scanflow.yaml").write_text(spec.replace("    service: svc\n", "    service: svc\n"
                                                  "    imports: [missing_parts]\n", 1))
    code, out = cli(settings, "validate", str(d))
    assert code == 2
    assert ("agents.monitor.imports: cannot import: ModuleNotFoundError: No module named 'missing_parts'"
            in out)
