"""Per-replica resource limits on the local backend, on real gunicorn services held in real
cgroups: a CPU quota that holds under load, a memory limit whose breach kills that replica
(and only that request fails), `status` showing limits and use, specs with bad resources
refused. Skipped where no cgroup hierarchy is writable (the module says why)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scanflow.agents.planner.signals import cpu_over
from scanflow.procs import child_pids, pid_alive
from scanflow.serving import LocalDeployer, cgroups
from scanflow.spec.models import Resources
from support.serving import (
    DigitsWorkspace,
    digits_workspace,  # noqa: F401 - fixture
    stop_everything,
)
from support.waiting import wait_for

BURNER = "burner"
_BURNER_CODE = '''
import time

import mlflow
from mlflow.pyfunc import PythonModel


class Burner(PythonModel):
    """Per row: burn `spin` CPU-seconds, then hold `mib` MiB (every page touched)."""

    def predict(self, context, model_input, params=None):
        held = b"x" * int(model_input["mib"].max() * 2**20)
        end = time.thread_time() + float(model_input["spin"].max())
        n = 0
        while time.thread_time() < end:
            n += 1
        return (model_input["spin"] * 0 + len(held) // 2**20).to_numpy()


mlflow.models.set_model(Burner())
'''


def _writable_cgroups() -> str | None:
    """Why limits cannot be enforced here (None: they can)."""
    p = cgroups.plan("probe-only", 0.5, 64 * 2**20)
    cgroups.remove_all(p)
    return p.unenforced


WHY_NOT = _writable_cgroups()
needs_cgroups = pytest.mark.skipif(WHY_NOT is not None, reason=f"limits not enforceable: {WHY_NOT}")


def register_burner(ws: DigitsWorkspace) -> None:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    code = ws.settings.root / "burner_model.py"
    code.write_text(_BURNER_CODE)
    sig = ModelSignature(inputs=Schema([ColSpec("double", "spin"), ColSpec("long", "mib")]),
                         outputs=Schema([ColSpec("long")]))
    mlflow.set_tracking_uri(ws.settings.tracking)
    client = MlflowClient(tracking_uri=ws.settings.tracking)
    exp = client.get_experiment_by_name("serving-tests")
    with mlflow.start_run(experiment_id=exp.experiment_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), signature=sig,
                                       pip_requirements=["pandas"])
    for _ in range(2):  # v1 champion, v2 to roll out to
        mlflow.register_model(info.model_uri, BURNER)
    client.set_registered_model_alias(BURNER, "champion", "1")


@pytest.fixture(scope="module")
def deployer(digits_workspace: DigitsWorkspace) -> Iterator[LocalDeployer]:  # noqa: F811
    register_burner(digits_workspace)
    d = LocalDeployer(digits_workspace.settings, digits_workspace.store)
    try:
        yield d
    finally:
        stop_everything(d, digits_workspace.store)


def predict(url: str, spin: float = 0.0, mib: int = 0, client: httpx.Client | None = None
            ) -> httpx.Response:
    body = {"instances": [{"spin": spin, "mib": mib}]}
    r = (client or httpx).post(f"{url}/predict", json=body, timeout=60.0)  # type: ignore[union-attr]
    assert r.status_code != 422, r.text  # a malformed test request proves nothing
    return r


def group_dirs(plan_dirs: dict[str, str], pid: int) -> list[Path]:
    return [Path(d) / str(pid) for d in plan_dirs.values()]


def test_a_service_without_a_cpu_quota_is_not_resized(deployer: LocalDeployer) -> None:
    svc = "burner-free"
    deployer.deploy(svc, app="t", team="t", model=BURNER)
    try:
        with pytest.raises(ValueError, match="no enforced CPU quota to change"):
            deployer.resize(svc, 0.5)
        assert deployer.status(svc)["resources"]["cpus"] is None
        assert not deployer.store.list_events(svc, ["resized"])
    finally:
        deployer.stop(svc)


@needs_cgroups
def test_cpu_quota_holds_a_busy_replica_to_its_limit(deployer: LocalDeployer) -> None:
    """0.25 CPU per replica: under more load than that, the replica's own cgroup counter
    grows by at most 0.3 CPU-seconds per second; `status` shows the limit and the use."""
    import threading

    svc = "burner-cpu"
    deployer.deploy(svc, app="t", team="t", model=BURNER,
                    resources=Resources.model_validate({"cpus": 0.25}))
    url = deployer.url(svc)
    st = deployer.status(svc)
    (w,) = st["workers"]
    assert st["resources"]["enforced"] and st["resources"]["cpus"] == 0.25
    assert st["resources"]["memory"] is None  # not declared: not limited
    assert w["in_cgroup"] and w["cpu_limit"] == pytest.approx(0.25)
    assert w["memory_limit"] is None
    pid = w["pid"]

    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60.0) as c:
            while not stop.is_set():
                predict(url, spin=0.05, client=c)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        plan = deployer._plan(svc)

        def used() -> float:
            return float(cgroups.usage(plan, pid)["cpu_seconds"] or 0.0)

        import time

        wait_for(lambda: used() > 0.1, what="the replica burning CPU")
        c0, t0 = used(), time.monotonic()
        # A resource amount, not a time: unlimited, 0.75 CPU-s takes ~0.75 s of wall time.
        wait_for(lambda: used() - c0 >= 0.75, timeout=60, what="0.75 CPU-seconds used")
        rate = (used() - c0) / (time.monotonic() - t0)
        assert rate <= 0.3, f"{rate:.2f} CPU-seconds per second with a 0.25 CPU limit"
        (w,) = deployer.status(svc)["workers"]
        assert w["cpu_use"] is not None and w["cpu_use"] <= 0.3
        # What the planner reads to tell a replica held by its quota from a starved one: over
        # 20 scheduler periods of this load the replica used its quota, throttled in most.
        first = (time.time(), deployer.cpu_counters(svc))
        assert set(first[1]) == {pid} and first[1][pid]["cpus"] == pytest.approx(0.25)

        def periods() -> int:
            return int(deployer.cpu_counters(svc)[pid]["cpu_periods"] or 0)

        wait_for(lambda: periods() - int(first[1][pid]["cpu_periods"] or 0) >= 20, what="20 periods")
        last = (time.time(), deployer.cpu_counters(svc))
        over = cpu_over([first, last], first[0], last[0])
        assert over["cpu_limit"] == pytest.approx(0.25)
        assert over["cpu_use"] is not None and 0.2 <= over["cpu_use"] <= 0.3, over
        assert over["cpu_throttled"] is not None and over["cpu_throttled"] >= 0.5, over
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    # A rollout (SIGHUP: every worker re-forked) leaves one group per live replica, limited.
    deployer.rollout(svc, "2")
    master = int(deployer._get(svc).pid or 0)
    dirs = deployer._plan(svc).dirs
    wait_for(lambda: groups_of(dirs) == set(child_pids(master)), what="old replicas' groups removed")
    (w,) = deployer.status(svc)["workers"]
    assert w["model_version"] == "2" and w["in_cgroup"] and w["cpu_limit"] == pytest.approx(0.25)
    # A new quota in place: the running replica's group holds it (no restart), and a replica
    # added afterwards joins with it.
    from typer.testing import CliRunner

    from scanflow.cli.main import app

    root = str(deployer.settings.root)
    res = CliRunner().invoke(app, ["--workspace", root, "resize", svc, "--cpus", "0.5", "--reason",
                                   "sized from the clean load"])
    assert res.exit_code == 0 and f"{svc}: 0.5 CPU per replica" in res.output, res.output
    res = CliRunner().invoke(app, ["--workspace", root, "resize", svc, "--cpus", "0.5"])
    assert res.exit_code == 0 and "(unchanged)" in res.output, res.output
    res = CliRunner().invoke(app, ["--workspace", root, "resize", svc, "--cpus", "-1"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    counters = deployer.cpu_counters(svc)
    assert set(counters) == {w["pid"]} and counters[w["pid"]]["cpus"] == pytest.approx(0.5)
    deployer.scale(svc, 2)
    st = deployer.status(svc)
    assert st["resources"]["cpus"] == 0.5 and w["pid"] in {x["pid"] for x in st["workers"]}
    assert [x["cpu_limit"] for x in st["workers"]] == pytest.approx([0.5, 0.5])
    (ev,) = deployer.store.list_events(svc, ["resized"])
    assert ev.payload["from"] == {"cpus": 0.25} and ev.payload["to"] == {"cpus": 0.5}
    assert ev.payload["reason"] == "sized from the clean load"
    (rec,) = deployer.store.list_events(svc, ["resources_set"])  # the audit trail: who and why
    assert rec.payload["from_cpus"] == 0.25 and rec.payload["cpus"] == 0.5 and rec.payload.get("actor")
    with pytest.raises(ValueError, match="cpus must be > 0"):
        deployer.resize(svc, 0)
    pid = w["pid"]
    deployer.stop(svc)
    assert not any(d.exists() for d in group_dirs(dirs, pid)), "a replica's cgroup outlived stop"
    assert not any(Path(d).exists() for d in dirs.values())


def test_no_declared_limit_needs_no_cgroup() -> None:
    """No `resources:` in the spec: no group, no limit, nothing said about enforcement."""
    plan = cgroups.plan("x", None, None)
    assert not plan.wanted and not plan.dirs and plan.unenforced is None


def test_without_cgroups_the_service_serves_unlimited_and_says_so(
        deployer: LocalDeployer, tmp_path: Path) -> None:
    """No hierarchy at SCANFLOW_CGROUP_ROOT: deployed anyway, one clear warning in status."""
    settings = deployer.settings.model_copy(update={"cgroup_root": tmp_path / "no-cgroups"})
    d = LocalDeployer(settings, deployer.store, tracker=deployer.tracker)
    d.deploy("burner-free", app="t", team="t", model=BURNER,
             resources=Resources.model_validate({"cpus": 0.25, "memory": "400Mi"}))
    try:
        assert predict(d.url("burner-free"), mib=1).status_code == 200
        res = d.status("burner-free")["resources"]
        assert not res["enforced"] and res["cpus"] == 0.25
        assert res["warning"] == f"limits not enforced: no cgroup hierarchy at {tmp_path / 'no-cgroups'}"
        (w,) = d.status("burner-free")["workers"]
        assert w.get("cpu_limit") is None and w.get("memory_limit") is None
    finally:
        d.stop("burner-free")


def _oom_events(deployer: LocalDeployer, svc: str) -> list[Any]:
    return list(deployer.store.list_events(service=svc, kinds=["replica_oom_killed"]))


@needs_cgroups
def test_replica_over_its_memory_limit_is_killed_and_replaced(deployer: LocalDeployer) -> None:
    svc = "burner-mem"
    deployer.deploy(svc, app="t", team="t", model=BURNER,
                    resources=Resources.model_validate({"memory": "400Mi"}))
    url = deployer.url(svc)
    r = predict(url, mib=50)
    assert r.status_code == 200, r.text  # well under the limit
    (w,) = deployer.status(svc)["workers"]
    assert w["memory_limit"] == 400 * 2**20 and w["cpu_limit"] is None
    first = w["pid"]

    with pytest.raises(httpx.HTTPError):  # twice the limit: the kernel kills this replica
        predict(url, mib=800)  # mid-request: the client sees the connection drop
    wait_for(lambda: not pid_alive(first), what="the replica over its limit gone")
    events = wait_for(lambda: _oom_events(deployer, svc), what="a replica_oom_killed event")
    assert events[0].payload["pid"] == first and events[0].payload["memory_limit"] == 400 * 2**20
    master = int(deployer._get(svc).pid or 0)
    wait_for(lambda: [p for p in child_pids(master) if p != first], what="a new replica")
    r = wait_for(lambda: (x := predict(url, mib=50)).status_code == 200 and x,
                 what="the next request served")
    assert r.json()["predictions"] == [50]
    log = (Path(deployer._get(svc).workdir) / "server.log").read_text()
    assert f"replica {first} of {svc} was killed by the kernel" in log
    plan = deployer._plan(svc)
    assert not any(d.exists() for d in group_dirs(plan.dirs, first))

    # Scaling and a rollout (SIGHUP re-forks every worker) keep one group per live replica.
    deployer.scale(svc, 2)
    assert groups_of(plan.dirs) == set(child_pids(master))
    assert all(w["in_cgroup"] and w["memory_limit"] == 400 * 2**20
               for w in deployer.status(svc)["workers"])
    deployer.scale(svc, 1)
    wait_for(lambda: groups_of(plan.dirs) == set(child_pids(master)),
             what="the retired replica's group removed")
    status_shows_replicas(deployer, svc)
    deployer.stop(svc)
    assert not any(Path(d).exists() for d in plan.dirs.values()), "groups left after stop"


def groups_of(plan_dirs: dict[str, str]) -> set[int]:
    """Pids that have a replica group, the same in every controller's hierarchy."""
    found = [{int(p.name) for p in Path(d).iterdir() if p.is_dir()} for d in plan_dirs.values()]
    assert all(f == found[0] for f in found), found
    return found[0]


