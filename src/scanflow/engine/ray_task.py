"""One attempt of one step, as it runs inside a Ray task on whichever node Ray chose.

The node shares no disk with the driver: the step's inputs are downloaded from the MLflow
artifact store into the task's own temporary folder, its declared outputs are uploaded back
there (on the run's parent MLflow run, under `scanflow/outputs/STEP/NAME`), and its log is
returned to the driver (which keeps it in the shared store, `ray_logs.StepLogKeeper`). The step itself runs
through the local `StepRunner` (the same subprocess, timeout and process-tree code as the local
backend) in the app's folder as the driver zipped it (`pack_app`), unpacked once per node
into the node's own temporary folder (`unpack_app`, `apps_dir`).
This module imports ray only in `Placement` and `node_log`, which ask the runtime where it runs.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import queue
import shutil
import socket
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scanflow.engine.cache import file_digest
from scanflow.engine.journal import Journal, replay
from scanflow.engine.resources import ResourcePool
from scanflow.engine.steps import Outcome, RunState, StepChild, StepRunner, child_tags
from scanflow.procs import GroupReaper, kill_group
from scanflow.settings import Settings
from scanflow.spec.code import importable, stage
from scanflow.spec.loader import resolve_callable
from scanflow.spec.models import Application, Step
from scanflow.store.schema import WorkflowRun

OUTPUTS_DIR = "scanflow/outputs"  # on the parent MLflow run: OUTPUTS_DIR/STEP/NAME
LOGS_DIR = "scanflow/logs"  # on the parent MLflow run: a detached driver's copy, LOGS_DIR/STEP.log
URI_PREFIX = "runs:/"
PARAMS_DIR = "scanflow/params"


def param_uri(parent: str, digest: str, name: str) -> str:
    """Where a `type: path` parameter's file (or folder) named `name` travels to the nodes."""
    return f"{URI_PREFIX}{parent}/{PARAMS_DIR}/{digest}/{name}"


def output_uri(parent: str, step: str, name: str) -> str:
    """Where a step's declared output lives between steps (MLflow's `runs:/` form)."""
    return f"{URI_PREFIX}{parent}/{OUTPUTS_DIR}/{step}/{name}"


def split_uri(uri: str) -> tuple[str, str]:
    """(MLflow run id, artifact path) of an `output_uri`; ValueError for anything else."""
    if not uri.startswith(URI_PREFIX):
        raise ValueError(f"{uri!r} is not a step output stored in MLflow (runs:/RUN/PATH)")
    run_id, _, path = uri[len(URI_PREFIX):].partition("/")
    return run_id, path


@dataclass
class StepJob:
    """What the driver sends to the node for one attempt (pickled by Ray). The application
    travels apart, once per run (`run_job`'s `app_blob`): pickled in every job, a spec of
    1,000 steps cost more than its step."""

    app_key: str  # the digest of the run's pickled application (`app_blob`)
    run_id: str
    step: Step
    params: dict[str, Any]
    inputs: dict[str, str]  # local name -> output_uri of an upstream step
    outputs: dict[str, str]  # declared name -> output_uri to upload to
    attempt: int
    parent: str
    experiment: str | None
    child: str | None  # the step's MLflow child run, made ahead (a `run:` step's process needs it)
    tracking_uri: str
    registry_uri: str | None
    store_url: str
    placement_key: str  # where the node publishes its id (`Placement`)
    path_params: dict[str, str] = field(default_factory=dict)  # param -> URI of the driver's file
    track: bool = True  # without `child`: the step's child run is made here if the step logs


@dataclass
class StepReport:
    """What the node sends back: how the attempt ended, its log, and where it ran."""

    status: str
    exit_code: int | None
    error: str | None
    timed_out: bool
    exception: str | None
    log: str
    node_id: str
    host: str
    cwd: str
    extra: dict[str, Any] = field(default_factory=dict)


PLACEMENTS = "scanflow-placements"  # Ray KV namespace: attempt key -> node id, while it runs
LIVE_LOGS = "scanflow"  # under each node's Ray logs folder: the logs of the attempts running there


def live_log_name(run_id: str, step: str, attempt: int) -> str:
    """Where an attempt's log is on its node, relative to the node's Ray logs folder (what Ray's
    log API takes as `filename`; `ray_logs` streams it from there)."""
    return f"{LIVE_LOGS}/{run_id}/{step}.attempt-{attempt}.log"


