"""One description of a kernel variant: its flags, and every fact that follows from them.

A call of any fusednorm op is one ``Variant`` (which tensors exist, how the residual is scaled,
what the forward stores) applied to tensors of some dtype. Everything that depends only on the
variant is a property here, written once, and read by every layer: the op layer and the autograd
Functions (what is saved), every backend (what is stored, read and written), the tests (the variant
matrix, the byte table), the compile report and the benchmarks. The C++ side mirrors the flag word
and the derived facts once, in csrc/fusednorm.h; tests/test_cuda_host.py checks that the two agree.

The math (DESIGN sections 1-2): h = residual * s + dropout(x); y = Norm(h) * weight + bias.
Adding a flag means: a field here (and its bit in ``FLAG_BITS``), its meaning in the kernels, and its
mirror in fusednorm.h.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Iterator
from functools import lru_cache

import torch


class ScaleKind(enum.IntEnum):
    """How the residual is scaled: h = residual * s + dropout(x)."""

    NONE = 0  # s = 1: the plain residual add of Pre-LN and Post-LN Transformers
    CONSTANT = 1  # s = a Python float, not learned (DeepNorm's alpha)
    SCALAR = 2  # s = a learned 0-d tensor (Admin's omega, one value)
    VECTOR = 3  # s = a learned (N,) tensor (Admin's omega per feature)

    @property
    def learned(self) -> bool:
        return self in (ScaleKind.SCALAR, ScaleKind.VECTOR)


def _as_scale_kind(value: int) -> ScaleKind:
    """``ScaleKind(value)``, without the call when value is one already: torch.compile traces this in the calls it
    compiles, and torch 2.11's dynamo cannot call an enum class there ("Unexpected type in sourceless builder")."""
    return value if type(value) is ScaleKind else ScaleKind(value)


# Bit offsets of the flag word that crosses into C++ (csrc/fusednorm.h: the kFlag* constants).
# SCALE_KIND takes two bits. Never reuse a bit for another meaning: the word is part of the op schema.
FLAG_BITS = {"is_rms": 0, "has_residual": 1, "scale_kind": 2, "has_dropout": 4, "prenorm": 5,
             "residual_f32": 6, "h_f32": 7, "has_weight": 8, "has_bias": 9, "store_stats": 10}
_BOOL_FLAGS = tuple(name for name in FLAG_BITS if name != "scale_kind")


