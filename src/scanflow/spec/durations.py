"""Durations as a spec writes them (2, 2.5, '500ms', '2s', '1m', '1h').

A leaf module: the spec's models and the service policy both read durations, and neither may
import the other for it.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: float | int | str) -> float:
    """Seconds from 2, 2.5, '500ms', '2s', '1m' or '1h'."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '2s'")
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError("a duration must be positive")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"cannot read {value!r} as a duration (use e.g. 2, '500ms', '2s', '1m')")
    n = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if n <= 0:
        raise ValueError("a duration must be positive")
    return n
