"""The benchmarked cases, each a named ``fusednorm.variant.Variant``, and their byte floor.

The bytes are not written down here: a case's floor is ``Variant.bytes_per_element``, which adds up
the (M, N) tensors of ``Variant.row_tensors`` (DESIGN.md section 5, the one place the byte table is
written), in the dtype each tensor has. Per-row statistics and (N,) parameters are not counted. The
forward+backward figure is the sum of the two. Time floor = bytes / the device-to-device copy
bandwidth measured in the same run (read + write counted).

The cases (DESIGN section 5's rows, for LayerNorm and RMSNorm each):

    norm          layer_norm / rms_norm                  y = norm(x)
    postln        add_*_norm, Post-LN, no scale          y = norm(x + r)
    postln_scale  add_*_norm, Post-LN, learned scale     y = norm(x + r * s), s: (N,) learned
    preln         add_*_norm, Pre-LN                     (y, h) = (norm(x + r), x + r)

Post-LN without a scale: the table allows 6-8 B forward ("+ h if saved"). fusednorm saves h, so
that its backward reads two tensors (dy, h) instead of three (dy, x, r): 8 B forward, 6 B backward.
Not saving h gives 6 + 8; the forward+backward total, 14 B, is the same either way. We count what
the design moves (8 B): counting 6 would overstate a forward that writes h.

``python -m benchmarks.floor`` prints the table (the one in benchmarks/README.md, which a test keeps equal).
"""

from __future__ import annotations

import dataclasses

import torch

from fusednorm.variant import ScaleKind, Variant

DIRECTIONS = ("fwd", "bwd", "fwdbwd")
EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}

# The flags that make each case, besides the norm (LayerNorm's bias is always there).
_CASE_FLAGS = {
    "norm": {},
    "postln": dict(has_residual=True),
    "postln_scale": dict(has_residual=True, scale_kind=ScaleKind.VECTOR),
    "preln": dict(has_residual=True, prenorm=True),
}
CASE_NAMES = tuple(_CASE_FLAGS)


def label(op: str, case: str) -> str:
    """A case's name in the tables and on the command line: "rms_norm", "add_rms_norm/preln"."""
    return op if case == "norm" else f"{op}/{case}"


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked op: a Variant with the name of its row in DESIGN section 5 ("norm", "postln", ...)."""

    name: str
    variant: Variant

    @classmethod
    def make(cls, name: str, is_rms: bool) -> Case:
        if name not in _CASE_FLAGS:
            raise ValueError(f"case must be one of {CASE_NAMES}, got {name!r}")
        return cls(name, Variant(is_rms=is_rms, has_bias=not is_rms, **_CASE_FLAGS[name]))

    @property
    def op(self) -> str:
        return self.variant.op

    @property
    def label(self) -> str:
        return label(self.op, self.name)

    @property
    def eps(self) -> float:
        return EPS["rms_norm" if self.variant.is_rms else "layer_norm"]

    def bytes_per_element(self, direction: str, dtype: torch.dtype) -> int:
        """Floor bytes per input element; direction "fwd", "bwd" or "fwdbwd"."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        return self.variant.bytes_per_element(direction, dtype)

    def floor_bytes(self, direction: str, rows: int, cols: int, dtype: torch.dtype) -> int:
        """Bytes an (rows, cols) problem must move at least (statistics and parameters excluded)."""
        return self.bytes_per_element(direction, dtype) * rows * cols

    def describe(self, direction: str) -> str:
        """What the floor counts, in words (forward+backward: both)."""
        if direction == "fwdbwd":
            return f"{self.describe('fwd')} + {self.describe('bwd')}"
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        reads, writes = self.variant.row_tensors(direction)
        text = f"read {', '.join(reads)}; write {', '.join(writes)}"
        if direction == "bwd" and self.variant.dresidual_is_dx:
            text += " (= dresidual, written once)"
        return text


CASES: tuple[Case, ...] = tuple(Case.make(name, is_rms) for name in CASE_NAMES for is_rms in (False, True))


def case_by_label(text: str) -> Case:
    """The case named ``text`` ("layer_norm", "add_rms_norm/preln", ...); ValueError for an unknown name."""
    for case in CASES:
        if case.label == text:
            return case
    raise ValueError(f"unknown op {text!r}; one of {[c.label for c in CASES]}")


def markdown_table() -> str:
    """The floor of every case as a markdown table, 16-bit tensors (twice that for float32)."""
    lines = ["| case | forward | backward |", "| --- | --- | --- |"]
    for case in CASES:
        if not case.variant.is_rms:  # the same bytes for RMSNorm
            cells = [f"{case.describe(d)}: {case.bytes_per_element(d, torch.bfloat16)} B" for d in ("fwd", "bwd")]
            lines.append(f"| {case.label.replace('layer_norm', '*_norm')} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
