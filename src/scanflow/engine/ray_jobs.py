"""Detached runs on the ray backend: `scanflow run --detach` records the run, hands its driver
(the engine's run loop) to the cluster as a Ray job, and returns the run's id.

Why Ray Jobs rather than a detached actor: a job is Ray's supported way to run a driver program
on a cluster (`ray job submit`); its entrypoint is a process of its own on the head node (a crash
or `kill -9` of it is the same fault as a killed local driver: `scanflow resume` continues the
run), Ray keeps its output (`ray job logs scanflow-RUN`), and `ray job stop` ends it. An actor
would run the loop inside a Ray worker, next to other tasks.

The job gets the app as the steps get it (`ray_task.pack_app`: the folder and its `code_paths`
under `_code/`) with the checked `Application` inside (`RUN_FILE`), from the run's parent MLflow
run (`APP_ARTIFACT`), so it needs neither the submitter's disk nor a reload of the spec. Its
state is the shared store and MLflow; its workspace is a temporary folder it removes at the end,
after copying each step's log (the driver's copy) to the parent run as `scanflow/logs/STEP.log`,
so that `scanflow logs` reads them from any machine (`logs.step_logs`, `remote`).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from scanflow.engine.local import LocalEngine
from scanflow.engine.ray_address import ClusterUnavailable, gcs_and_dashboard
from scanflow.engine.ray_backend import RayEngine
from scanflow.engine.ray_task import LOGS_DIR, pack_app, shipped_code
from scanflow.settings import Settings
from scanflow.spec.models import Application
from scanflow.store import Store

RUN_FILE = ".scanflow-run.json"  # in the app package: the checked Application
APP_ARTIFACT = "scanflow/detached/app.zip"  # on the run's parent MLflow run: the app package
JOB_PREFIX = "scanflow-"  # a detached run's Ray job id: scanflow-RUN


RESUMABLE = ("failed", "cancelled", "interrupted")  # what `resume` continues


def job_id(run_id: str) -> str:
    return f"{JOB_PREFIX}{run_id}"


def dashboard_url(address: str) -> str:
    """The URL of the cluster's dashboard (its jobs and logs APIs), found through the GCS at
    `address`; ValueError saying what to do when there is none."""
    try:
        return gcs_and_dashboard(address)[1]
    except (ValueError, ClusterUnavailable) as exc:
        raise ValueError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - unreachable or no cluster there (Ray raises several kinds)
        raise ValueError(f"cannot reach the Ray cluster at {address!r} (SCANFLOW_RAY_ADDRESS): "
                         f"{exc}") from exc


def package(app: Application, settings: Settings) -> bytes:
    """The app as the job's driver gets it: its folder and code_paths as packed for the nodes,
    and the checked Application (`RUN_FILE`) with its code_paths pointing at their packed copies."""
    packed = pack_app(app.base_dir, skip=[settings.root], code=app.code_modules())
    shipped = app.model_copy(update={"code_paths": shipped_code(app)})
    buf = io.BytesIO(packed)
    with zipfile.ZipFile(buf, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(RUN_FILE, shipped.model_dump_json())
    return buf.getvalue()


def submit(engine: LocalEngine, app: Application, run_id: str, *, resume: bool = False) -> str:
    """Hand a recorded (pending) run to the cluster as a Ray job; its job id. The app travels
    through the run's parent MLflow run (`APP_ARTIFACT`, opened here), not as the job's Ray
    `working_dir`: the steps' tasks would inherit that, and a node then fails to set it up
    (`RuntimeEnvSetupError`: the package is gone from the GCS) while the job still runs. The
    job's environment is scanflow's settings (the driver's own environment stays here)."""
    from ray.job_submission import JobSubmissionClient  # lazy: ray

    settings = engine.settings
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "uploading package ...": not news
    client = JobSubmissionClient(dashboard_url(settings.ray_address))
    run = engine.store.get_run(run_id)
    assert run is not None
    _, parent = engine._open_tracking(app, run)
    assert parent is not None, "the ray backend tracks every run"
    engine.store.update_run(run_id, mlflow_run_id=parent)
    with tempfile.TemporaryDirectory(prefix="scanflow-detach-") as tmp:
        zipped = Path(tmp) / APP_ARTIFACT.rsplit("/", 1)[1]
        zipped.write_bytes(package(app, settings))
        engine.tracker.log_artifact(parent, zipped, APP_ARTIFACT.rsplit("/", 1)[0])
    from ray._private import services  # lazy: ray

    env = {k: v for k, v in settings.child_env().items() if k != "SCANFLOW_WORKSPACE"}
    # The cluster's GCS by address, not `auto`: see `main`.
    env.update(SCANFLOW_BACKEND="ray", RAY_USAGE_STATS_ENABLED="0",
               SCANFLOW_RAY_ADDRESS=services.canonicalize_bootstrap_address_or_die(settings.ray_address))
    # A resume is a job of its own (a job id is used once): scanflow-RUN-resume-<time>.
    jid = f"{job_id(run_id)}-resume-{int(time.time() * 1000)}" if resume else job_id(run_id)
    return str(client.submit_job(
        entrypoint=f"{settings.ray_python} -m scanflow.engine.ray_jobs "
                   f"{'--resume ' if resume else ''}{run_id}",
        submission_id=jid, entrypoint_num_cpus=0, runtime_env={"env_vars": env},
        metadata={"scanflow_run": run_id, "app": app.app, "resume": str(resume)},
    ))


def main(argv: list[str]) -> int:
    """The job's entrypoint: fetch the app from the run's MLflow run, run the run to its end
    (`--resume RUN`: re-run what did not finish of a failed, cancelled or interrupted run)."""
    resume = argv[:1] == ["--resume"]
    (run_id,) = argv[1:] if resume else argv
    work = Path(tempfile.mkdtemp(prefix=f"scanflow-driver-{run_id[:12]}-"))
    try:
        settings = Settings(workspace=work / "ws").ensure()
        if settings.ray_address not in ("", "auto"):
            # Ray's job supervisor sets RAY_ADDRESS by resolving `auto`, which on a machine that
            # runs several clusters names the newest one, not necessarily this job's; and
            # RAY_ADDRESS wins over the address `ray.init` is given. The submitter's is exact.
            os.environ["RAY_ADDRESS"] = settings.ray_address
        store = Store(settings.store)
        run = store.get_run(run_id)
        wanted = RESUMABLE if resume else ("pending",)
        if run is None or run.status not in wanted or not run.mlflow_run_id:
            print(f"run {run_id[:12]} is {run.status if run else 'not in the store'}: not started")
            return 0
        engine = RayEngine(settings, store)
        zipped = engine.tracker.download(run.mlflow_run_id, APP_ARTIFACT, str(work / "dl"))
        with zipfile.ZipFile(zipped) as zf:
            zf.extractall(work / "app")
        app = Application.model_validate_json((work / "app" / RUN_FILE).read_text())
        app = app.model_copy(update={"base_dir": work / "app", "source": run.spec_path})
        try:
            def progress(step: str, state: str) -> None:
                print(f"{step}: {state}", flush=True)

            result = (engine.resume(run_id, app, progress=progress) if resume
                      else engine.execute(run_id, app, progress=progress))
        finally:
            _keep_logs(engine, settings, run_id)
        print(f"run {run_id} {result.status}")
        return 0 if result.ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _keep_logs(engine: LocalEngine, settings: Settings, run_id: str) -> None:
    """Each step's log as this driver wrote it, to the parent MLflow run (its folder goes)."""
    run = engine.store.get_run(run_id)
    if run is None or not run.mlflow_run_id:
        return
    for path in sorted((settings.runs_dir / run_id).glob("*.log")):
        engine.tracker.log_artifact(run.mlflow_run_id, path, LOGS_DIR)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.exit(main(sys.argv[1:]))