def node_log(job: StepJob, work: Path) -> Path:
    """The attempt's log file, created empty under the node's Ray logs folder, where Ray's log
    API can stream it to any reader; in `work` when this worker has no such folder."""
    try:
        import ray  # lazy: present on every node of a cluster that runs this task

        node: Any = ray._private.worker.global_worker.node
        base = Path(node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - a private Ray API: without it there is no live log
        return work / "step.log"
    path = base / live_log_name(job.run_id, job.step.name, job.attempt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


PUBLISH_AFTER = 1.0  # seconds an attempt runs before its node is published (see `Placement`)


class Placement:
    """Publishes the node an attempt runs on under its placement key, once it has run for
    `PUBLISH_AFTER` seconds: the driver uses it to see that node die (a worker whose raylet
    died may live on, and Ray then never fails its task), `logs --follow` to find the live log.
    Short attempts never publish: they cost no call to the cluster's GCS."""

    def __init__(self, key: str) -> None:
        import ray  # lazy: present on every node of a cluster that runs this task

        self.key = key
        self.node = ray.get_runtime_context().get_node_id()
        self._timer = threading.Timer(PUBLISH_AFTER, self._publish)
        self._timer.daemon = True
        self._timer.start()

    def _publish(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_put  # lazy: ray

        try:
            _internal_kv_put(self.key, self.node, namespace=PLACEMENTS)
        except Exception:  # noqa: BLE001 - the GCS away: the driver cannot watch this node
            pass

    def stop(self) -> None:
        """No publishing from now (an attempt that ended; the driver removes a published key)."""
        self._timer.cancel()


NEVER_PACKED = {".git", ".venv", "venv", "__pycache__", ".scanflow", ".pytest_cache", ".mypy_cache"}
MAX_PACKAGE = 256 * 2**20  # bytes: an app folder bigger than this belongs in the artifact store


CODE_DIR = "_code"  # where an app's code_paths modules travel inside its package


def pack_app(base_dir: Path, skip: list[Path], code: dict[str, Path] | None = None) -> bytes:
    """The app folder as a zip (its code and small files), without caches, virtualenvs, VCS
    folders and the folders in `skip` (e.g. a workspace inside it); the modules of its
    `code_paths` (`code`: import name -> file or package folder) under `_code/`."""
    base = base_dir.resolve()
    skipped = {p.resolve() for p in skip}
    buf = io.BytesIO()
    packed: set[str] = set()  # an app packed before (a detached run's) holds its _code/ already

    def add(path: Path, name: str) -> None:
        if name not in packed:
            packed.add(name)
            zf.write(path, name)

    def add_tree(top: Path, prefix: str) -> None:
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d not in NEVER_PACKED and Path(root, d) not in skipped)
            for name in sorted(files):
                path = Path(root, name)
                if not name.endswith(".pyc") and path.is_file():  # not sockets, FIFOs, devices
                    add(path, prefix + path.relative_to(top).as_posix())
            if buf.tell() > MAX_PACKAGE:
                raise ValueError(f"the app folder {base} is over {MAX_PACKAGE // 2**20} MiB zipped; "
                                 "keep data in the artifact store, not next to the spec")

    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        add_tree(base, "")
        for path in (code or {}).values():
            if path.is_dir():
                add_tree(path, f"{CODE_DIR}/{path.name}/")
            else:
                add(path, f"{CODE_DIR}/{path.name}")
    return buf.getvalue()


def shipped_code(app: Application) -> list[str]:
    """`app.code_paths` as they are inside its unpacked package (relative to its folder)."""
    return [f"{CODE_DIR}/{Path(e).name}" for e in app.code_paths]


APPS_DIR = "scanflow-apps"  # under the machine's temporary folder: one folder per Ray node


def apps_dir(node_id: str) -> Path:
    """Where the Ray node `node_id` unpacks app folders. Per node, not per machine: clusters
    that share one machine (tests, demos) then never share, or clean up, each other's."""
    return Path(tempfile.gettempdir()) / APPS_DIR / node_id


def unpack_app(package: bytes, into: Path) -> Path:
    """The app folder under `into` (a node's `apps_dir`): unpacked once per content, then
    shared by every task of that content on the node (as the app folder is locally)."""
    digest = hashlib.sha256(package).hexdigest()[:20]
    home = into / digest
    if not home.is_dir():
        into.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(prefix=f"{digest}-", dir=into))
        with zipfile.ZipFile(io.BytesIO(package)) as zf:
            zf.extractall(part)
        try:
            part.rename(home)
        except OSError:  # another task unpacked it first
            shutil.rmtree(part, ignore_errors=True)
    return home


APPS_KEPT = 8  # unpickled applications a worker keeps (one per recent run)
_apps: OrderedDict[str, Application] = OrderedDict()
_trackers: dict[tuple[str, str | None], Any] = {}
_settings: dict[tuple[str, str | None, str], Settings] = {}
_fluent: dict[str, tuple[str, str | None]] = {}  # the tracker the fluent API points at
_reaper = GroupReaper()  # this worker's: its steps' processes die with it, however it dies
RAYLET_GONE_GRACE = 30.0  # seconds a worker outlives its raylet before it exits (see `watch_raylet`)
_watching: list[threading.Thread] = []


def watch_raylet() -> None:
    """Exit this worker once its raylet (its parent process) has been gone `RAYLET_GONE_GRACE`
    seconds. Ray leaves such a worker running, and with it the step it runs, on a node that has
    left the cluster (the driver has retried the step elsewhere by then: it sees the node dead
    within ~20 s); exiting closes the reaper's pipe, so the step's processes go too."""
    if _watching:
        return
    raylet = os.getppid()

    def watch() -> None:
        gone: float | None = None
        while True:
            time.sleep(1.0)
            if os.getppid() == raylet:
                continue
            gone = gone or time.monotonic()
            if time.monotonic() - gone >= RAYLET_GONE_GRACE:
                os._exit(70)  # the reaper, at its pipe's end, kills the steps' process groups

    _watching.append(threading.Thread(target=watch, daemon=True, name="scanflow-raylet-watch"))
    _watching[0].start()


def worker_app(key: str, blob: bytes) -> Application:
    """The run's application, unpickled once per worker and run (its tasks reuse it)."""
    app = _apps.get(key)
    if app is None:
        app = _apps[key] = pickle.loads(blob)
        while len(_apps) > APPS_KEPT:
            _apps.popitem(last=False)
    return app


def worker_settings(job: StepJob, workspace: Path) -> tuple[Settings, Any]:
    """This attempt's settings (its own workspace) and the worker's MLflow tracker for the
    job's server, kept across tasks: one HTTP connection pool, no settings parsed per task."""
    from scanflow.tracking import MlflowTracker  # lazy: MLflow, loaded by the task only

    key = (job.tracking_uri, job.registry_uri, job.store_url)
    base = _settings.get(key)
    if base is None:
        base = _settings[key] = Settings(workspace=workspace, tracking_uri=job.tracking_uri,
                                         registry_uri=job.registry_uri, store_url=job.store_url,
                                         backend="ray")
    # Its folders are not made here: a step that uses them makes them (`Settings.ensure`), and
    # on this machine's overlay file system each one made cost ~0.7 ms more to remove after.
    settings = base.model_copy(update={"workspace": workspace})
    tracker = _trackers.get(key[:2])
    if tracker is None:
        tracker = _trackers[key[:2]] = MlflowTracker(settings)
    if _fluent.get("key") != key[:2]:
        # MLflow's fluent API (`mlflow.start_run`, `MlflowClient()`) in a `call:` step logs to
        # this job's server, as in the local engine's process
        tracker.use_in_process()
        _fluent["key"] = key[:2]
    return settings, tracker


def run_job(job: StepJob, package: bytes, app_blob: bytes) -> StepReport:
    """Run one attempt here: fetch inputs, run the step in the unpacked app folder, upload
    outputs; the log goes back to the driver in the report."""

    watch_raylet()
    work = Path(tempfile.mkdtemp(prefix=f"scanflow-{job.run_id[:12]}-{job.step.name}-"))
    log_path = node_log(job, work)  # before the node is published: a reader finds the file
    placement = Placement(job.placement_key)
    node, host = placement.node, socket.gethostname()
    cwd = str(unpack_app(package, apps_dir(node)))
    try:
        settings, tracker = worker_settings(job, work / "ws")
        inputs = {}
        for local, uri in job.inputs.items():
            run_id, path = split_uri(uri)
            inputs[local] = Path(tracker.download(run_id, path, str(work / "in" / local)))
        params = dict(job.params)
        for name, uri in job.path_params.items():  # `type: path` params: the driver's files
            run_id, path = split_uri(uri)
            params[name] = tracker.download(run_id, path, str(work / "params" / name))
        if job.outputs:
            (work / "out").mkdir()
        outputs = {name: work / "out" / name for name in job.outputs}
        shipped = worker_app(job.app_key, app_blob)
        app = shipped.model_copy(update={"base_dir": Path(cwd), "code_paths": shipped_code(shipped)})
        importable(app)  # its code_paths, for a `call:` step (a `run:` step: PYTHONPATH, below)
        st = RunState(app, WorkflowRun(id=job.run_id), work, Journal(work / "journal.jsonl"),
                      job.experiment, job.parent, False, threading.Event(), {},
                      code_dir=stage(app, work))
        runner = StepRunner(settings, tracker, _unused_pool(), track=job.track)
        runner.reaper = _reaper
        make_child: StepChild | None = None
        if job.track:  # made ahead by the driver, or here on the step's first log (most log none)
            make_child = StepChild(lambda: tracker.start_run(
                job.experiment or "", job.step.name, child_tags(st, job.step.name),
                params=job.params, parent=job.parent))
            make_child.id = job.child
        try:
            if job.step.run is not None:
                out = runner._run_subprocess(st, job.step, params, inputs, outputs, log_path,
                                             job.attempt, make_child)
            else:
                assert job.step.call is not None
                back = os.getcwd()
                os.chdir(cwd)  # relative paths mean the app folder, as for `run:` steps
                try:
                    fn = resolve_callable(job.step.call, app.base_dir)
                    out = runner._run_callable(st, job.step, fn, params, inputs, outputs,
                                               log_path, job.attempt, make_child)
                finally:
                    os.chdir(back)
        except BaseException:  # ray.cancel: KeyboardInterrupt; kill what the step started
            pgid = replay(st.journal.path).get(job.step.name, {}).get("pgid")
            if pgid:
                kill_group(int(pgid), grace=1.0)
            raise
        finally:
            st.journal.close(sync=False)
        digests: dict[str, str] = {}
        if out.status == "succeeded":
            missing = runner.missing_outputs(outputs)
            if missing:
                out = Outcome("failed", out.exit_code,
                              f"step {job.step.name} did not write its declared outputs {missing}")
            else:
                for name, p in outputs.items():
                    digests[name] = file_digest(p)  # for the lineage: the driver never sees the file
                    upload(tracker, p, job.outputs[name])
        log = log_path.read_text(errors="replace") if log_path.exists() else ""  # the driver keeps it
        return StepReport(out.status, out.exit_code, out.error, out.timed_out, out.exception, log,
                          node, host, cwd, {"log_path": str(log_path), "digests": digests,
                                            "child": make_child.id if make_child else None})
    finally:
        placement.stop()
        discard(work)
        if not log_path.is_relative_to(work):  # kept by the driver and the store from now on
            # (its run's folder stays, empty, with the Ray session's logs: removing it raced
            # with the run's other attempts creating it on this node)
            log_path.unlink(missing_ok=True)


@functools.cache
def _unused_pool() -> ResourcePool:
    """The pool a node's `StepRunner` is built with: Ray admitted the task by its resources,
    and the runner's step methods called here never consult it; made once per worker (reading
    the machine's memory each time was 2 % of a short step's time)."""
    return ResourcePool()


@functools.cache
def _discarded() -> queue.SimpleQueue[Path]:
    """The folders this worker's own thread removes, started on first use."""
    folders: queue.SimpleQueue[Path] = queue.SimpleQueue()

    def remove() -> None:
        while True:
            shutil.rmtree(folders.get(), ignore_errors=True)

    threading.Thread(target=remove, daemon=True, name="scanflow-discard").start()
    return folders


def discard(work: Path) -> None:
    """Remove an attempt's scratch folder after its report has gone back, on this worker's
    own thread: measured, the removal was a tenth of a short step's time on its node, and the
    next step of a chain waited for it."""
    _discarded().put(work)


def upload(tracker: Any, path: Path, uri: str) -> None:
    """A file or a folder to the artifact path of `uri` (a folder keeps its name)."""
    run_id, artifact = split_uri(uri)
    if path.is_dir():
        tracker.client.log_artifacts(run_id, str(path), artifact)
    else:
        tracker.log_artifact(run_id, path, artifact.rsplit("/", 1)[0])


__all__ = ["APPS_DIR", "LOGS_DIR", "OUTPUTS_DIR", "PLACEMENTS", "StepJob", "StepReport", "apps_dir",
           "live_log_name", "output_uri", "pack_app", "param_uri", "run_job", "split_uri", "unpack_app",
           "upload"]
