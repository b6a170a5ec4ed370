"""The Ray Serve peer of bench/serving.py: one deployment, one replica, the same sklearn predict.

Runs with the python of bench/.venvs/ray (Ray Serve + the project's scikit-learn version), not the
project's. The model comes as a joblib file written by bench/serving.py from the same fitted
estimator that scanflow and `mlflow models serve` load from the registry.

    python ray_serve_case.py --model model.joblib --port 8123 --tmp /tmp/rayXYZ

Prints `BENCH_READY <url>` once `POST <url>` answers, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import urllib.request
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="joblib file of the fitted estimator")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tmp", required=True, help="Ray's temp/log folder (short path: unix sockets)")
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import ray
    from ray import serve
    from starlette.requests import Request

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)

    @serve.deployment(num_replicas=1)
    class MnistClassifier:
        """The same call as the other systems: `predict` on the rows of {"instances": [...]}."""

        def __init__(self, path: str) -> None:
            import joblib

            self.model = joblib.load(path)

        async def __call__(self, request: Request) -> dict[str, Any]:
            body = await request.json()
            x = np.asarray(body["instances"], dtype=np.float64)
            return {"predictions": self.model.predict(x).tolist()}

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, _temp_dir=args.tmp,
             log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(MnistClassifier.bind(args.model), name="mnist", route_prefix="/predict")
        url = f"http://127.0.0.1:{args.port}/predict"
        body = b'{"instances": [[' + b",".join([b"0.0"] * 784) + b"]]}"
        end = time.monotonic() + 120
        while True:  # the proxy may need a moment after serve.run returns
            try:
                req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > end:
                    raise
            time.sleep(0.2)
        print(f"BENCH_READY {url} ray={ray.__version__}", flush=True)
        while True:
            time.sleep(3600)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
