"""Everything scanflow asks of MLflow goes through here, so the tracking URI is set in one place.

MLflow is imported inside the functions that use it: it takes ~1.5 s to load, and a tracker is
also built by commands that never track (`scanflow status`, `scanflow stop`).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scanflow.settings import Settings
from scanflow.tracking.base import TAG_APP, TAG_BY, TAG_RUN, TAG_STEP, TAG_TEAM, TAG_WORKFLOW

__all__ = ["TAG_APP", "TAG_RUN", "TAG_STEP", "TAG_TEAM", "TAG_WORKFLOW", "MlflowTracker",
           "configure_mlflow", "log_python_model", "log_sklearn_model"]

TAG_PARENT = "mlflow.parentRunId"

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def configure_mlflow(tracking_uri: str, registry_uri: str | None = None) -> None:
    """Point MLflow's process-wide (fluent) API at our stores, never a default ./mlruns: the one
    place scanflow sets MLflow's global state (in-process steps, the model server, loaders)."""
    import mlflow  # lazy: MLflow, see the module doc

    mlflow.set_tracking_uri(tracking_uri)
    if registry_uri:
        mlflow.set_registry_uri(registry_uri)


class MlflowTracker:
    """The `Tracker` over MLflow: a typed wrapper of one MlflowClient, opened on first use
    (opening creates the tracking database), so that building one costs nothing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.uri = settings.tracking
        self._client: MlflowClient | None = None
        self._opening = threading.Lock()

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            with self._opening:  # two threads must not create the same database at once
                if self._client is None:
                    from mlflow.tracking import MlflowClient  # lazy: MLflow, see the module doc

                    # Ending a run on a tracking server prints its URL, which costs one more
                    # request per run (a `get_run`): scanflow prints its own links.
                    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

                    self._client = MlflowClient(tracking_uri=self.uri,
                                                registry_uri=self.settings.registry_uri)
        return self._client

    # -- this process and child processes -------------------------------------------------------
    def use_in_process(self) -> None:
        """Log through this tracker from this process: the fluent API points here, and the
        connection opens now, so that the first run does not pay for creating the database."""
        configure_mlflow(self.uri, self.settings.registry_uri)
        _ = self.client

    def active_run(self, run_id: str) -> AbstractContextManager[Any]:
        """The run as MLflow's active run (until the `with` ends), for code that logs with
        `mlflow.log_*`."""
        import mlflow  # lazy: MLflow, see the module doc

        return mlflow.start_run(run_id=run_id)

    def step_env(self, experiment_id: str, run_id: str) -> dict[str, str]:
        """What a step process needs so that `mlflow.start_run()` resumes the engine's child run."""
        env = {
            "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_EXPERIMENT_ID": experiment_id,
            "MLFLOW_RUN_ID": run_id,
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        if self.settings.registry_uri:
            env["MLFLOW_REGISTRY_URI"] = self.settings.registry_uri
        return env

    # -- experiments and runs -----------------------------------------------------------------
    def experiment_id(self, app: str, team: str) -> str:
        """One experiment per (app, team); artifacts kept in the workspace for local URIs."""
        from mlflow.exceptions import MlflowException  # lazy: MLflow, see the module doc

        name = f"{app}/{team}"
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if not self.uri.startswith(("http://", "https://", "databricks")):
            path = self.settings.artifacts / app / team
            path.mkdir(parents=True, exist_ok=True)
            location = path.as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created concurrently by another process
            exp = self.client.get_experiment_by_name(name)
            assert exp is not None
            return exp.experiment_id

    def start_run(
        self,
        experiment_id: str,
        name: str,
        tags: dict[str, str],
        params: dict[str, Any] | None = None,
        parent: str | None = None,
    ) -> str:
        if parent:
            tags = {**tags, TAG_PARENT: parent}
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        if params:
            self.log_params(run.info.run_id, params)
        return str(run.info.run_id)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # lazy: MLflow, see the module doc

        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric  # lazy: MLflow, see the module doc

        ts = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()]
        )

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag  # lazy: MLflow, see the module doc

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str) -> None:
        from mlflow.entities import RunStatus  # lazy: MLflow, see the module doc

        mapping = {
            "succeeded": RunStatus.FINISHED,
            "failed": RunStatus.FAILED,
            "cancelled": RunStatus.KILLED,
            "interrupted": RunStatus.KILLED,
            "skipped": RunStatus.KILLED,
        }
        self.client.set_terminated(run_id, RunStatus.to_string(mapping.get(status, RunStatus.FAILED)))

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    def run_metrics(self, run_id: str) -> dict[str, float]:
        return dict(self.client.get_run(run_id).data.metrics)

    def child_runs(self, parent_run_id: str) -> list[Any]:
        parent = self.client.get_run(parent_run_id)
        return list(
            self.client.search_runs(
                [parent.info.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'"
            )
        )

    # -- registry -----------------------------------------------------------------------------
    def registered_models(self) -> set[str]:
        return {m.name for m in self.client.search_registered_models(max_results=1000)}

    def version_by_alias(self, model: str, alias: str) -> str:
        from mlflow.exceptions import MlflowException  # lazy: MLflow, see the module doc

        try:
            return str(self.client.get_model_version_by_alias(model, alias).version)
        except MlflowException as exc:
            raise ValueError(
                f"models:/{model}@{alias} not found in the registry at "
                f"{self.settings.registry_uri or self.uri}: {exc.message}"
            ) from None

    def model_versions(self, model: str) -> list[Any]:
        """Every version of `model`; none for a model not registered (yet) or a registry that
        does not answer (a trigger watching it polls again)."""
        try:
            return list(self.client.search_model_versions(f"name='{model}'"))
        except Exception:  # noqa: BLE001 - a model not registered yet has no versions
            return []

    def latest_version(self, model: str) -> int:
        """The highest version number of `model`, 0 when it has none."""
        return max((int(v.version) for v in self.model_versions(model)), default=0)

    def alias_version(self, model: str, alias: str) -> str | None:
        """The version `model@alias` points to, None when the alias (or model) does not exist."""
        try:
            return self.version_by_alias(model, alias)
        except ValueError:
            return None

    def set_alias(self, model: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(model, alias, str(version))

    def model_version(self, model: str, version: str) -> Any:
        return self.client.get_model_version(model, str(version))

    def download(self, run_id: str, path: str, dst: str) -> str:
        import mlflow.artifacts  # lazy: MLflow, see the module doc

        return mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, dst_path=dst, tracking_uri=self.uri
        )

    def list_artifacts(self, run_id: str, path: str = "") -> list[str]:
        return [f.path for f in self.client.list_artifacts(run_id, path or None)]

    def download_model(self, model: str, version: str, dst: Path | None = None,
                       path: str = "") -> Path:
        """The files of `models:/model/version` (or its file `path`) under `dst` (default: a
        temporary folder), read from where the registry stores them."""
        import mlflow.artifacts  # lazy: MLflow, see the module doc

        uri = self.client.get_model_version_download_uri(model, str(version))
        if path:
            uri = uri.rstrip("/") + "/" + path
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dst) if dst is not None else None,
            tracking_uri=self.uri,
        ))

    def model_loader(self, model: str, version: str) -> str | None:
        """The module that loads the version (its pyfunc `loader_module`, e.g. mlflow.sklearn),
        read from its MLmodel file; None when it does not say."""
        from mlflow.models import Model  # lazy: MLflow, see the module doc

        path = self.download_model(model, version, path="MLmodel")
        loader = Model.load(path).flavors.get("python_function", {}).get("loader_module")
        return str(loader) if loader else None

    def model_requirements(self, model: str, version: str) -> list[str]:
        from mlflow.exceptions import MlflowException  # lazy: MLflow, see the module doc
        from packaging.requirements import InvalidRequirement, Requirement  # lazy: only here, with MLflow

        try:
            path = self.download_model(model, version, path="requirements.txt")
        except (MlflowException, OSError):
            return []
        names = []
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            try:
                names.append(Requirement(line).name.lower().replace("_", "-"))
            except InvalidRequirement:
                continue
        return names


