"""Spec errors carry the file and the field's path so a user can find the line to fix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def format_path(loc: Sequence[str | int]) -> str:
    """('workflows', 'train', 'steps', 2, 'after', 0) -> 'workflows.train.steps[2].after[0]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


@dataclass(frozen=True)
class SpecIssue:
    """One problem at `path` in the spec (empty for the whole file: unreadable, not YAML)."""

    path: str
    message: str
    file: str | None = None

    def __str__(self) -> str:
        where = "".join(f"{part}: " for part in (self.file, self.path) if part)
        return f"{where}{self.message}"


class SpecError(ValueError):
    """Raised with every problem found, not only the first."""

    def __init__(self, issues: Sequence[SpecIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))