@dataclasses.dataclass(frozen=True)
class Variant:
    """The compile-time facts of one call. Dtypes are not part of it, except the two "float32 beside a
    narrower x" flags: the residual stream may be kept in float32 (``residual_f32``) and the stored h
    may be float32 (``h_f32``, from ``residual_in_fp32``) while x is 16-bit (or float64)."""

    is_rms: bool = False
    has_residual: bool = False
    scale_kind: ScaleKind = ScaleKind.NONE
    has_dropout: bool = False
    prenorm: bool = False  # the caller gets h too: (y, h)
    residual_f32: bool = False  # residual is float32 and x is not
    h_f32: bool = False  # the stored h is float32 and x is not
    has_weight: bool = True
    has_bias: bool = False
    # Telemetry (DESIGN section 7): the forward also writes the (M, STATS_COLUMNS) float32 row statistics
    # of fusednorm.backends.contract. Changes no other output and nothing the backward reads.
    store_stats: bool = False

    def __post_init__(self):
        object.__setattr__(self, "scale_kind", _as_scale_kind(self.scale_kind))
        if not self.has_residual and (self.scale_kind != ScaleKind.NONE or self.residual_f32):
            raise ValueError(f"a residual scale or dtype needs a residual: {self}")
        if self.is_rms and self.has_bias:
            raise ValueError("RMSNorm has no bias")
        if self.h_f32 and not self.store_h:
            raise ValueError(f"h_f32 describes a stored h, but this variant does not store h: {self}")
        if self.residual_f32 and self.store_h and not self.h_f32:
            raise ValueError(f"a stored h keeps the float32 residual stream's dtype: {self}")

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_call(cls, *, is_rms: bool, x_dtype: torch.dtype, residual_dtype: torch.dtype | None,
                  scale_kind: ScaleKind, dropout_p: float, prenorm: bool, residual_in_fp32: bool,
                  has_weight: bool, has_bias: bool, store_stats: bool = False) -> Variant:
        """The variant of a public call, from its (validated) arguments."""
        has_residual = residual_dtype is not None
        learned = _as_scale_kind(scale_kind).learned
        store_h = prenorm or (has_residual and not learned)
        # h keeps the residual stream's dtype, or float32 on request (never narrower than x's float64).
        if residual_in_fp32 and x_dtype != torch.float64:
            h_dtype = torch.float32
        else:
            h_dtype = residual_dtype if has_residual else x_dtype
        return cls(is_rms=is_rms, has_residual=has_residual, scale_kind=scale_kind, has_dropout=dropout_p > 0.0,
                   prenorm=prenorm, residual_f32=has_residual and residual_dtype == torch.float32 != x_dtype,
                   h_f32=store_h and h_dtype == torch.float32 != x_dtype, has_weight=has_weight,
                   has_bias=has_bias and not is_rms, store_stats=store_stats)

    @property
    def flags(self) -> int:
        """The flag word: the variant as one int (an op argument; decoded by ``from_flags`` and C++)."""
        word = int(self.scale_kind) << FLAG_BITS["scale_kind"]
        for name in _BOOL_FLAGS:
            word |= int(getattr(self, name)) << FLAG_BITS[name]
        return word

    @staticmethod
    @lru_cache(maxsize=512)
    def from_flags(word: int) -> Variant:
        """The inverse of ``flags`` (cached: the op layer decodes a word per call)."""
        known = sum(1 << bit for bit in FLAG_BITS.values()) | (1 << (FLAG_BITS["scale_kind"] + 1))
        if word < 0 or word & ~known:
            raise ValueError(f"not a fusednorm variant flag word: {word:#x}")
        fields = {name: bool(word >> FLAG_BITS[name] & 1) for name in _BOOL_FLAGS}
        return Variant(scale_kind=ScaleKind(word >> FLAG_BITS["scale_kind"] & 3), **fields)

    # -- what follows from the flags ---------------------------------------------------------------

    @property
    def learned_scale(self) -> bool:
        """The scale is a tensor that gets a gradient (Admin)."""
        return self.scale_kind.learned

    @property
    def store_h(self) -> bool:
        """The forward writes h and the backward reads it (DESIGN section 5): when the caller gets h
        (Pre-LN), or when there is a residual and no learned scale (Post-LN: the backward then reads
        dy and h instead of dy, x and residual). With a learned scale in the Post-LN layout ds needs x
        and the residual anyway, so h is not stored and the backward rebuilds it in float32."""
        return self.prenorm or (self.has_residual and not self.learned_scale)

    @property
    def dresidual_is_dx(self) -> bool:
        """dresidual equals dx element for element (same dtype, s = 1, no dropout): written once."""
        return (self.has_residual and self.scale_kind == ScaleKind.NONE and not self.has_dropout
                and not self.residual_f32)

    @property
    def store_dresidual(self) -> bool:
        """The backward writes a dresidual tensor of its own."""
        return self.has_residual and not self.dresidual_is_dx

    def residual_dtype(self, x_dtype: torch.dtype) -> torch.dtype | None:
        if not self.has_residual:
            return None
        return torch.float32 if self.residual_f32 else x_dtype

    def h_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the stored (and, with prenorm, returned) h."""
        return torch.float32 if self.h_f32 else x_dtype

    @property
    def saved(self) -> tuple[str, ...]:
        """What the forward saves for the backward, by name, in this order (never a dropout mask, nor the
        row statistics of ``store_stats``):
        h when it is stored, else x (and the residual) to rebuild it; the residual besides h for a
        learned scale in the Pre-LN layout (ds needs it); the parameters the backward reads; the
        per-row float32 statistics; the dropout seed."""
        names = ["h"] if self.store_h else ["x"]
        if self.learned_scale:
            names.append("residual")
        if self.has_weight:
            names.append("weight")
        if self.learned_scale:
            names.append("residual_scale")
        if not self.is_rms:
            names.append("mean")
        names.append("rstd")
        if self.has_dropout:
            names.append("seed")
        return tuple(names)

    def row_tensors(self, direction: str, has_dh_in: bool | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The (M, N) tensors a kernel reads and writes, each once: (reads, writes).

        direction: "fwd" or "bwd". has_dh_in (backward): whether a gradient flows into the returned h
        (default: whenever h is returned). This is DESIGN section 5's byte table, variant by variant
        (``store_stats`` adds only (M,)-sized float32 rows: not an (M, N) tensor).
        """
        if direction == "fwd":
            reads = ("x", "residual") if self.has_residual else ("x",)
            return reads, ("y", "h") if self.store_h else ("y",)
        if direction != "bwd":
            raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
        has_dh_in = self.prenorm if has_dh_in is None else has_dh_in
        reads = ["dy"] + (["dh_in"] if has_dh_in else [])
        if self.store_h:
            reads += ["h"] + (["residual"] if self.learned_scale else [])
        else:
            reads += ["x"] + (["residual"] if self.has_residual else [])
        return tuple(reads), ("dx", "dresidual") if self.store_dresidual else ("dx",)

    def bytes_per_element(self, direction: str, x_dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes moved per element of the (M, N) input: "fwd", "bwd" or "fwdbwd" (the sum). Per-row
        statistics, (N,) parameters and the backward's column partials are not counted."""
        if direction == "fwdbwd":
            return self.bytes_per_element("fwd", x_dtype) + self.bytes_per_element("bwd", x_dtype)
        reads, writes = self.row_tensors(direction)
        return sum(self.itemsize(name, x_dtype) for name in reads + writes)

    def itemsize(self, name: str, x_dtype: torch.dtype) -> int:
        """Bytes per element of the (M, N) tensor ``name`` (x, residual, h, y, dy, dh_in, dx, dresidual)."""
        if name in ("residual", "dresidual"):
            dtype = self.residual_dtype(x_dtype)
        elif name in ("h", "dh_in"):
            dtype = self.h_dtype(x_dtype)
        else:
            dtype = x_dtype
        return dtype.itemsize

    # -- the Triton kernels' constexpr flags (fusednorm/triton/) -------------------------------------

    def triton_forward_flags(self) -> dict:
        return dict(self._triton_common_flags(), STORE_STATS=self.store_stats)

    def triton_backward_flags(self, has_dh_in: bool) -> dict:
        # store_stats is a forward-only fact: the backward of a monitored call is the same kernel.
        return dict(self._triton_common_flags(), HAS_DH_IN=has_dh_in, STORE_DRESIDUAL=self.store_dresidual)

    def _triton_common_flags(self) -> dict:
        return dict(IS_RMS=self.is_rms, HAS_RESIDUAL=self.has_residual, SCALE_KIND=int(self.scale_kind),
                    HAS_DROPOUT=self.has_dropout, STORE_H=self.store_h, HAS_WEIGHT=self.has_weight,
                    HAS_BIAS=self.has_bias)

    # -- names -------------------------------------------------------------------------------------

    @property
    def op(self) -> str:
        """The public function this variant is a call of."""
        return ("add_" if self.has_residual else "") + ("rms_norm" if self.is_rms else "layer_norm")

    @property
    def name(self) -> str:
        """A short readable name, e.g. ``add_layer_norm[vector,prenorm,dropout]``."""
        tags = []
        if self.has_residual:
            tags.append(self.scale_kind.name.lower() if self.scale_kind else "unscaled")
        tags += [tag for tag, on in (("prenorm", self.prenorm), ("dropout", self.has_dropout),
                                     ("residual_f32", self.residual_f32), ("h_f32", self.h_f32),
                                     ("no_weight", not self.has_weight),
                                     ("no_bias", not self.has_bias and not self.is_rms),
                                     ("stats", self.store_stats)) if on]
        return f"{self.op}[{','.join(tags)}]" if tags else self.op


def all_variants() -> Iterator[Variant]:
    """Every variant a public call can produce (x 16-bit, so the float32 flags are meaningful), without
    telemetry: ``store_stats`` can be added to each of them and changes none of their other facts."""
    for is_rms, has_weight, has_bias, has_dropout in itertools.product((False, True), repeat=4):
        if is_rms and has_bias:
            continue
        common = dict(is_rms=is_rms, has_weight=has_weight, has_bias=has_bias, has_dropout=has_dropout)
        yield Variant(**common)
        for kind, prenorm, residual_f32 in itertools.product(ScaleKind, (False, True), (False, True)):
            store_h = prenorm or not kind.learned
            base = Variant(has_residual=True, scale_kind=kind, prenorm=prenorm, residual_f32=residual_f32,
                           h_f32=residual_f32 and store_h, **common)
            yield base
            if store_h and not residual_f32:
                yield dataclasses.replace(base, h_f32=True)  # residual_in_fp32 with a 16-bit residual
