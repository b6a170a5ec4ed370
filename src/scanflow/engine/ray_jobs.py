"""Detached runs on the ray backend: `scanflow run --detach` records the run, hands its driver
(the engine's run loop) to the cluster as a Ray job, and returns the run's id.

Why Ray Jobs rather than a detached actor: a job is Ray's supported way to run a driver program
on a cluster (`ray job submit`); its entrypoint is a process of its own on the head node (a crash
or `kill -9` of it is the same fault as a killed local driver: `scanflow resume` continues the
run), Ray keeps its output (`ray job logs scanflow-RUN`) and ships its working folder, and
`ray job stop` ends it. An actor would run the loop inside a Ray worker, next to other tasks.

The job's working folder is the app as the steps get it (`ray_task.pack_app`: the folder and its
`code_paths` under `_code/`) with the checked `Application` beside it (`RUN_FILE`), so the job
needs neither the submitter's disk nor a reload of the spec. Its state is the shared store and
MLflow; its workspace is a temporary folder it removes at the end, after copying each step's
log (the driver's copy) to the run's parent MLflow run as `scanflow/logs/STEP.log`, so that
`scanflow logs` reads them from any machine (`logs.step_logs`, `remote`).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from scanflow.engine.local import LocalEngine
from scanflow.engine.ray_address import probe
from scanflow.engine.ray_backend import RayEngine
from scanflow.engine.ray_task import LOGS_DIR, pack_app, shipped_code
from scanflow.settings import Settings
from scanflow.spec.models import Application
from scanflow.store import Store

RUN_FILE = ".scanflow-run.json"  # in the job's working folder: the checked Application
JOB_PREFIX = "scanflow-"  # a detached run's Ray job id: scanflow-RUN


def job_id(run_id: str) -> str:
    return f"{JOB_PREFIX}{run_id}"


def dashboard_url(address: str) -> str:
    """The URL of the cluster's dashboard (its jobs and logs APIs), found through the GCS at
    `address`; ValueError saying what to do when there is none."""
    from ray._private import services  # lazy: ray
    from ray.dashboard.utils import ray_address_to_api_server_url  # lazy: ray

    if address.startswith("ray://"):
        raise ValueError("a detached run needs the head's GCS address (host:6379) in "
                         "SCANFLOW_RAY_ADDRESS, not a ray:// client address")
    probe(address)
    try:
        return ray_address_to_api_server_url(services.canonicalize_bootstrap_address_or_die(address))
    except Exception as exc:  # noqa: BLE001 - Ray raises several kinds here: one message
        raise ValueError(f"the Ray cluster at {address!r} has no dashboard to submit a job to "
                         f"({exc}); start its head with the dashboard (`ray start --head "
                         "--include-dashboard true`)") from exc


def stage(app: Application, settings: Settings, into: Path) -> None:
    """The job's working folder: the app and its code_paths as packed for the nodes, and the
    Application with its code_paths pointing at their packed copies."""
    package = pack_app(app.base_dir, skip=[settings.root], code=app.code_modules())
    with zipfile.ZipFile(io.BytesIO(package)) as zf:
        zf.extractall(into)
    shipped = app.model_copy(update={"code_paths": shipped_code(app)})
    (into / RUN_FILE).write_text(shipped.model_dump_json())


def submit(app: Application, run_id: str, settings: Settings) -> str:
    """Hand a recorded (pending) run to the cluster as a Ray job; its job id. The job's
    environment is scanflow's settings (the driver's own environment stays here)."""
    from ray.job_submission import JobSubmissionClient  # lazy: ray

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "uploading package ...": not news
    client = JobSubmissionClient(dashboard_url(settings.ray_address))
    env = {k: v for k, v in settings.child_env().items() if k != "SCANFLOW_WORKSPACE"}
    env.update(SCANFLOW_BACKEND="ray", SCANFLOW_RAY_ADDRESS="auto",  # the job's RAY_ADDRESS
               RAY_USAGE_STATS_ENABLED="0")
    with tempfile.TemporaryDirectory(prefix="scanflow-detach-") as tmp:
        stage(app, settings, Path(tmp))
        return str(client.submit_job(
            entrypoint=f"{settings.ray_python} -m scanflow.engine.ray_jobs {run_id}",
            submission_id=job_id(run_id), entrypoint_num_cpus=0,
            runtime_env={"working_dir": tmp, "env_vars": env},
            metadata={"scanflow_run": run_id, "app": app.app},
        ))


def main(argv: list[str]) -> int:
    """The job's entrypoint: run the recorded run to its end from this working folder."""
    (run_id,) = argv
    work = Path(tempfile.mkdtemp(prefix=f"scanflow-driver-{run_id[:12]}-"))
    try:
        settings = Settings(workspace=work).ensure()
        store = Store(settings.store)
        run = store.get_run(run_id)
        if run is None or run.status != "pending":
            print(f"run {run_id[:12]} is {run.status if run else 'not in the store'}: not started")
            return 0
        app = Application.model_validate_json(Path(RUN_FILE).read_text())
        app = app.model_copy(update={"base_dir": Path.cwd(), "source": run.spec_path})
        engine = RayEngine(settings, store)
        try:
            result = engine.execute(run_id, app, progress=lambda s, st: print(f"{s}: {st}", flush=True))
        finally:
            _keep_logs(engine, settings, run_id)
        print(f"run {run_id} {result.status}")
        return 0 if result.ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _keep_logs(engine: object, settings: Settings, run_id: str) -> None:
    """Each step's log as this driver wrote it, to the parent MLflow run (its folder goes)."""
    assert isinstance(engine, LocalEngine)
    run = engine.store.get_run(run_id)
    if run is None or not run.mlflow_run_id:
        return
    for path in sorted((settings.runs_dir / run_id).glob("*.log")):
        engine.tracker.log_artifact(run.mlflow_run_id, path, LOGS_DIR)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.exit(main(sys.argv[1:]))
