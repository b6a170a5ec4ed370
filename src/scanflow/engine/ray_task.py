"""One attempt of one step, as it runs inside a Ray task on whichever node Ray chose.

The node shares no disk with the driver: the step's inputs are downloaded from the MLflow
artifact store into the task's own temporary folder, its declared outputs are uploaded back
there (on the run's parent MLflow run, under `scanflow/outputs/STEP/NAME`), and its log is
returned to the driver (which keeps it in the shared store, `ray_logs.StepLogKeeper`). The step itself runs
through the local `StepRunner` (the same subprocess, timeout and process-tree code as the local
backend) in the app's folder as the driver zipped it (`pack_app`), unpacked once per node
into the node's own temporary folder (`unpack_app`, `apps_dir`).
This module imports ray only inside what runs on a node (`run_job`, which fetches the package
and spec on a worker's first need; `_node_id` and `node_log`, which ask the runtime where it
runs), so the driver and the tests can import it without Ray.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import os
import pickle
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scanflow.engine.cache import file_digest
from scanflow.engine.journal import Journal
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
    travels apart, once per run (`run_job`'s `shipped`): pickled in every job, a spec of
    1,000 steps cost more than its step."""

    app_key: str  # the digest of the run's pickled application (`worker_app`)
    run_id: str
    workflow: str
    step_name: str  # the step, as the node's copy of the application defines it: the Step
    # itself pickled into every job cost more than a short step's other sending
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
    package_key: str = ""  # `package_digest` of the run's app package: a node that has it
    # unpacked already does not fetch it


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
    """Where the attempt's log goes: under the node's Ray logs folder, where Ray's log API can
    stream it to any reader; in `work` when this worker has no such folder. Not created here:
    the step's process or its first `ctx.log` does, or `Placement` before it publishes the
    node (most short steps write none; a file made and removed per step cost ~0.2 ms)."""
    try:
        import ray  # lazy: present on every node of a cluster that runs this task

        node: Any = ray._private.worker.global_worker.node
        base = Path(node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - a private Ray API: without it there is no live log
        work.mkdir(parents=True, exist_ok=True)
        return work / "step.log"
    path = base / live_log_name(job.run_id, job.step_name, job.attempt)
    _made_dir(path.parent)
    return path


@functools.lru_cache(maxsize=64)
def _made_dir(path: Path) -> None:
    """`path` made (once per worker and folder: a run's attempts on this node share it)."""
    path.mkdir(parents=True, exist_ok=True)


class NodeJournal(Journal):
    """An attempt's journal on its node, in memory: the driver journals the step (and recovers
    from that); here it is read only to find the step's process group when it is cancelled."""

    def __init__(self) -> None:  # noqa: D107 - no file: nothing on the node is recovered
        self.path = Path(os.devnull)
        self.last: dict[str, Any] = {}

    def write(self, step: str, status: str, **fields: Any) -> None:
        self.last.update(fields)

    def close(self, sync: bool = True) -> None:
        pass


PUBLISH_AFTER = 1.0  # seconds an attempt runs before its node is published (see `Placement`)


class Placement:
    """Publishes the node an attempt runs on under its placement key, once it has run for
    `PUBLISH_AFTER` seconds: the driver uses it to see that node die (a worker whose raylet
    died may live on, and Ray then never fails its task), `logs --follow` to find the live log.
    Short attempts never publish: they cost no call to the cluster's GCS. One thread per worker
    publishes (`_publisher`): a thread started per attempt was a third of a short step's time."""

    def __init__(self, key: str, log: Path) -> None:
        self.key, self.log = key, log
        self.node = _node_id()
        self.due = time.monotonic() + PUBLISH_AFTER
        _publisher().start(self)

    def publish(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_put  # lazy: ray

        try:
            with open(self.log, "a"):  # a reader the key sends to the node finds the file
                pass
            _internal_kv_put(self.key, self.node, namespace=PLACEMENTS)
        except Exception:  # noqa: BLE001 - the GCS away: the driver cannot watch this node
            pass

    def stop(self) -> None:
        """No publishing from now (an attempt that ended; the driver removes a published key)."""
        _publisher().stop(self)


class _Publisher:
    """This worker's attempts waiting to be published, and the thread that publishes each when
    it is due, looking every `TICK` seconds (a worker runs one attempt at a time, or a few with
    `max_concurrency`). Nothing wakes it per attempt: a wake-up per short step cost it more
    than the look twice a second."""

    TICK = PUBLISH_AFTER / 2

    def __init__(self) -> None:
        self._due: dict[int, Placement] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name="scanflow-placements").start()

    def start(self, placement: Placement) -> None:
        with self._lock:
            self._due[id(placement)] = placement

    def stop(self, placement: Placement) -> None:
        with self._lock:  # held while publishing: after this, its key is never written
            self._due.pop(id(placement), None)

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK)
            now = time.monotonic()
            with self._lock:
                for p in [p for p in self._due.values() if p.due <= now]:
                    del self._due[id(p)]
                    p.publish()


@functools.cache
def _node_id() -> str:
    """The Ray node this worker runs on (a worker never moves)."""
    import ray  # lazy: present on every node of a cluster that runs this task

    return str(ray.get_runtime_context().get_node_id())


@functools.cache
def _publisher() -> _Publisher:
    return _Publisher()


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


def package_digest(package: bytes) -> str:
    """What an app package is known by on the nodes (its unpacked folder's name)."""
    return hashlib.sha256(package).hexdigest()[:20]


def unpack_app(package: bytes, into: Path) -> Path:
    """The app folder under `into` (a node's `apps_dir`): unpacked once per content, then
    shared by every task of that content on the node (as the app folder is locally)."""
    digest = package_digest(package)
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


