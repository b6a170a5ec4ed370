"""What survives a JSON column, an event payload or `--json`: one conversion for every layer.

numpy scalars and arrays become plain numbers and lists, NaN and infinities become null (JSON has
neither, and PostgreSQL's JSON columns refuse them), mapping keys become strings, tuples lists, and
anything else its `str()` (a datetime, a path), so a payload never fails to serialise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def json_safe(value: Any) -> Any:
    """`value` as plain JSON values (see the module's docstring)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return str(value)
