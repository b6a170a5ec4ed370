"""A service's gunicorn master as a process: how it is started (its own session, so it
outlives the process that deployed it; its log in the service's folder), the modules worth
preloading in it, and the small process helpers the deployer uses."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

WORKER_CLASS = "scanflow.serving.gunicorn_conf.DrainingUvicornWorker"
APP_FACTORY = "scanflow.serving.app:create_app()"
GUNICORN_CONF = Path(__file__).with_name("gunicorn_conf.py")
# Heavy libraries behind MLflow flavours, preloaded by the master (see gunicorn_conf._preload).
FLAVOUR_LIBS = {
    "mlflow.sklearn": ["sklearn", "skops.io"],
    "mlflow.pytorch": ["torch"],
    "mlflow.xgboost": ["xgboost"],
    "mlflow.lightgbm": ["lightgbm"],
    "mlflow.onnx": ["onnxruntime"],
}
# Libraries a version's requirements name, by package: an `mlflow.pyfunc.PythonModel`'s loader
# (`mlflow.pyfunc.model`) says nothing of what it imports when unpickled (torch: ~2-4 s).
REQUIREMENT_LIBS = {
    "torch": ["torch"],
    "scikit-learn": ["sklearn"],
    "xgboost": ["xgboost"],
    "lightgbm": ["lightgbm"],
    "onnxruntime": ["onnxruntime"],
}
BASE_PRELOAD = ["scanflow.serving.app", "mlflow.pyfunc"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_master(host: str, port: int, workdir: Path, log_path: Path,
                 env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start the gunicorn master of one service, bound to `host:port`, appending to `log_path`."""
    cmd = [
        sys.executable, "-m", "gunicorn",
        "-c", str(GUNICORN_CONF),
        "-k", WORKER_CLASS,
        "-b", f"{host}:{port}",
        APP_FACTORY,
    ]
    logf = open(log_path, "ab")
    try:
        return subprocess.Popen(
            cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )
    finally:
        logf.close()


__all__ = ["APP_FACTORY", "BASE_PRELOAD", "FLAVOUR_LIBS", "GUNICORN_CONF", "REQUIREMENT_LIBS", "WORKER_CLASS",
           "free_port", "start_master", "tail"]
