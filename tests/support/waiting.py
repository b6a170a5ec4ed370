"""The suite's one way to wait for something another process or thread does: poll a condition
(never a fixed sleep), hand back what it found, and fail the test saying what did not happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll `cond()` every `interval` seconds until it returns something truthy, and return that
    (so a caller can unpack what it waited for); fail the test naming `what` after `timeout` s.

    `cond` is checked once more at the deadline, so a slow machine that gets there just in time
    still passes."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} not met within {timeout}s")
        time.sleep(interval)
