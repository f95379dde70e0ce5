"""What a patch function did to a model: one record per module it swapped, fused or left, and why.

Every patch function (``fusednorm.replace_norms``, ``fuse_model``, ``patch_post_ln``) takes
``report=PatchReport()`` to fill, and logs a one-line summary on the ``"fusednorm"`` logger (INFO; a
WARNING when it found nothing to do)::

    report = PatchReport()
    fuse_model(model, report=report)
    print(report)            # the summary line, then one line per record
    report.left              # [(name, class, reason), ...] of what was not changed
"""

from __future__ import annotations

import collections
import logging
from typing import NamedTuple

logger = logging.getLogger("fusednorm")

SWAPPED, FUSED, CHANGED, LEFT = "swapped", "fused", "changed", "left"
ACTIONS = (SWAPPED, FUSED, CHANGED, LEFT)


class PatchRecord(NamedTuple):
    """One module: its qualified name, its class name, the action and the detail (what it became, which
    adds were fused, what was changed, or why it was left)."""

    name: str
    cls: str
    action: str
    detail: str


class PatchReport:
    """Records of one or more patch calls on a model, in the order they were made."""

    def __init__(self) -> None:
        self.records: list[PatchRecord] = []

    def add(self, name: str, module: object, action: str, detail: str) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        cls = module if isinstance(module, str) else type(module).__name__
        self.records.append(PatchRecord(name, cls, action, detail))

    def of(self, action: str) -> list[PatchRecord]:
        return [r for r in self.records if r.action == action]

    @property
    def swapped(self) -> list[PatchRecord]:
        return self.of(SWAPPED)

    @property
    def fused(self) -> list[PatchRecord]:
        return self.of(FUSED)

    @property
    def left(self) -> list[PatchRecord]:
        return self.of(LEFT)

    def summary(self) -> str:
        """One line: counts per action, with the classes involved."""
        parts = []
        for action in ACTIONS:
            records = self.of(action)
            if records:
                classes = collections.Counter(r.cls for r in records)
                listed = ", ".join(f"{n} {c}" for c, n in classes.most_common())
                parts.append(f"{action} {len(records)} ({listed})")
        return "; ".join(parts) if parts else "nothing found to swap or fuse"

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += [f"  {r.action:8s}{r.name or '<root>'} ({r.cls}): {r.detail}" for r in self.records]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PatchReport({self.summary()})"


def log_summary(what: str, report: PatchReport, start: int = 0) -> None:
    """Log the records from ``start`` on as one line: WARNING when nothing was swapped or fused."""
    part = PatchReport()
    part.records = report.records[start:]
    changed = part.swapped or part.fused
    logger.log(logging.INFO if changed else logging.WARNING, "fusednorm %s: %s", what, part.summary())
