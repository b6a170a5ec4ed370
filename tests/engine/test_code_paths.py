"""`code_paths`: modules outside the app folder that its steps import, by their own names only."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scanflow.cli.main import app as cli_app
from scanflow.settings import Settings
from scanflow.store import Store

SPEC = '''
app: shared
team: ds
code_paths: [../common_utils.py, ../helpers]
workflows:
  both:
    steps:
      - {name: inproc, call: "steps:use_shared", outputs: [out]}
      - {name: proc, run: "python use_shared.py", outputs: [out]}
  sibling:
    steps:
      - {name: proc, run: "python use_sibling.py"}
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """app/ (the spec's folder) next to the shared modules it lists, and one it does not."""
    (tmp_path / "common_utils.py").write_text("def greeting():\n    return 'hello from common'\n")
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("VALUE = 42\n")
    (tmp_path / "unlisted.py").write_text("X = 1\n")
    d = tmp_path / "app"
    d.mkdir()
    (d / "scanflow.yaml").write_text(SPEC)
    (d / "steps.py").write_text(textwrap.dedent('''
        import common_utils, helpers

        def use_shared(out):
            out.write_text(f"{common_utils.greeting()} {helpers.VALUE}")
    '''))
    (d / "use_shared.py").write_text(textwrap.dedent('''
        import argparse, common_utils, helpers
        p = argparse.ArgumentParser(); p.add_argument("--out"); a = p.parse_args()
        open(a.out, "w").write(f"{common_utils.greeting()} {helpers.VALUE}")
    '''))
    (d / "use_sibling.py").write_text("import unlisted\n")
    return d


def cli(settings: Settings, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli_app, ["--workspace", str(settings.root), *args])
    return res.exit_code, res.output


def test_steps_in_process_and_as_processes_import_the_listed_modules(
        project: Path, settings: Settings) -> None:
    code, out = cli(settings, "run", str(project), "both")
    assert code == 0, out
    store = Store(settings.store)
    run = store.list_runs()[0]
    for step in store.list_steps(run.id):
        assert step.status == "succeeded"
        assert Path(step.outputs["out"]).read_text() == "hello from common 42"


def test_a_module_next_to_them_that_the_spec_does_not_list_is_not_importable(
        project: Path, settings: Settings) -> None:
    """As on a cluster, where only the listed modules travel with the app."""
    code, out = cli(settings, "run", str(project), "sibling")
    assert code == 1
    assert "No module named 'unlisted'" in out


@pytest.mark.parametrize(("entry", "why"), [
    ("/abs/olute.py", "must be a path relative to the spec file"),
    ("../notes.txt", "neither a .py file nor a package folder"),
    ("../missing.py", "is not a file"),
    ("../unlisted_dir", "is not a package folder with an __init__.py"),
])
def test_bad_code_paths_are_refused_before_anything_runs(
        project: Path, settings: Settings, entry: str, why: str) -> None:
    (project.parent / "unlisted_dir").mkdir()
    spec = project / "scanflow.yaml"
    spec.write_text(SPEC.replace("[../common_utils.py, ../helpers]", f"[{entry}]"))
    code, out = cli(settings, "run", str(project), "both")
    assert code == 2, out
    assert "code_paths[0]" in out and why in " ".join(out.split())
    assert Store(settings.store).list_runs() == []
