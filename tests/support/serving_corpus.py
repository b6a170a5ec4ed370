"""The malformed requests every serving backend must refuse with a clear 4xx (never a 5xx, never
a dead replica): named bad inputs with the status and message expected, deeply nested bodies,
and a seeded fuzz corpus. Shared by the local and the Ray Serve backends' tests."""

from __future__ import annotations

import json
import random

import httpx


def zero_row(n: int = 64) -> list[float]:
    return [0.0] * n


BAD_INPUTS = [
    ("not-json", b'{"instances": [[1, 2', "application/json", 400, "body is not valid JSON: "),
    ("content-type", b'{"instances": []}', "text/plain", 415, "content type 'text/plain'"),
    ("form", b"a=1", "application/x-www-form-urlencoded", 415, "application/json"),
    ("no-instances", json.dumps({"rows": [zero_row()]}).encode(), None, 422, "'instances'"),
    ("not-object", json.dumps([zero_row()]).encode(), None, 422, "body must be an object"),
    ("empty", b'{"instances": []}', None, 422, "instances: empty list"),
    ("not-list", b'{"instances": 5}', None, 422, "instances: expected a list"),
    ("shape", json.dumps({"instances": [zero_row()] * 3 + [zero_row(60)]}).encode(), None, 422,
     "instances[3]: expected 64 values, got 60"),
    ("type", json.dumps({"instances": [zero_row()[:5] + ["abc"] + zero_row()[6:]]}).encode(), None,
     422, "instances[0][5]: expected a number, got 'abc'"),
    ("bool", json.dumps({"instances": [[True] + zero_row(63)]}).encode(), None, 422,
     "instances[0][0]: expected a number, got True"),
    ("null", json.dumps({"instances": [[None] + zero_row(63)]}).encode(), None, 422,
     "instances[0][0]: expected a number, got None"),
    ("nan", b'{"instances": [[0, 0, NaN' + b", 0" * 61 + b"]]}", None, 422,
     "instances[0][2]: expected a finite number, got nan"),
    ("inf", b'{"instances": [[Infinity' + b", 0" * 63 + b"]]}", None, 422,
     "instances[0][0]: expected a finite number, got inf"),
    ("object-instance", json.dumps({"instances": [{"a": 1}]}).encode(), None, 422,
     "instances[0]: expected a list of 64 numbers, got an object"),
    ("deep", b"[" * 5000 + b"]" * 5000, None, 400, "nested deeper than 1024 levels"),
    ("deep-instance", b'{"instances": [' + b"[" * 1020 + b"]" * 1020 + b"]}", None, 422,
     "instances[0]"),
]
DEEP_BODIES = [b"[" * 5000 + b"]" * 5000, b'{"a": ' * 5000 + b"1" + b"}" * 5000,
               b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP64", "data": '
               + b"[" * 1000 + b"1" + b"]" * 1000 + b"}]}"]


def fuzz_bodies(seed: int = 7) -> list[tuple[bytes, str]]:
    """240 random malformed bodies (bytes, content type) plus the deep ones, the same for a seed."""
    rng = random.Random(seed)

    def junk(depth: int = 0) -> object:
        pick = rng.randrange(9 if depth < 3 else 6)
        return [lambda: float(f"{rng.random()}e{rng.randrange(-5, 400)}"), lambda: "x" * rng.randrange(5),
                lambda: None, lambda: rng.choice([True, False]), lambda: rng.randrange(-2**70, 2**70),
                lambda: float("nan"),
                lambda: [junk(depth + 1) for _ in range(rng.randrange(4))],
                lambda: {str(rng.random()): junk(depth + 1) for _ in range(rng.randrange(3))},
                lambda: [rng.random() for _ in range(rng.choice([0, 1, 63, 64, 65, 4096]))]][pick]()

    bodies: list[tuple[bytes, str]] = []
    for _ in range(240):
        kind = rng.randrange(6)
        if kind == 0:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        elif kind == 1:
            raw = json.dumps({"instances": [zero_row()] * 2}).encode()[: rng.randrange(1, 40)]
        elif kind == 2:
            raw = json.dumps({"instances": [junk() for _ in range(rng.randrange(1, 5))]},
                             allow_nan=True).encode()
        elif kind == 3:
            raw = json.dumps(junk(), allow_nan=True).encode()
        elif kind == 4:
            raw = json.dumps({"inputs": [{"name": "input", "shape": junk(2), "datatype": junk(2),
                                          "data": junk(1)}]}, allow_nan=True).encode()
        else:
            raw = json.dumps({"instances": [[rng.random()] * 64] * rng.choice([1, 10_001])}).encode()
        ctype = rng.choice(["application/json", "application/json", "text/plain", "", "image/png"])
        bodies.append((raw, ctype))
    bodies += [(raw, "application/json") for raw in DEEP_BODIES for _ in range(3)]
    return bodies


def send_fuzz(url: str, model: str, seed: int = 7) -> list[int]:
    """Post the fuzz corpus to `url` (a third to the V2 infer path of `model`, the rest to
    /predict); every answer is < 500 with a `detail` when refused. The statuses seen."""
    statuses = []
    with httpx.Client(timeout=60) as client:
        for i, (raw, ctype) in enumerate(fuzz_bodies(seed)):
            path = f"/v2/models/{model}/infer" if i % 3 == 0 else "/predict"
            headers = {"content-type": ctype} if ctype else {}
            r = client.post(f"{url}{path}", content=raw, headers=headers)
            statuses.append(r.status_code)
            assert r.status_code < 500, (path, raw[:200], r.status_code, r.text[:300])
            assert r.status_code == 200 or "detail" in r.json()
    assert {s for s in statuses if s >= 400} >= {400, 413, 415, 422}
    return statuses
