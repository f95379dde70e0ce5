"""The byte floor of every benchmarked op (DESIGN.md section 5), in ONE table.

Bytes per element of the (M, N) input for 16-bit tensors, per-row statistics and (N,) parameters
excluded. A 32-bit run moves twice as many bytes (every counted tensor is in the input dtype).
The forward+backward figure is the sum of the two rows. Time floor = bytes / the device-to-device
copy bandwidth measured in the same run (read + write counted).

Cases (the rows of DESIGN section 5's table, for LayerNorm and RMSNorm each):

    plain         layer_norm / rms_norm                  y = norm(x)
    postln        add_*_norm, Post-LN, no scale          y = norm(x + r)
    postln_scale  add_*_norm, Post-LN, learned scale     y = norm(x + r * s), s: (N,) learned
    preln         add_*_norm, Pre-LN                     (y, h) = (norm(x + r), x + r)

Post-LN without a scale: the table allows 6-8 B forward ("+ h if saved"). fusednorm saves h, so
that its backward reads two tensors (dy, h) instead of three (dy, x, r): 8 B forward, 6 B backward.
Not saving h gives 6 + 8; the forward+backward total, 14 B, is the same either way. We count what
the design moves (8 B): counting 6 would overstate a forward that writes h.
"""

from __future__ import annotations

CASES = ("plain", "postln", "postln_scale", "preln")
DIRECTIONS = ("fwd", "bwd", "fwdbwd")

# (case, direction) -> (bytes per element for 16-bit tensors, what is read and written).
BYTES_16BIT: dict[tuple[str, str], tuple[int, str]] = {
    ("plain", "fwd"): (4, "read x; write y"),
    ("plain", "bwd"): (6, "read dy, x; write dx"),
    ("postln", "fwd"): (8, "read x, r; write y, h (h saved for the backward)"),
    ("postln", "bwd"): (6, "read dy, h; write dh (= dx = dr, written once)"),
    ("postln_scale", "fwd"): (6, "read x, r; write y"),
    ("postln_scale", "bwd"): (10, "read dy, x, r; write dx, dr"),
    ("preln", "fwd"): (8, "read x, r; write y, h"),
    ("preln", "bwd"): (8, "read dy, dh_in, h; write dh"),
}


def bytes_per_element(case: str, direction: str, itemsize: int) -> int:
    """Floor bytes per input element for ``case`` ("plain", ...) and ``direction`` ("fwd", "bwd",
    "fwdbwd") with tensors of ``itemsize`` bytes (2 for bf16/fp16, 4 for fp32)."""
    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    if direction == "fwdbwd":
        return bytes_per_element(case, "fwd", itemsize) + bytes_per_element(case, "bwd", itemsize)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    per16, _ = BYTES_16BIT[(case, direction)]
    # Every counted tensor has the input's dtype, so the count scales with the item size.
    return per16 * itemsize // 2


def floor_bytes(case: str, direction: str, rows: int, cols: int, itemsize: int) -> int:
    """Bytes an (rows, cols) problem must move at least (statistics and parameters excluded)."""
    return bytes_per_element(case, direction, itemsize) * rows * cols


def describe(case: str, direction: str) -> str:
    """What the floor counts, in words (forward+backward: both)."""
    if direction == "fwdbwd":
        return f"{describe(case, 'fwd')} + {describe(case, 'bwd')}"
    return BYTES_16BIT[(case, direction)][1]
