"""Which cases each backend runs: the case matrices of tests/test_correctness.py and ``python -m fusednorm.check``,
generated from the variant matrix (``fusednorm.testing.case_variants``: every variant a public call can produce).

Where a backend is fast (torch; triton and cuda on a GPU) the matrix is the whole variant matrix at every
dtype (on a GPU also wide rows, many rows and float64). Where it is slow (the Triton interpreter, the CPU
emulation of the CUDA kernels) it is pruned, each pruning written once below with its reason. Within a
matrix the width, the leading shape and a weight_offset of 1 rotate over the cases (``cases_of``): every
width meets every dtype and every flag, without the product. tests/test_correctness.py checks what each
matrix covers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from .testing import Case, case_variants, variant
from .variant import ScaleKind, Variant

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# (x dtype, parameter dtype; None: x's): mixed precision keeps the parameters in float32 under 16-bit x.
DTYPES = ((F32, None), (F16, None), (BF16, None), (F16, F32), (BF16, F32))


def realizable(v: Variant, dtype: torch.dtype) -> bool:
    """Whether the matrices run ``v`` with x in ``dtype``: the float32 residual/h flags describe a narrower
    x, so float32 and float64 x run only the variants without them (tests/test_reliability.py checks a
    float32 residual beside float64 x)."""
    return dtype not in (F32, F64) or not (v.residual_f32 or v.h_f32)


def cases_of(variants: Iterable[Variant], dtypes, widths=(7,), leads=((4,),),
             one_dtype: bool = False) -> Iterator[Case]:
    """Cases of ``variants`` at each of ``dtypes`` where ``realizable`` (with ``one_dtype``: at one of them,
    rotating over the variants). The width, the leading shape and the weight_offset (0, 1 or 0 where there
    is a weight) rotate over the cases like the digits of a counter: every combination of them comes once in
    each run of len(widths) * len(leads) * 3 cases."""
    i = j = 0
    for v in variants:
        options = [(d, p) for d, p in dtypes if realizable(v, d)]
        if one_dtype and options:
            options, j = [options[j % len(options)]], j + 1
        for dtype, pdt in options:
            shape = (*leads[i // len(widths) % len(leads)], widths[i % len(widths)])
            offset = 1.0 if v.has_weight and i // (len(widths) * len(leads)) % 3 == 1 else 0.0
            yield Case(v, shape, dtype, pdt, eps=1e-6 if v.is_rms else 1e-5, weight_offset=offset)
            i += 1


def _where(keep: Callable[[Variant], bool]) -> list[Variant]:
    return [v for v in case_variants() if keep(v)]


def default_affine(v: Variant) -> bool:
    """The parameters of a default call: a weight, and a bias for LayerNorm."""
    return v.has_weight and (v.has_bias or v.is_rms)


def float32_flags(v: Variant) -> bool:
    return v.residual_f32 or v.h_f32


def _core() -> list[Variant]:
    """The variants with the default parameters and without dropout."""
    return _where(lambda v: default_affine(v) and not v.has_dropout)


def full() -> list[Case]:
    """The whole variant matrix at every dtype of DTYPES; N in (1, 7, 64, 1000), leading dims (5,) or (2, 3).
    The torch backend, and triton / cuda on a GPU."""
    return list(cases_of(case_variants(), DTYPES, (1, 7, 64, 1000), ((5,), (2, 3))))


def gpu() -> list[Case]:
    """On a GPU (triton, cuda): ``full``, and every variant once more at a rotating dtype and a wide N --
    1024 (128-bit accesses over several warps), 4096, 8192, 12288 (past the backward's one-pass block),
    20000 and 65536 (chunked both ways) --; float64 x (the gradcheck path); and 3000 rows (several row groups
    per block, the grid-stride loop) for the variants with the default parameters and no dropout."""
    wide = (1024, 4096, 8192, 12288, 20000, 65536)
    return (full() + list(cases_of(case_variants(), DTYPES, wide, ((3,),), one_dtype=True))
            + list(cases_of(case_variants(), ((F64, None),), (100,), ((6,),)))
            + list(cases_of(_core(), DTYPES, (96,), ((3000,),), one_dtype=True)))


def check() -> list[Case]:
    """``python -m fusednorm.check`` on a fast backend: every variant at float32 x and at bfloat16 x with
    float32 parameters, and the variants with the default parameters and no dropout at float16 too;
    N in (1, 7, 256, 1000)."""
    widths = (1, 7, 256, 1000)
    return (list(cases_of(case_variants(), ((F32, None), (BF16, F32)), widths))
            + list(cases_of(_core(), ((F16, None),), widths)))


def interpreted() -> list[Case]:
    """The Triton interpreter (~0.15 s a case), 4 rows of N = 37 (masking, not a power of two), every third
    case N = 1:

    - the variants with the default parameters (weight; bias for LayerNorm) and no dropout -- the flags that
      decide what the kernels read, store and reduce: residual, scale kind, layout, float32 residual / h --
      at fp32, fp16, bf16 and fp16 x with fp32 parameters;
    - once each, at one dtype rotating over fp32, bf16, bf16 x with fp32 parameters and fp64: dropout with
      the default parameters, and the variants without weight or bias, which the residual flags do not
      change (unscaled residual or none); both without the float32 flags.
    """
    others = _where(lambda v: not float32_flags(v) and (
        (default_affine(v) and v.has_dropout) or (not default_affine(v) and not v.has_dropout
                                                  and v.scale_kind == ScaleKind.NONE)))
    return (list(cases_of(_core(), DTYPES[:4], (37, 37, 1)))
            + list(cases_of(others, ((F32, None), (BF16, None), (BF16, F32), (F64, None)), (37, 37, 1),
                            one_dtype=True)))


def check_interpreted() -> list[Case]:
    """``python -m fusednorm.check`` under the Triton interpreter (the tests run ``interpreted`` in full): the
    variants of ``interpreted`` once each, at a dtype rotating over fp32, bf16 and bf16 x with fp32 parameters,
    4 rows of N = 37 or 1."""
    variants = list(dict.fromkeys(c.variant for c in interpreted()))
    return list(cases_of(variants, ((F32, None), (BF16, None), (BF16, F32)), (37, 37, 1), one_dtype=True))


def chunked() -> list[Case]:
    """Triton with the block cap lowered to 16 columns (rows wider than one block; N = 40: chunks of 16, 16
    and 8), 3 rows, once each at fp32 or bf16: the variants with the default parameters and without the
    float32 flags, and their Post-LN dropout ones (the backward regenerates the mask chunk by chunk, and
    with a learned scale rebuilds h from x and the residual)."""
    keep = _where(lambda v: default_affine(v) and not float32_flags(v) and not (v.has_dropout and v.prenorm))
    return list(cases_of(keep, ((F32, None), (BF16, None)), (40,), ((3,),), one_dtype=True))


def params_per_row() -> list[Case]:
    """Triton's paths for wide rows that re-read the parameters per row (the backward's with a learned
    scale, the forward's with two or more (N,) parameters or a heavy variant), forced on at N = 37: the
    learned-scale variants with the default parameters and without float32 flags."""
    keep = _where(lambda v: v.learned_scale and default_affine(v) and not float32_flags(v))
    return list(cases_of(keep, ((F32, None), (BF16, None)), (37,), one_dtype=True))


def emulated() -> list[Case]:
    """The CPU emulation of the CUDA kernels (~0.2 s a case at N = 37, ~1.5 s at N = 1024):

    - the variants with the default parameters and no dropout at fp32 and at bf16 x with fp32 parameters,
      N rotating over 37 (the scalar path), 1024 (128-bit loads over two warps) and 37;
    - dropout (default parameters, no float32 flags) and the parameter-less variants (no residual or an
      unscaled one, no float32 flags, no dropout), once each at a rotating dtype, N in (1, 200, 37);
    - rows wider than the registers (chunked forward and backward, dropout regenerated in every pass);
    - many rows: several row groups per block, blocks looping over rows, several partial rows.
    """
    dropout = _where(lambda v: default_affine(v) and v.has_dropout and not float32_flags(v))
    bare = _where(lambda v: not default_affine(v) and not v.has_dropout and not float32_flags(v)
                  and v.scale_kind == ScaleKind.NONE)
    wide = [variant("layer_norm"), variant("rms_norm"), variant("add_layer_norm[vector,prenorm,dropout]")]
    return (list(cases_of(_core(), ((F32, None), (BF16, F32)), (37, 1024, 37), ((5,),)))
            + list(cases_of(dropout + bare, ((F32, None), (F16, None), (BF16, F32), (F64, None)), (1, 200, 37),
                            ((3,),), one_dtype=True))
            + list(cases_of(wide, ((F16, None), (F32, None), (BF16, None)), (16400, 9000, 9000), ((2,),),
                            one_dtype=True))
            + [Case("add_layer_norm[scalar]", (300, 64), F16), Case("add_rms_norm[vector,prenorm]", (700, 40), F32)])


def gradcheck(shape: tuple[int, ...] = (3, 6)) -> list[Case]:
    """float64 gradcheck: per norm, the plain norm and one variant per residual scale kind (default
    parameters), Pre-LN and dropout alternating over them."""
    pool = _where(lambda v: v.has_residual and default_affine(v) and not float32_flags(v))
    cases = []
    for is_rms in (False, True):
        cases.append(Case(variant("rms_norm" if is_rms else "layer_norm"), shape, F64))
        for k, kind in enumerate(ScaleKind):
            want = dict(is_rms=is_rms, scale_kind=kind, prenorm=bool(k % 2), has_dropout=bool((k // 2 + is_rms) % 2))
            cases.append(Case(next(v for v in pool if all(getattr(v, f) == x for f, x in want.items())), shape, F64))
    return cases


def covering(variants: Iterable[Variant]) -> list[Variant]:
    """A few of ``variants`` in which every flag takes each of the values it takes in ``variants`` (greedy,
    in order): for the checks too slow to run every variant (compiling, opcheck, under the interpreter)."""
    variants = list(variants)

    def values(v: Variant) -> set:
        return {(f, getattr(v, f)) for f in Variant.__dataclass_fields__}

    missing = set().union(*map(values, variants))
    chosen = []
    while missing:
        best = max(variants, key=lambda v: len(values(v) & missing))
        chosen.append(best)
        missing -= values(best)
    return chosen
