"""What the backward keeps alive: exactly DESIGN's list per variant, never a dropout mask, and never more
bytes than torch eager's composition of the same math.

Saved tensors are collected with torch.autograd.graph.saved_tensors_hooks (its pack hook sees every
tensor an autograd node saves). Peak memory is hard to measure on the CPU (the allocator does not
report it), so the CPU check compares the bytes of saved tensors, which is what a forward adds to the
peak of forward + backward; a GPU test compares torch.cuda.max_memory_allocated where CUDA exists.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusednorm
from fusednorm import case_matrix
from fusednorm.testing import CONSTANT_SCALE, Case, case_variants, make_inputs, variant
from fusednorm.variant import ScaleKind

# The op layer and the Function path of backend "torch" (on the CPU, eager calls otherwise take
# fusednorm.cpu_path, ATen's ops: tests/test_cpu_path.py).
pytestmark = pytest.mark.usefixtures("torch_function_path")

BACKENDS = fusednorm.available_backends("cpu")
M, N = 6, 16


def _saved(fn) -> list[torch.Tensor]:
    """The tensors that autograd saves while ``fn()`` runs (placeholders of 0 elements dropped)."""
    packed: list[torch.Tensor] = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    assert all(t.numel() > 0 or t.shape == (0,) for t in packed)
    return out, [t for t in packed if t.numel() > 0]


def _signature(tensors) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return sorted(((tuple(t.shape), t.dtype) for t in tensors), key=str)


def _bytes(tensors) -> int:
    """Bytes held, counting a storage shared by several saved tensors once."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


