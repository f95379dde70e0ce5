"""Dropout masks that every backend regenerates from a seed instead of storing them.

The mask of element (row, col) of an (M, N) input is a pure function of (seed, row * N + col):

    r0   = first 32-bit word of Philox4x32-10(counter=(idx_lo, idx_hi, 0, 0), key=(seed_lo, seed_hi))
    keep = (r0 >> 8) >= keep_threshold(p)        # a 24-bit uniform integer against round(p * 2^24)

The comparison is done on integers so that the Triton kernel, the CUDA kernel and this torch
version agree bit for bit (no float conversion that could round differently). The forward draws the
seed from torch's generator on the input's device, so ``torch.manual_seed`` reproduces a run; the
backward regenerates the very same mask from the saved seed and never stores it.

On the CPU the mask is written by compiled code, ``fusednorm._philox_cpu`` (csrc/cpu/philox.c, an optional
extension built by setup.py), ~5 ns per element on one core; where it was not built the torch definition
below builds it from int64 tensors (the same bits, ~50x slower, ~20 bytes per element of temporaries).
"""

from __future__ import annotations

import torch

try:
    from . import _philox_cpu
except ImportError:  # not built (no C compiler at install time): the torch definition below
    _philox_cpu = None

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
_U32 = 0xFFFFFFFF
# Bits of the uniform integer compared against p: 24, so that the threshold is exact in float32 too.
KEEP_BITS = 24


def keep_threshold(p: float) -> int:
    """The integer threshold t with keep = (r0 >> 8) >= t; P(keep) = 1 - t / 2^24 ~= 1 - p."""
    return int(round(float(p) * (1 << KEEP_BITS)))


def draw_seed(device: torch.device | str) -> torch.Tensor:
    """One int64 seed, shape (1,), drawn from torch's generator on ``device`` (no host sync)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a, b < 2^32, so a * b < 2^64: int64 wraps modulo 2^64 and keeps every bit of the product.
    prod = b * a
    return (prod >> 32) & _U32, prod & _U32


def philox_r0(seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """First output word of Philox4x32-10 for int64 ``index`` under int64 ``seed`` (shape (1,)).

    Returns int64 values in [0, 2^32).
    """
    seed = seed.to(torch.int64).reshape(())
    k0 = seed & _U32
    k1 = (seed >> 32) & _U32
    c0 = index & _U32
    c1 = (index >> 32) & _U32
    c2 = torch.zeros_like(index)
    c3 = torch.zeros_like(index)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _U32
        k1 = (k1 + PHILOX_KEY_B) & _U32
    return c0


def dropout_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The boolean keep mask, shape (rows, cols), that every backend uses for this seed and p.

    ``seed`` is the int64 tensor of shape (1,) that the forward drew; the mask is built on its device.
    """
    if _philox_cpu is not None and type(seed) is torch.Tensor and seed.device.type == "cpu":
        # A CPU seed is read on the host without a device sync; a fake or traced seed never gets here.
        keep = torch.empty((rows, cols), dtype=torch.bool, device=seed.device)
        _philox_cpu.keep_mask(int(seed.reshape(())), 0, rows * cols, keep_threshold(p), keep.data_ptr())
        return keep
    index = torch.arange(rows * cols, dtype=torch.int64, device=seed.device).reshape(rows, cols)
    return (philox_r0(seed, index) >> (32 - KEEP_BITS)) >= keep_threshold(p)
