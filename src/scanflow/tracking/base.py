"""The tracking interface: what scanflow asks of an experiment tracker and model registry.

Engine, serving, control and agents type against `Tracker`; `MlflowTracker` is the one
implementation today and the factory (`scanflow.control.backends.tracker`) builds it. Model
versions and runs are returned as the tracker's own objects (`version`, `run_id`, `tags`...).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

# Tags scanflow puts on every run, so a run found in the tracker leads back to the store.
TAG_RUN = "scanflow.run_id"
TAG_WORKFLOW = "scanflow.workflow"
TAG_STEP = "scanflow.step"
TAG_APP = "scanflow.app"
TAG_TEAM = "scanflow.team"
TAG_BY = "scanflow.by"  # who started the run: person:<user>, agent:<name>, a trigger


class Tracker(Protocol):
    """Experiments per app/team, parent/child runs, and a registry with aliases."""

    uri: str  # where it tracks (an MLflow tracking URI: a server or a local database)

    # -- experiments and runs -----------------------------------------------------------------
    def experiment_id(self, app: str, team: str) -> str:
        """The experiment of (app, team), created on first use."""
        ...

    def start_run(self, experiment_id: str, name: str, tags: dict[str, str],
                  params: dict[str, Any] | None = None, parent: str | None = None) -> str:
        """A new run (a child of `parent` when given); its id."""
        ...

    def log_params(self, run_id: str, params: dict[str, Any]) -> None: ...

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None: ...

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None: ...

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Store `text` as the run's artifact `artifact_file`."""
        ...

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        ...

    def end_run(self, run_id: str, status: str) -> None:
        """Close a run with a scanflow status (succeeded, failed, cancelled...)."""
        ...

    def delete_run(self, run_id: str) -> None:
        """Delete a run made ahead of a step that never ran (MLflow keeps it as deleted)."""
        ...

    def run_metrics(self, run_id: str) -> dict[str, float]: ...

    def child_runs(self, parent_run_id: str) -> list[Any]: ...

    def download(self, run_id: str, path: str, dst: str) -> str:
        """A run's artifact copied under `dst`; the local path."""
        ...

    def list_artifacts(self, run_id: str, path: str = "") -> list[str]:
        """The artifact paths of a run directly under `path` (relative to the run's root), so
        that a contract check can name a missing file without downloading anything."""
        ...

    # -- this process and child processes -------------------------------------------------------
    def active_run(self, run_id: str) -> AbstractContextManager[Any]:
        """`with tracker.active_run(id):` lets code in this process log to that run through the
        tracker's own fluent API (how in-process steps use MLflow)."""
        ...

    def use_in_process(self) -> None:
        """Point this process's fluent tracking API at this tracker (never a default ./mlruns)."""
        ...

    def step_env(self, experiment_id: str, run_id: str) -> dict[str, str]:
        """Environment for a step process, so that its own tracking calls log to `run_id`."""
        ...

    # -- registry -------------------------------------------------------------------------------
    def registered_models(self) -> set[str]: ...

    def model_versions(self, model: str) -> list[Any]:
        """Every version of `model`; none when it is not registered (yet)."""
        ...

    def latest_version(self, model: str) -> int: ...

    def model_version(self, model: str, version: str) -> Any: ...

    def version_by_alias(self, model: str, alias: str) -> str:
        """The version `model@alias` points to; ValueError naming it when there is none."""
        ...

    def alias_version(self, model: str, alias: str) -> str | None:
        """Like `version_by_alias`, None when the alias (or model) does not exist."""
        ...

    def set_alias(self, model: str, alias: str, version: str) -> None: ...

    def download_model(self, model: str, version: str, dst: Path | None = None,
                       path: str = "") -> Path:
        """The files of a model version (or one file of it, `path`) copied locally."""
        ...

    def model_loader(self, model: str, version: str) -> str | None:
        """The Python module that loads the version (how the model server preloads it)."""
        ...

    def model_requirements(self, model: str, version: str) -> list[str]:
        """The package names the version's requirements list (e.g. `torch` for a PythonModel
        whose loader names no library), lower-case; [] when it lists none."""
        ...
