"""Spec loading and validation: every problem names the file, the field path and the fault."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scanflow.spec import Application, SpecError, Step, Workflow, load_application
from scanflow.spec.loader import parse_application

GOOD = """
app: demo
team: datascience
workflows:
  train:
    params: {seed: 1}
    steps:
      - name: load
        run: python load.py
        outputs: [data]
      - name: fit
        call: "steps:fit"
        params: {epochs: {type: int, default: 3}, lr: 0.1}
        inputs: {data: load.data}
      - name: report
        run: python report.py
        after: [fit]
services:
  web: {model: digits, replicas: 2}
agents:
  watcher:
    role: monitor
    service: web
    sensors:
      - name: tick
        func: "scanflow.agents.builtin:prediction_window"
        trigger: {interval: 2s}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "scanflow.yaml"
    p.write_text(text)
    return p


def issues_of(tmp_path: Path, text: str, **kw: object) -> list[str]:
    with pytest.raises(SpecError) as exc:
        load_application(write(tmp_path, text), check_imports=False, **kw)  # type: ignore[arg-type]
    return [f"{i.path}: {i.message}" for i in exc.value.issues]


def test_good_spec_loads_with_types_and_defaults(tmp_path: Path) -> None:
    app = load_application(write(tmp_path, GOOD), check_imports=False)
    fit = app.workflow("train").step("fit")
    assert fit.params["epochs"].type == "int" and fit.params["epochs"].default == 3
    assert fit.params["lr"].type == "float"
    assert fit.deps() == ["load"]  # reading load.data implies the order
    assert app.services["web"].alias == "champion" and app.services["web"].replicas == 2
    assert app.agents["watcher"].sensors[0].trigger.interval == 2.0
    assert app.base_dir == tmp_path.resolve()


def test_unknown_key_is_reported_with_its_path(tmp_path: Path) -> None:
    bad = GOOD.replace("outputs: [data]", "outputs: [data]\n        retires: 3")
    assert issues_of(tmp_path, bad) == ["workflows.train.steps[0].retires: unknown key"]


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    bad = GOOD.replace("replicas: 2", "replicas: many")
    (msg,) = issues_of(tmp_path, bad)
    assert msg.startswith("services.web.replicas:") and "integer" in msg


def test_after_naming_a_missing_step(tmp_path: Path) -> None:
    bad = GOOD.replace("after: [fit]", "after: [fit, evaluate]")
    assert issues_of(tmp_path, bad) == [
        "workflows.train.steps[2].after[1]: no step named 'evaluate' in this workflow"
    ]


def test_cycle_is_refused(tmp_path: Path) -> None:
    bad = GOOD.replace("        run: python load.py\n",
                       "        run: python load.py\n        after: [report]\n")
    (msg,) = issues_of(tmp_path, bad)
    assert "dependency cycle" in msg and "load" in msg and "report" in msg


def test_duplicate_step_names_and_duplicate_yaml_keys(tmp_path: Path) -> None:
    bad = GOOD.replace("- name: report", "- name: fit")
    assert any("duplicate step name 'fit'" in m for m in issues_of(tmp_path, bad))
    dup = GOOD.replace("services:\n", "services:\n  web: {model: other}\n")
    (msg,) = issues_of(tmp_path, dup)
    assert "duplicate key 'web'" in msg


def test_unknown_model_only_with_a_registry(tmp_path: Path) -> None:
    assert issues_of(tmp_path, GOOD, known_models={"other"}) == [
        "services.web.model: unknown model 'digits': not registered in MLflow and not declared "
        "by this app (declare it in the top-level `models:`, or in the `registers:` of the step "
        "that registers it; declared here: none)"
    ]
    app = load_application(write(tmp_path, GOOD), known_models={"digits"}, check_imports=False)
    assert app.services["web"].model == "digits"


def test_several_problems_are_all_reported_and_file_named(tmp_path: Path) -> None:
    bad = GOOD.replace("after: [fit]", "after: [nope]").replace("service: web", "service: ghost")
    with pytest.raises(SpecError) as exc:
        load_application(write(tmp_path, bad), check_imports=False)
    text = str(exc.value)
    assert "after[0]" in text and "agents.watcher.service" in text
    assert str(tmp_path / "scanflow.yaml") in text


def test_step_needs_exactly_one_action_and_bad_yaml(tmp_path: Path) -> None:
    bad = GOOD.replace("        run: python report.py\n", "")
    assert any("exactly one of `run`" in m for m in issues_of(tmp_path, bad))
    (msg,) = issues_of(tmp_path, "app: [unclosed\n")
    assert msg.startswith("line ") and "invalid YAML" in msg


def test_imports_are_checked_when_asked(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as exc:
        load_application(write(tmp_path, GOOD))
    assert "workflows.train.steps[1].call: cannot import 'steps:fit'" in str(exc.value)
    (tmp_path / "steps.py").write_text("def fit(data):\n    return {}\n")
    load_application(write(tmp_path, GOOD))


def test_python_api_builds_the_same_objects(tmp_path: Path) -> None:
    wf = Workflow(steps=[Step(name="a", call=lambda: None, outputs=["x"]),
                         Step(name="b", call=lambda x: None, inputs={"x": "a.x"})])
    app = Application(app="demo", team="t", workflows={"w": wf})
    from_yaml = parse_application(
        {"app": "demo", "team": "t", "workflows": {"w": {"steps": [
            {"name": "a", "call": "m:a", "outputs": ["x"]},
            {"name": "b", "call": "m:b", "inputs": {"x": "a.x"}}]}}},
        check_imports=False,
    )
    assert [s.deps() for s in app.workflow("w").steps] == [s.deps() for s in from_yaml.workflow("w").steps]


def test_cli_validate_exits_2_and_starts_nothing(tmp_path: Path) -> None:
    bad = write(tmp_path, GOOD.replace("after: [fit]", "after: [nope]"))
    ws = tmp_path / "ws"
    proc = subprocess.run(
        [sys.executable, "-m", "scanflow.cli.main", "--workspace", str(ws), "run", str(bad), "train"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "workflows.train.steps[2].after[0]" in proc.stderr
    assert not (ws / "scanflow.db").exists()  # nothing was recorded
