"""The ray backend: every step of a run is a Ray task on a cluster that shares no disk with
this driver.

The driver is the local engine's machinery unchanged (`Scheduler`, `RunLoop`, the journal, the
cache, params, retries with backoff, the store records, MLflow lineage); only where one
attempt of a step runs differs: `RayStepRunner` sends it to a node as `ray_task.run_job` with
the step's `resources` as Ray's `num_cpus`, `memory`, `num_gpus` and `resources`, and the
app's folder zipped into Ray's object store once per run (unpacked once per node). Step
outputs are named by MLflow artifact URIs (`runs:/PARENT/scanflow/outputs/STEP/NAME`), never
by a path on the driver. A step no alive node can fit is refused at submit (`ParamError`).
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from functools import lru_cache
from pathlib import Path
from typing import Any

from scanflow.engine.local import LocalEngine
from scanflow.engine.logs import step_logs
from scanflow.engine.ray_address import ClusterUnavailable, probe
from scanflow.engine.ray_logs import RayLiveLogs, StepLogKeeper, StoreStepLogs
from scanflow.engine.ray_task import (
    PLACEMENTS,
    PUBLISH_AFTER,
    URI_PREFIX,
    StepJob,
    StepReport,
    output_uri,
    pack_app,
    package_digest,
    param_uri,
    run_job,
    split_uri,
    upload,
)
from scanflow.engine.resources import ResourcePool
from scanflow.engine.steps import Outcome, RunState, StepChild, StepRunner
from scanflow.settings import Settings
from scanflow.spec.models import Step, StepResources
from scanflow.store import Store
from scanflow.tracking import Tracker

WAIT_POLL = 0.25  # seconds between looks at a run's cancel flag while its step runs
CANCEL_GRACE = 5.0  # seconds a cancelled task has to stop its step before its worker is killed
FIT_CHECK = 5.0  # seconds between checks that some alive node still fits a waiting step
# A `ray://` client gets its own server process from the head's client proxy; on a loaded head
# that process can die while starting, and a new attempt works. Ray reports it as one of these
# (the second when the proxy finds the process already a zombie: seen in CI under load).
CLIENT_SERVER_FAILED = ("Starting Ray client server failed", "ZombieProcess")
CLIENT_ATTEMPTS = 3
PACKAGES_KEPT = 4  # app packages (one per run, <= 256 MiB) this driver keeps in the object store


def connect(address: str) -> None:
    """Join the cluster at `address` unless this process already did (quietly: the steps'
    output goes to their logs, not to this terminal)."""
    try:
        import ray  # lazy: only the ray backend loads ray
    except ImportError as exc:
        raise ClusterUnavailable("the ray backend needs Ray on this machine and on every node: "
                                 "pip install 'scanflow[ray]'") from exc

    if ray.is_initialized():
        return
    probe(address)
    # Ray's driver installs a SIGTERM handler of its own that ends the process with no Python
    # cleanup (finally blocks, atexit): a demo or a run stopped with SIGTERM would leave what it
    # started. The process's own handler is put back.
    main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if main else None
    for attempt in range(1, CLIENT_ATTEMPTS + 1):
        try:
            ray.init(address=address, namespace="scanflow", logging_level=logging.WARNING,
                     log_to_driver=False)
            if on_term is not None:
                signal.signal(signal.SIGTERM, on_term)
            return
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if attempt < CLIENT_ATTEMPTS and any(m in str(exc) for m in CLIENT_SERVER_FAILED):
                ray.shutdown()  # forget the half-made client connection
                continue  # the proxy starts a fresh server process, on another port, per attempt
            raise ClusterUnavailable(
                f"cannot join the Ray cluster at {address!r} (SCANFLOW_RAY_ADDRESS): {exc}; start "
                "one with `ray start --head` or point SCANFLOW_RAY_ADDRESS at it") from exc


def ray_request(res: StepResources) -> dict[str, float]:
    """A step's resources as the amounts Ray schedules by (its node resource names)."""
    need = {"CPU": res.cpus, "GPU": res.gpus, "memory": float(res.memory), **res.custom}
    return {k: v for k, v in need.items() if v > 0}


