"""Shared by every benchmark worker. Standard library only: peers run in their own virtualenvs."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

MARKER = "BENCH_RESULT "
KINDS = ("chain", "fanout", "subprocess")


def kind_of(case: str) -> str:
    """`chain_500` -> `chain`."""
    kind = case.split("_", 1)[0]
    if kind not in KINDS:
        raise ValueError(f"unknown case {case!r}")
    return kind


def total_steps(case: str, n: int) -> int:
    """Steps a case executes: the fan-out adds a root and a join step to its n branches."""
    return n + 2 if kind_of(case) == "fanout" else n


def noop(prev: Any = None) -> Any:
    """The in-process step: does nothing, hands its input on."""
    return prev


def join(values: list[Any]) -> int:
    """The fan-in step."""
    return len(values)


def run_pass(python: str, prev: Any = None) -> Any:
    """The subprocess step: `python -c pass`."""
    subprocess.run([python, "-c", "pass"], check=True)
    return prev


def read_spec() -> dict[str, Any]:
    """`--spec '{"cases": {"chain_500": 500, ...}, "reps": 3, "workers": 2, "python": "..."}'`."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    return json.loads(ap.parse_args().spec)


def measure(spec: dict[str, Any], run_case: Callable[[str, int], float | dict[str, Any]]) -> dict[str, Any]:
    """Call `run_case(kind, n)` `reps` times per case and collect what it returns.

    `run_case` returns the timed seconds, or a dict with a `seconds` key plus extra measurements
    (each collected into a list under its own key).
    """
    out: dict[str, Any] = {}
    for case, n in spec["cases"].items():
        row: dict[str, Any] = {"steps": total_steps(case, int(n)), "n": int(n), "seconds": []}
        for _ in range(int(spec["reps"])):
            got = run_case(kind_of(case), int(n))
            for key, value in (got if isinstance(got, dict) else {"seconds": got}).items():
                row.setdefault(key, []).append(value)
        out[case] = row
    return out


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def emit(result: dict[str, Any]) -> None:
    """Hand the result back to bench/engine.py as one marked JSON line on stdout."""
    print(MARKER + json.dumps(result), flush=True)