F32, F16, BF16, I64 = torch.float32, torch.float16, torch.bfloat16, torch.int64
MN, ROW, COL = (M, N), (M,), (N,)
SHAPE = (2, M // 2, N)  # leading dims are flattened to M rows; x and the residual are saved as given
_SLOW = not torch.cuda.is_available()  # triton runs interpreted: a covering subset of the variants

# DESIGN section 5 in words, for a few variants: the list ``Variant.saved`` must give (and the test below
# checks every variant's saved tensors against ``Variant.saved``).
DESIGN_SAVED = {
    "layer_norm": ("x", "weight", "mean", "rstd"),
    "layer_norm[no_weight,no_bias]": ("x", "mean", "rstd"),
    "rms_norm": ("x", "weight", "rstd"),
    "add_layer_norm[unscaled]": ("h", "weight", "mean", "rstd"),  # Post-LN, no scale: h only
    "add_rms_norm[constant]": ("h", "weight", "rstd"),  # DeepNorm: h only
    "add_layer_norm[vector]": ("x", "residual", "weight", "residual_scale", "mean", "rstd"),  # no h
    "add_rms_norm[scalar]": ("x", "residual", "weight", "residual_scale", "rstd"),
    "add_layer_norm[unscaled,prenorm]": ("h", "weight", "mean", "rstd"),  # the returned h
    "add_layer_norm[vector,prenorm]": ("h", "residual", "weight", "residual_scale", "mean", "rstd"),
    "add_layer_norm[unscaled,dropout]": ("h", "weight", "mean", "rstd", "seed"),  # the seed, never a mask
    "add_rms_norm[vector,dropout]": ("x", "residual", "weight", "residual_scale", "rstd", "seed"),
}


def test_variant_saved_is_designs_list():
    for name, saved in DESIGN_SAVED.items():
        assert variant(name).saved == saved, name


def _case(v) -> Case:
    """float16 x with float32 parameters (the float32 residual / h flags need a narrower x)."""
    return Case(v, SHAPE, F16, F32)


def _leaves(case: Case) -> dict:
    inputs = make_inputs(case, generator=torch.Generator().manual_seed(0))
    return {k: v.requires_grad_(True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
            if k not in ("dy", "dh")}


def _expected(case: Case) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each tensor of ``case.variant.saved``."""
    v, x_dtype, pdt = case.variant, case.dtype, case.param_dtype or case.dtype
    signature = dict(x=(SHAPE, x_dtype), residual=(SHAPE, v.residual_dtype(x_dtype)), h=(MN, v.h_dtype(x_dtype)),
                     weight=(COL, pdt), residual_scale=(COL if v.scale_kind == ScaleKind.VECTOR else (), pdt),
                     mean=(ROW, F32), rstd=(ROW, F32), seed=((1,), I64))
    return [signature[name] for name in v.saved]


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_tensors_are_the_variants_list(backend):
    """Every variant (a covering subset under the interpreter): autograd holds exactly ``Variant.saved``."""
    variants = case_variants()
    if backend != "torch" and _SLOW:
        variants = case_matrix.covering(variants)
    for v in variants:
        case = _case(v)
        leaves = _leaves(case)
        out, saved = _saved(lambda: case.call(leaves, backend))  # noqa: B023 (called at once)
        assert _signature(saved) == sorted(_expected(case), key=str), v.name
        # No dropout mask in any form: nothing boolean/uint8.
        assert not any(t.dtype in (torch.bool, torch.uint8) for t in saved), v.name
        # Saved activations are the caller's x/residual or the returned h, never copies; the one new (M, N)
        # tensor is the h of Post-LN without a learned scale, which the backward reads instead of x, residual.
        outs = out if isinstance(out, tuple) else (out,)
        held = {t.untyped_storage().data_ptr() for t in (leaves["x"], leaves.get("residual"), *outs) if t is not None}
        new = [t for t in saved if t.shape == MN and t.untyped_storage().data_ptr() not in held]
        assert len(new) == int(v.store_h and not v.prenorm), v.name
        sum(o.float().sum() for o in outs).backward()  # and the backward runs from exactly these


def test_nothing_is_saved_without_grad():
    case = _case(variant("add_layer_norm[vector,dropout]"))
    leaves = _leaves(case)
    with torch.no_grad():
        _, saved = _saved(lambda: case.call(leaves, None))
    assert saved == []
    plain = _case(variant("layer_norm"))
    _, saved = _saved(lambda: plain.call({k: v.detach() for k, v in _leaves(plain).items()}, None))
    assert saved == []


def test_modules_save_no_mask():
    m = fusednorm.AddLayerNorm(N, residual_scale="vector", dropout_p=0.5)
    x, r = torch.randn(M, N, requires_grad=True), torch.randn(M, N)
    _, saved = _saved(lambda: m(x, r))
    assert ((1,), I64) in _signature(saved)
    assert not any(t.dtype in (torch.bool, torch.uint8) for t in saved)


def _eager(case: Case, t: dict):
    """torch eager's composition of the same math, in the same dtypes."""
    v = case.variant
    h = F.dropout(t["x"], case.dropout_p) if v.has_dropout else t["x"]
    if v.has_residual:
        s = CONSTANT_SCALE if v.scale_kind == ScaleKind.CONSTANT else t.get("residual_scale")
        h = (t["residual"] * s if s is not None else t["residual"]) + h
    w = t.get("weight")
    w = w + case.weight_offset if w is not None and case.weight_offset else w
    y = F.rms_norm(h, (N,), w, case.eps) if v.is_rms else F.layer_norm(h, (N,), w, t.get("bias"), case.eps)
    return (y, h) if v.prenorm else y


# The variants with the default parameters and without the float32 flags (every residual scale, layout
# and dropout), in both x dtypes.
EAGER_VARIANTS = [v for v in case_variants() if case_matrix.default_affine(v) and not case_matrix.float32_flags(v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_never_exceed_torch_eager(dtype):
    """On the CPU the forward's share of the forward + backward peak is what it saves: compare the bytes
    (shared storages counted once) with torch eager's composition; dropout must save 8 bytes, not a
    mask of M * N bytes."""
    for v in EAGER_VARIANTS:
        case = Case(v, SHAPE, dtype, weight_offset=1.0 if v.is_rms else 0.0)
        leaves = _leaves(case)
        _, fused = _saved(lambda: case.call(leaves, None))  # noqa: B023 (called at once)
        _, eager = _saved(lambda: _eager(case, leaves))  # noqa: B023
        assert _bytes(fused) <= _bytes(eager), (v.name, _signature(fused), _signature(eager))
        if v.has_dropout:
            assert _bytes(eager) - _bytes(fused) >= leaves["x"].numel() - 8, v.name  # the mask that eager keeps


@pytest.mark.gpu
@pytest.mark.parametrize("scale,p,prenorm", [(None, 0.0, False), ("vector", 0.0, False), (None, 0.1, True)])
def test_cuda_peak_memory_no_worse_than_eager(scale, p, prenorm):
    """On CUDA: peak allocated bytes of forward + backward (activations freed as in training) against
    torch eager, 16-bit inputs with float32 parameters as in mixed-precision training."""
    dev = torch.device("cuda")
    m, n = 4096, 4096

    def peak(fused: bool) -> int:
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(m, n, device=dev, generator=gen, dtype=torch.bfloat16).requires_grad_(True)
        r = torch.randn(m, n, device=dev, generator=gen, dtype=torch.bfloat16).requires_grad_(True)
        w = torch.ones(n, device=dev, requires_grad=True)
        b = torch.zeros(n, device=dev, requires_grad=True)
        s = torch.ones(n, device=dev, requires_grad=True) if scale == "vector" else None
        dy = torch.randn(m, n, device=dev, generator=gen, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if fused:
            out = fusednorm.add_layer_norm(x, r, w, b, residual_scale=s, dropout_p=p, prenorm=prenorm)
        else:
            xd = F.dropout(x, p) if p else x
            h = (r * s.to(r.dtype) if s is not None else r) + xd
            y = F.layer_norm(h, (n,), w.to(h.dtype), b.to(h.dtype))
            out = (y, h) if prenorm else y
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, (dy,) * len(outs))
        del out, outs
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    assert peak(True) <= peak(False)
