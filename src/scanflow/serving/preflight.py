"""Load a model version in a throw-away process before any worker is asked to serve it.

A worker that fails to boot makes gunicorn halt the whole service, so a rollout never sends
SIGHUP into a version that does not load. The check runs in its own process (a model that
crashes or hangs the interpreter takes only that process down). Starting Python and importing
MLflow and the flavour's libraries cost ~3 s of a ~4 s rollout on this 2-core machine, so a
:class:`Preflight` can keep one process *warm*: started ahead (`warm_up`, e.g. when a retrain
starts), imports done, waiting on stdin for the model's path. Each warm process checks one
model and exits; the next one is started when asked for again.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import IO

# The child: import what loading needs, then load the one path read from stdin (EOF: exit 0,
# so a spare whose owner went away ends on its own).
_CHILD = r"""
import sys
for name in sys.argv[1:]:
    try:
        __import__(name)
    except Exception:
        pass
import mlflow.pyfunc
path = sys.stdin.readline().strip()
if not path:
    sys.exit(0)
mlflow.pyfunc.load_model(path, suppress_warnings=True)
"""


class PreflightFailed(RuntimeError):
    """The model did not load: the last lines the loading process wrote say why."""


class _Loader:
    """One loading process, started now, given a path later."""

    def __init__(self, env: dict[str, str], modules: Sequence[str]) -> None:
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in `check`
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, *modules], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr)

    def check(self, path: str, timeout: float) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(path.encode() + b"\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it died while importing: its stderr says why
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise PreflightFailed(f"loading took longer than {timeout:.0f}s") from None
        finally:
            self.stderr.seek(0)
            err = self.stderr.read().decode(errors="replace")
            self.stderr.close()
        if code != 0:
            tail = err.strip().splitlines()[-10:]
            raise PreflightFailed("\n".join(tail) or f"the loading process exited with {code}")

    def discard(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


class Preflight:
    """Checks that model directories load, in processes of their own, one kept warm on
    request. Thread-safe; a process that owns one may exit at any time (the spare ends when
    its stdin closes)."""

    def __init__(self, env: dict[str, str], modules: Sequence[str] = ()) -> None:
        self.env = env
        self.modules = list(modules)
        self._spare: _Loader | None = None
        self._lock = threading.Lock()

    def warm_up(self, modules: Sequence[str] | None = None) -> None:
        """Start a spare loading process now (no-op when one waits already), importing
        `modules` (e.g. the flavour's libraries) as well as MLflow."""
        with self._lock:
            if modules is not None:
                self.modules = list(modules)
            if self._spare is not None and self._spare.proc.poll() is None:
                return
            self._spare = _Loader(self.env, self.modules)

    def check(self, path: str, timeout: float) -> None:
        """Load the model at `path` (a local MLflow model directory) in the spare process, or
        a new one; raises PreflightFailed with the loader's last lines when it does not load."""
        with self._lock:
            loader, self._spare = self._spare, None
        if loader is None or loader.proc.poll() is not None:
            if loader is not None:
                loader.discard()
            loader = _Loader(self.env, self.modules)
        loader.check(path, timeout)

    def close(self) -> None:
        with self._lock:
            loader, self._spare = self._spare, None
        if loader is not None:
            loader.discard()