def status_shows_replicas(deployer: LocalDeployer, svc: str) -> None:
    """`scanflow status SERVICE` lists each replica with its limits and use; `--json` too."""
    import json

    from typer.testing import CliRunner

    from scanflow.cli.main import app

    root = str(deployer.settings.root)
    res = CliRunner().invoke(app, ["--workspace", root, "status", svc], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    (w,) = deployer.status(svc)["workers"]
    line = next(ln for ln in res.output.splitlines() if str(w["pid"]) in ln)
    assert "400 MiB" in line and "MiB" in line.split("400 MiB", 1)[1], line
    killed = deployer.status(svc)["last_oom_kill"]["pid"]
    assert f"replica {killed} was killed by the kernel" in res.output
    res = CliRunner().invoke(app, ["--workspace", root, "status", svc, "--json"])
    got = json.loads(res.output)
    assert got["resources"]["memory"] == 400 * 2**20 and got["resources"]["enforced"]
    (jw,) = got["workers"]
    assert jw["memory_limit"] == 400 * 2**20 and jw["memory_use"] > 0 and jw["cpu_use"] is not None
    assert got["last_oom_kill"]["pid"] == killed and got["last_oom_kill"]["at"].endswith("Z")


def test_declared_limits_only() -> None:
    """Only what the spec writes is a limit; Kubernetes' millicores are understood."""
    assert Resources.model_validate({"cpus": "250m"}).declared() == (0.25, None)
    assert Resources.model_validate({"cpus": 0.5, "memory": "1GiB"}).declared() == (0.5, 2**30)
    assert Resources.model_validate({"memory": "512Mi"}).declared() == (None, 512 * 2**20)


@pytest.mark.parametrize("bad, field", [
    ("{cpus: -1}", "cpus"), ("{cpus: lots}", "cpus"), ("{cpus: 0}", "cpus"),
    ("{memory: -5Mi}", "memory"), ("{memory: big}", "memory"), ("{memory: 1Mi}", "memory"),
    ("{gpus: 1}", "gpus"),
])
def test_bad_resources_are_exit_2_naming_the_field(tmp_path: Path, bad: str, field: str) -> None:
    from typer.testing import CliRunner

    from scanflow.cli.main import app

    (tmp_path / "scanflow.yaml").write_text(
        f"app: a\nteam: t\nservices:\n  web:\n    model: m\n    resources: {bad}\n")
    res = CliRunner().invoke(app, ["--workspace", str(tmp_path / "ws"), "validate",
                                   str(tmp_path / "scanflow.yaml")])
    assert res.exit_code == 2, res.output
    assert f"services.web.resources.{field}" in res.output, res.output
    assert "Traceback" not in res.output