def _register(model_uri: str, registered_name: str) -> str:
    """Register `model_uri` as a new version of `registered_name`, tagged with who made it: the
    active run's app, team and acting user or agent (`scanflow.by`), so the registry says which
    team's run, started by whom, produced each version."""
    import mlflow  # lazy: MLflow, see the module doc

    run = mlflow.active_run()
    tags = {k: v for k, v in (run.data.tags if run is not None else {}).items()
            if k in (TAG_APP, TAG_TEAM, TAG_BY, TAG_RUN) and v}
    return str(mlflow.register_model(model_uri, registered_name, tags=tags or None).version)


def log_python_model(
    model: Any,
    x_example: Any,
    registered_name: str | None = None,
    *,
    name: str = "model",
    code_paths: list[str] | None = None,
    pip_requirements: list[str] | None = None,
) -> tuple[str, str | None]:
    """Log an ``mlflow.pyfunc.PythonModel`` (e.g. a torch network with its pre- and
    post-processing) into the active run, with an explicit signature; register it. -> (uri, version).

    ``code_paths`` are the files that define the model's class: MLflow ships them with the model
    and puts them on ``sys.path`` where it is loaded (the model server, the promotion gate).
    ``pip_requirements`` are written as given; without them MLflow would infer them by loading
    the model in a subprocess, seconds a retrain cannot spare.
    """
    import mlflow.pyfunc  # lazy: MLflow, see the module doc
    from mlflow.models import infer_signature  # lazy: MLflow, see the module doc

    signature = infer_signature(x_example, model.predict(x_example))
    info = mlflow.pyfunc.log_model(
        name=name, python_model=model, signature=signature, code_paths=code_paths,
        pip_requirements=pip_requirements or [f"mlflow=={mlflow.__version__}"],
    )
    version = _register(info.model_uri, registered_name) if registered_name else None
    return info.model_uri, version


def log_sklearn_model(
    model: Any,
    x_example: Any,
    registered_name: str | None = None,
    *,
    name: str = "model",
    pyfunc_predict_fn: str = "predict",
) -> tuple[str, str | None]:
    """Log into the active MLflow run with an explicit signature and requirements (≈2x faster
    than inference); register the returned `model_uri`, as MLflow 3 wants. -> (uri, version)."""
    import mlflow.sklearn  # lazy: MLflow's sklearn flavour, skops, see the module doc
    import sklearn  # lazy: MLflow's sklearn flavour, skops, see the module doc
    import skops  # lazy: MLflow's sklearn flavour, skops, see the module doc
    import skops.io  # lazy: MLflow's sklearn flavour, skops, see the module doc
    from mlflow.models import infer_signature  # lazy: MLflow's sklearn flavour, skops, see the module doc

    signature = infer_signature(x_example, model.predict(x_example))
    # skops (MLflow's safe default) refuses types it does not know; this model was trained by
    # our own step, so the types it holds are the ones we trust.
    trusted = skops.io.get_untrusted_types(data=skops.io.dumps(model))
    info = mlflow.sklearn.log_model(
        model,
        name=name,
        signature=signature,
        pip_requirements=[f"scikit-learn=={sklearn.__version__}", f"skops=={skops.__version__}"],
        pyfunc_predict_fn=pyfunc_predict_fn,
        skops_trusted_types=trusted,
    )
    version = _register(info.model_uri, registered_name) if registered_name else None
    return info.model_uri, version
