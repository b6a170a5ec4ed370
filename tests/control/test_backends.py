"""The backend factory: settings pick the engine, deployer and tracker; an unknown backend is
refused with a message naming it and the allowed values, at the CLI as exit code 2."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scanflow.cli.main import app
from scanflow.control import backends
from scanflow.engine import Engine, LocalEngine
from scanflow.serving import Deployer, LocalDeployer
from scanflow.settings import Settings
from scanflow.spec import load_application
from scanflow.store import Store
from scanflow.tracking import MlflowTracker


def test_local_is_the_default_backend(settings: Settings) -> None:
    assert settings.backend == "local"
    store = backends.store(settings)
    tracker = backends.tracker(settings)
    engine = backends.engine(settings, store, tracker, concurrency=1)
    deployer = backends.deployer(settings, store, actor="alice", tracker=tracker)
    assert isinstance(store, Store) and isinstance(tracker, MlflowTracker)
    assert isinstance(engine, Engine) and isinstance(engine, LocalEngine)
    assert isinstance(deployer, Deployer) and isinstance(deployer, LocalDeployer)
    assert deployer.actor == "alice" and engine.tracker is tracker  # one tracker, shared


def test_the_factory_engine_runs_a_workflow(settings: Settings, tmp_path: Path) -> None:
    d = tmp_path / "app"
    d.mkdir()
    (d / "steps.py").write_text("def hello(who, ctx):\n    ctx.log('hello', who)\n")
    (d / "scanflow.yaml").write_text(textwrap.dedent('''
        app: demo
        team: ds
        workflows:
          ok:
            steps: [{name: hello, call: "steps:hello", params: {who: world}}]
    '''))
    store = backends.store(settings)
    engine = backends.engine(settings, store)
    res = engine.run(load_application(d), "ok")
    assert res.ok, res.error
    assert engine.status(res.run_id).steps == {"hello": "succeeded"}
    assert [(s, t.strip()) for s, t in engine.logs(res.run_id)] == [("hello", "hello world")]
    followed = "".join(t for _, t in engine.logs(res.run_id, "hello", follow=True, poll=0.05))
    assert followed.strip() == "hello world"  # the run has ended: what was written, then stop
    with pytest.raises(ValueError, match="no step 'nope'"):
        engine.logs(res.run_id, "nope")


def test_an_unknown_backend_is_refused_naming_it_and_the_allowed_values(settings: Settings) -> None:
    bad = settings.model_copy(update={"backend": "bogus"})
    for build in (lambda: backends.store(bad), lambda: backends.tracker(bad),
                  lambda: backends.engine(bad, Store(settings.store)),
                  lambda: backends.deployer(bad, Store(settings.store))):
        with pytest.raises(backends.UnknownBackend, match="unknown backend 'bogus'.*allowed: local, ray"):
            build()


PG = "postgresql+psycopg://scanflow@127.0.0.1:5432/scanflow"  # never connected to: refused first


@pytest.mark.parametrize(("store_url", "tracking", "says"), [
    (None, None, ["needs a shared store, not sqlite", "SCANFLOW_STORE_URL to a PostgreSQL URL"]),
    (PG, None, ["needs an MLflow tracking server, not sqlite", "mlflow server --serve-artifacts",
                "SCANFLOW_TRACKING_URI"]),
    (PG, "file:///tmp/mlruns", ["not file", "mlflow server --serve-artifacts"]),
])
def test_ray_refuses_state_on_this_machine_only_saying_why_and_what_to_set(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, store_url: str | None,
        tracking: str | None, says: list[str]) -> None:
    """A cluster's nodes share no disk with the driver: SQLite and a local MLflow store are
    refused (before ray is even imported) with exit 2 at the CLI."""
    monkeypatch.setenv("SCANFLOW_BACKEND", "ray")
    for name, value in (("SCANFLOW_STORE_URL", store_url), ("SCANFLOW_TRACKING_URI", tracking)):
        if value:
            monkeypatch.setenv(name, value)
    res = CliRunner().invoke(app, ["--workspace", str(settings.root), "runs", "list"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert all(s in text for s in says), text
    assert "Traceback" not in res.output and not isinstance(res.exception, backends.UnknownBackend)


@pytest.mark.parametrize("args", [["runs", "list"], ["status"], ["agents", "list"]])
def test_cli_with_an_unknown_backend_exits_2_with_the_message(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setenv("SCANFLOW_BACKEND", "bogus")
    res = CliRunner().invoke(app, ["--workspace", str(settings.root), *args])
    assert res.exit_code == 2, res.output
    assert "unknown backend 'bogus'" in res.output and "allowed: local, ray" in res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, backends.UnknownBackend)


@pytest.mark.postgres
def test_ray_with_no_cluster_at_the_address_exits_2_at_once(
        settings: Settings, pg_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from support.mlflow_server import free_port

    d = tmp_path / "app"
    d.mkdir()
    (d / "scanflow.yaml").write_text("app: demo\nteam: ds\nworkflows:\n  w:\n"
                                     "    steps: [{name: s, run: 'python -c pass'}]\n")
    address = f"127.0.0.1:{free_port()}"
    for k, v in {"SCANFLOW_BACKEND": "ray", "SCANFLOW_STORE_URL": pg_url, "SCANFLOW_RAY_ADDRESS": address,
                 "SCANFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}.items():
        monkeypatch.setenv(k, v)
    started = time.monotonic()
    res = CliRunner().invoke(app, ["--workspace", str(settings.root), "run", str(d), "w"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"cannot join the Ray cluster at '{address}'" in text and "ray start --head" in text
    assert time.monotonic() - started < 20  # not Ray's minutes of retrying
    assert Store(pg_url).list_runs() == []


@pytest.mark.postgres
def test_ray_without_ray_installed_exits_2_saying_what_to_install(
        settings: Settings, pg_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    d = tmp_path / "app"
    d.mkdir()
    (d / "scanflow.yaml").write_text("app: demo\nteam: ds\nworkflows:\n  w:\n"
                                     "    steps: [{name: s, run: 'python -c pass'}]\n")
    for k, v in {"SCANFLOW_BACKEND": "ray", "SCANFLOW_STORE_URL": pg_url,
                 "SCANFLOW_TRACKING_URI": "http://127.0.0.1:5000"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees without the extra
    res = CliRunner().invoke(app, ["--workspace", str(settings.root), "run", str(d), "w"])
    assert res.exit_code == 2, res.output
    assert "pip install 'scanflow[ray]'" in " ".join(res.output.split())