def unpacked(key: str, into: Path, fetch: Callable[[], bytes]) -> Path:
    """The app folder of package `key` under `into`, fetched and unpacked if it is not there."""
    home = into / key
    return home if key and home.is_dir() else unpack_app(fetch(), into)


_attempts = itertools.count()  # this worker's attempts, for unique scratch folder names
APPS_KEPT = 8  # unpickled applications a worker keeps (one per recent run)
# app key -> the application and its steps by (workflow, step name)
_apps: OrderedDict[str, tuple[Application, dict[tuple[str, str], Step]]] = OrderedDict()
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


def worker_app(key: str, blob: Callable[[], bytes]) -> Application:
    """The run's application, fetched (`blob`) and unpickled once per worker and run (its
    tasks reuse it)."""
    got = _apps.get(key)
    if got is None:
        app: Application = pickle.loads(blob())
        got = _apps[key] = (app, {(wf, s.name): s for wf, w in app.workflows.items()
                                  for s in w.steps})
        while len(_apps) > APPS_KEPT:
            _apps.popitem(last=False)
    return got[0]


def worker_step(key: str, workflow: str, name: str) -> Step:
    """A step of the application `key` (fetched by `worker_app` first)."""
    return _apps[key][1][(workflow, name)]


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
        point_mlflow_at(job.tracking_uri, job.registry_uri)
        _fluent["key"] = key[:2]
    return settings, tracker


def point_mlflow_at(tracking_uri: str, registry_uri: str | None) -> None:
    """MLflow's fluent API (`mlflow.start_run`, `MlflowClient()`) in a `call:` step of this
    worker logs to the job's server, as in the local engine's process: through MLflow's own
    environment variables, read when the step first imports MLflow, so that a worker whose
    steps never use it does not import it (~2 s of CPU per new worker, on the step's path)."""
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    if registry_uri:
        os.environ["MLFLOW_REGISTRY_URI"] = registry_uri
    else:
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
    if "mlflow" in sys.modules:  # imported already: its process-wide settings win over those
        from scanflow.tracking.mlflow_tracking import configure_mlflow  # lazy: MLflow

        configure_mlflow(tracking_uri, registry_uri)


def run_job(job: StepJob, shipped: list[Any]) -> StepReport:
    """Run one attempt here: fetch inputs, run the step in the unpacked app folder, upload
    outputs; the log goes back to the driver in the report. `shipped` holds the ObjectRefs of
    the run's app package and pickled spec, nested so that Ray does not fetch them for every
    task: a worker fetches each once (`unpacked`, `worker_app`)."""
    import ray  # lazy: present on every node of a cluster that runs this task

    watch_raylet()
    # The attempt's scratch folder, made only when something is put in it (inputs, outputs,
    # staged code, a step that makes its workspace): most short steps need none.
    work = Path(tempfile.gettempdir()) / (f"scanflow-{job.run_id[:12]}-{job.step_name}-"
                                          f"{job.attempt}-{os.getpid()}-{next(_attempts)}")
    log_path = node_log(job, work)
    placement = Placement(job.placement_key, log_path)
    node, host = placement.node, socket.gethostname()
    package_ref, app_ref = shipped
    cwd = str(unpacked(job.package_key, apps_dir(node), lambda: ray.get(package_ref)))
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
            (work / "out").mkdir(parents=True)
        outputs = {name: work / "out" / name for name in job.outputs}
        spec = worker_app(job.app_key, lambda: ray.get(app_ref))
        step = worker_step(job.app_key, job.workflow, job.step_name)
        app = spec.model_copy(update={"base_dir": Path(cwd), "code_paths": shipped_code(spec)})
        importable(app)  # its code_paths, for a `call:` step (a `run:` step: PYTHONPATH, below)
        if app.code_paths:
            work.mkdir(exist_ok=True)  # the staged modules' links go in it
        journal = NodeJournal()
        st = RunState(app, WorkflowRun(id=job.run_id), work, journal, job.experiment, job.parent,
                      False, threading.Event(), {}, code_dir=stage(app, work))
        runner = StepRunner(settings, tracker, _unused_pool(), track=job.track)
        runner.reaper = _reaper
        make_child: StepChild | None = None
        if job.track:  # made ahead by the driver, or here on the step's first log (most log none)
            make_child = StepChild(lambda: tracker.start_run(
                job.experiment or "", step.name, child_tags(st, step.name),
                params=job.params, parent=job.parent))
            make_child.id = job.child
        try:
            if step.run is not None:
                out = runner._run_subprocess(st, step, params, inputs, outputs, log_path,
                                             job.attempt, make_child)
            else:
                assert step.call is not None
                back = os.getcwd()
                os.chdir(cwd)  # relative paths mean the app folder, as for `run:` steps
                try:
                    fn = resolve_callable(step.call, app.base_dir)
                    out = runner._run_callable(st, step, fn, params, inputs, outputs,
                                               log_path, job.attempt, make_child)
                finally:
                    os.chdir(back)
        except BaseException:  # ray.cancel: KeyboardInterrupt; kill what the step started
            pgid = journal.last.get("pgid")
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
                              f"step {step.name} did not write its declared outputs {missing}")
            else:
                for name, p in outputs.items():
                    digests[name] = file_digest(p)  # for the lineage: the driver never sees the file
                    upload(tracker, p, job.outputs[name])
        try:
            log = log_path.read_text(errors="replace")  # the driver keeps it
        except FileNotFoundError:
            log = ""  # the step wrote none
        return StepReport(out.status, out.exit_code, out.error, out.timed_out, out.exception, log,
                          node, host, cwd, {"log_path": str(log_path), "digests": digests,
                                            "child": make_child.id if make_child else None})
    finally:
        placement.stop()
        if work.exists():  # made for this attempt (most short ones make none)
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
