"""The load test of the serving issue: a fixed-concurrency keep-alive load for 60 s (set
SCANFLOW_LOADTEST_SECONDS to change it) while the service scales 1 -> 3 -> 1 and rolls out a
new version: no request may fail, and the prediction log must hold exactly one record per
answered instance."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from scanflow.serving import LocalDeployer
from support.serving import (
    MODEL,
    DigitsWorkspace,
    KeepAliveLoad,
    digits_workspace,  # noqa: F401 - fixture
    stop_everything,
)

pytestmark = pytest.mark.slow
SERVICE = "digits-load"


@pytest.fixture
def deployer(digits_workspace: DigitsWorkspace) -> Iterator[LocalDeployer]:  # noqa: F811
    d = LocalDeployer(digits_workspace.settings, digits_workspace.store)
    try:
        yield d
    finally:
        stop_everything(d, digits_workspace.store)


def test_sixty_seconds_of_load_through_scale_and_rollout(
    deployer: LocalDeployer, digits_workspace: DigitsWorkspace  # noqa: F811
) -> None:
    ws = digits_workspace
    seconds = float(os.environ.get("SCANFLOW_LOADTEST_SECONDS", "60"))
    deployer.deploy(SERVICE, app="mnist", team="ops", model=MODEL, replicas=1)
    url = deployer.url(SERVICE)
    steps = [
        (0.10, lambda: deployer.scale(SERVICE, 3)),
        (0.40, lambda: (ws.set_champion("2"), deployer.rollout(SERVICE))),
        (0.70, lambda: deployer.scale(SERVICE, 1)),
    ]
    t0 = time.monotonic()
    with KeepAliveLoad(url, ws.X, clients=6, batch=2, pause=0.01) as load:
        for at, action in steps:
            time.sleep(max(0.0, t0 + at * seconds - time.monotonic()))
            action()
        time.sleep(max(0.0, t0 + seconds - time.monotonic()))
    res = load.result
    print(f"{res.ok} requests answered in {seconds:.0f}s, {res.failed} failed, "
          f"slowest {res.max_latency * 1000:.0f} ms")
    assert res.failed == 0, res.errors[:5]
    assert res.ok > 0 and {v for _, v in res.versions} == {"1", "2"}
    st = deployer.status(SERVICE)
    assert st["versions"] == ["2"] and len(st["worker_pids"]) == 1
    deployer.stop(SERVICE)  # collects whatever the workers had not yet moved to the store
    logged = ws.store.prediction_window(SERVICE, with_inputs=False).request_ids
    assert len(logged) == len(res.ids) == 2 * res.ok
    assert set(logged) == set(res.ids)