def unfit(need: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """Why no node among `nodes` (their total resources) can ever run a task asking `need`."""
    if any(all(total.get(k, 0.0) >= v for k, v in need.items()) for total in nodes):
        return None
    asked = ", ".join(f"{k} {_amount(k, v)}" for k, v in need.items())
    offered = "; ".join(", ".join(f"{k} {_amount(k, total.get(k, 0.0))}" for k in need)
                        for total in nodes) or "no alive node"
    return f"asks for {asked}, which no node of the Ray cluster offers (nodes: {offered})"


def alive_nodes() -> dict[str, dict[str, float]]:
    """Node id -> total resources, of each alive node of the cluster this process joined."""
    import ray  # lazy: only the ray backend loads ray

    return {n["NodeID"]: {k: float(v) for k, v in n["Resources"].items()}
            for n in ray.nodes() if n["Alive"]}


def placed_on(key: str) -> str | None:
    """The node a running attempt published (`ray_task.Placement`), once it has run a while."""
    from ray.experimental.internal_kv import _internal_kv_get  # lazy: ray

    node = _internal_kv_get(key, namespace=PLACEMENTS)
    return node.decode() if node else None


def _amount(name: str, value: float) -> str:
    return f"{value / 2**20:.0f} MiB" if name == "memory" else f"{value:g}"


def task_options(step: Step) -> dict[str, Any]:
    """Ray options of one step's task: its resources; retries stay the driver's."""
    res = step.resources
    opts: dict[str, Any] = {
        "num_cpus": res.cpus, "num_gpus": res.gpus, "resources": dict(res.custom),
        "max_retries": 0,  # retries are the step's `retries:` policy, counted by the driver
    }
    if res.memory:
        opts["memory"] = res.memory
    if step.call is not None and step.timeout is not None:
        opts["max_calls"] = 1  # a timed-out callable leaves a thread: do not reuse the worker
    return opts


@lru_cache(maxsize=1)
def _remote_run_job() -> Any:
    import ray  # lazy: only the ray backend loads ray

    return ray.remote(run_job)


class RayStepRunner(StepRunner):
    """Runs each attempt of a step as a Ray task; the driver keeps retries, the cache and the
    journal. Admission is Ray's scheduler, not the local resource pool."""

    def __init__(self, settings: Settings, tracker: Tracker, pool: ResourcePool, track: bool, *,
                 logs: StepLogKeeper) -> None:
        super().__init__(settings, tracker, pool, track)
        self.logs = logs  # ended attempts' logs, to the shared store
        # run id -> ObjectRefs of its app folder (zipped) and its pickled spec, and their keys
        self._packages: OrderedDict[str, tuple[Any, Any, str, str]] = OrderedDict()
        self._packing = threading.Lock()
        self._shipped: dict[tuple[str, str], str] = {}  # (run id, driver path) -> its param URI

    def _path_params(self, st: RunState, step: Step, params: dict[str, Any]) -> dict[str, str]:
        """The step's `type: path` params that name a file or folder on the driver (relative
        to the app folder, as a local step reads them), uploaded once per run to the parent
        MLflow run; the node downloads each and gets its own path. A path the driver does not
        have is passed on as it is (it may exist on the nodes, e.g. a mounted volume)."""
        wf = st.app.workflow(st.run.workflow)
        specs = {**wf.params, **step.params}
        out: dict[str, str] = {}
        for name, spec in specs.items():
            value = params.get(name)
            if spec.type != "path" or not value:
                continue
            local = (st.app.base_dir / str(value)).resolve()
            if not local.exists():
                continue
            with self._packing:
                uri = self._shipped.get((st.run.id, str(local)))
                if uri is None:
                    digest = hashlib.sha256(str(local).encode()).hexdigest()[:12]
                    assert st.parent is not None
                    uri = param_uri(st.parent, digest, local.name)
                    upload(self.tracker, local, uri)
                    self._shipped[(st.run.id, str(local))] = uri
            out[name] = uri
        return out

    def _package(self, st: RunState) -> tuple[Any, Any, str, str]:
        """The run's app folder, zipped, and its spec, pickled, once per run and put in Ray's
        object store (every node gets them from there; the workspace is left out of the folder
        when it lies inside), with their keys (`ray_task.unpacked`, `ray_task.worker_app`)."""
        import ray  # lazy: only the ray backend loads ray
        from ray import cloudpickle  # lazy: ray; a spec built in code may hold a local function

        with self._packing:
            got = self._packages.get(st.run.id)
            if got is None:
                blob = cloudpickle.dumps(st.app)
                package = pack_app(st.app.base_dir, skip=[self.settings.root],
                                   code=st.app.code_modules())
                got = self._packages[st.run.id] = (
                    ray.put(package), ray.put(blob), hashlib.sha256(blob).hexdigest()[:24],
                    package_digest(package))
                while len(self._packages) > PACKAGES_KEPT:
                    self._packages.popitem(last=False)
            return got

    def run_step(self, st: RunState, step: Step, params: dict[str, Any], inputs: dict[str, Path],
                 outputs: dict[str, Path]) -> Outcome:
        if st.cancel.is_set():
            return Outcome("cancelled", error="the run was cancelled before it started")
        return self._run_step_admitted(st, step, params, inputs, outputs)

    def input_identities(self, inputs: dict[str, Path]) -> dict[str, str]:
        # The inputs are not on this machine: an output's URI names the step run that wrote
        # it (a cached upstream keeps its first run's URI, so downstream keys still match).
        return {k: str(p) for k, p in inputs.items()}

    def missing_outputs(self, outputs: dict[str, Path]) -> list[str]:
        return []  # checked on the node, before the outputs are uploaded

    def runs_here(self, step: Step) -> bool:
        return False  # on a node: the loop keeps polling the run's cancel flag while it waits

    def run_ended(self, st: RunState) -> None:
        self.logs.flush()  # every ended attempt's log in the store before the run is recorded

    def outputs_exist(self, paths: Iterable[str | Path]) -> bool:
        for p in paths:
            uri = str(p)
            if not uri.startswith(URI_PREFIX):
                return False  # a path on some machine: not reachable from the cluster
            run_id, path = split_uri(uri)
            try:
                if path not in self.tracker.list_artifacts(run_id, path.rsplit("/", 1)[0]):
                    return False
            except Exception:  # noqa: BLE001 - a run or artifact gone: not reusable
                return False
        return True

    def _run_subprocess(self, st: RunState, step: Step, params: dict[str, Any],
                        inputs: dict[str, Path], outputs: dict[str, Path], log_path: Path,
                        attempt: int, make_child: StepChild | None) -> Outcome:
        return self._on_cluster(st, step, params, inputs, outputs, log_path, attempt, make_child)

    def _run_callable(self, st: RunState, step: Step, fn: Any, params: dict[str, Any],
                      inputs: dict[str, Path], outputs: dict[str, Path], log_path: Path,
                      attempt: int, make_child: StepChild | None) -> Outcome:
        return self._on_cluster(st, step, params, inputs, outputs, log_path, attempt, make_child)

    def _on_cluster(self, st: RunState, step: Step, params: dict[str, Any],
                    inputs: dict[str, Path], outputs: dict[str, Path], log_path: Path,
                    attempt: int, make_child: StepChild | None) -> Outcome:
        assert st.parent is not None, "the ray backend needs tracking (outputs travel through MLflow)"
        key = f"{st.run.id}/{step.name}/{attempt}"
        # A `run:` step's process needs its child run's id (made ahead, `ChildRuns`); a `call:`
        # step's is made on the node only if the step logs, and its id comes back in the report.
        child = None
        if make_child is not None:  # made ahead, or by an earlier attempt
            child = make_child() if step.run is not None else make_child.id
        package, app_ref, app_key, package_key = self._package(st)
        job = StepJob(app_key, st.run.id, st.run.workflow, step.name, params,
                      {k: str(v) for k, v in inputs.items()}, {k: str(v) for k, v in outputs.items()},
                      attempt, st.parent, st.exp,
                      child, self.settings.tracking, self.settings.registry_uri,
                      self.settings.store, key, self._path_params(st, step, params),
                      track=make_child is not None, package_key=package_key)
        ref = _remote_run_job().options(**task_options(step)).remote(job, [package, app_ref])
        submitted = time.monotonic()
        try:
            out = self._wait(st, step, ref, key, attempt, log_path)
            if out.mlflow_run_id and make_child is not None and make_child.id is None:
                make_child.id = out.mlflow_run_id  # made on the node; the driver ends it
            return out
        finally:
            if time.monotonic() - submitted >= PUBLISH_AFTER:  # its node may have published it
                from ray.experimental.internal_kv import _internal_kv_del  # lazy: ray

                _internal_kv_del(key, namespace=PLACEMENTS)

    def _lost(self, step: Step, key: str, attempt: int, log_path: Path) -> Outcome | None:
        """A failed outcome when the attempt can no longer finish: its node died (its task
        would never be failed by Ray when the worker outlives its raylet), or no alive node
        fits the step any more (it would wait forever)."""
        nodes = alive_nodes()
        node = placed_on(key)
        if node is not None and node not in nodes:
            with open(log_path, "a") as f:
                f.write(f"--- attempt {attempt} on Ray node {node[:12]}: the node died ---\n")
            return Outcome("failed", None, f"step {step.name}: its Ray node {node[:12]} died while "
                           f"it ran (attempt {attempt})")
        why = unfit(ray_request(step.resources), list(nodes.values()))
        if why:
            return Outcome("failed", None, f"step {step.name} {why} any more (a node left the "
                           "cluster while it waited)")
        return None

    def _wait(self, st: RunState, step: Step, ref: Any, key: str, attempt: int,
              log_path: Path) -> Outcome:
        """The attempt's outcome, cancelling its task when the run is cancelled."""
        import ray  # lazy: only the ray backend loads ray
        from ray.exceptions import RayError, TaskCancelledError  # lazy: ray

        # Completed by Ray's own callback when the task ends: no `ray.wait` per in-flight step
        # (32 threads polling it were a third of the driver's time on a fan-out).
        done = ref.future()
        cancelled_at: float | None = None
        checked = time.time()
        try:
            while True:
                try:
                    rep: StepReport = done.result(timeout=WAIT_POLL)
                    break
                except FutureTimeout:
                    pass
                if st.cancel.is_set() and cancelled_at is None:
                    cancelled_at = time.time()
                    ray.cancel(ref)  # KeyboardInterrupt in the task: it kills the step's process tree
                elif cancelled_at is not None and time.time() - cancelled_at > CANCEL_GRACE:
                    ray.cancel(ref, force=True)
                    rep = done.result()  # raises: the task was killed
                    break
                elif cancelled_at is None and time.time() - checked > FIT_CHECK:
                    checked = time.time()
                    lost = self._lost(step, key, attempt, log_path)
                    if lost is not None:
                        try:
                            ray.cancel(ref, force=True)
                        except RayError:
                            pass  # its worker is out of reach with its node: nothing more to stop
                        return lost
        except TaskCancelledError:
            return Outcome("cancelled", None, "cancelled by request")
        except RayError as exc:
            with open(log_path, "a") as f:
                f.write(f"--- attempt {attempt}: its Ray task failed ---\n{exc}\n")
            cause = getattr(exc, "cause", None) or exc
            return Outcome("failed", None, f"step {step.name}: its Ray task failed: "
                           f"{type(cause).__name__}: {cause}")
        ended = f"exit code {rep.exit_code}" if rep.exit_code is not None else rep.status
        if rep.log:
            self.logs.keep(st.run.id, step.name, attempt, rep.log)
        with open(log_path, "a") as f:
            f.write(f"--- attempt {attempt} on Ray node {rep.node_id[:12]} ({rep.host}, "
                    f"working dir {rep.cwd}): {ended} ---\n{rep.log}")
        error = rep.error.replace(rep.extra["log_path"], str(log_path)) if rep.error else None
        return Outcome(rep.status, rep.exit_code, error, timed_out=rep.timed_out,
                       exception=rep.exception, digests=dict(rep.extra.get("digests") or {}),
                       mlflow_run_id=rep.extra.get("child"))


class RayEngine(LocalEngine):
    """The `Engine` on a Ray cluster: the local engine's records, runs and API, with each step
    attempt a Ray task (see the module doc). Tracking cannot be off: outputs travel through
    the MLflow server's artifact store."""

    def __init__(self, settings: Settings, store: Store, tracker: Tracker | None = None,
                 concurrency: int | None = None, *, track: bool = True,
                 pool: ResourcePool | None = None) -> None:
        if not track:
            raise ValueError("the ray backend needs tracking on: step outputs travel between "
                             "nodes through the MLflow server's artifact store")
        connect(settings.ray_address)
        super().__init__(settings, store, tracker, concurrency or settings.ray_in_flight, track=True,
                         pool=pool)
        self.runner = RayStepRunner(self.settings, self.tracker, self.pool, True,
                                    logs=StepLogKeeper(store))

    def logs(self, run_id: str, step: str | None = None, *, follow: bool = False,
             poll: float = 0.3) -> Iterator[tuple[str, str]]:
        """As the local engine's, and with `follow` a running attempt's log live from its node."""
        live = RayLiveLogs(self.settings.ray_address) if follow else None
        return step_logs(self.store, self.settings.runs_dir, run_id, step, follow=follow, poll=poll,
                         live=live, remote=StoreStepLogs(self.tracker, self.store))

    def _unfit_check(self) -> Callable[[Step], str | None]:
        # The cluster's nodes read once per submitted run, not once per step: each read is a
        # call to the GCS (~2 ms here; a third of the driver's busy time on a 200-step chain).
        nodes = list(alive_nodes().values())
        return lambda step: unfit(ray_request(step.resources), nodes)

    def _output_paths(self, run_dir: Path, parent: str | None, step: Step) -> dict[str, Path]:
        assert parent is not None, "the ray backend needs tracking (outputs travel through MLflow)"
        return {o: Path(output_uri(parent, step.name, o)) for o in step.outputs}


__all__ = ["ClusterUnavailable", "RayEngine", "RayStepRunner", "connect", "ray_request",
           "task_options", "unfit", "alive_nodes"]
