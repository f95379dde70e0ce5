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


def _args(dtype=torch.float32, param_dtype=None, scale=None):
    gen = torch.Generator().manual_seed(0)
    pdt = param_dtype or dtype
    x = (torch.randn(2, M // 2, N, generator=gen) + 1).to(dtype).requires_grad_(True)
    r = torch.randn(2, M // 2, N, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.rand(N, generator=gen) + 0.5).to(pdt).requires_grad_(True)
    b = torch.randn(N, generator=gen).to(pdt).requires_grad_(True)
    s = {"vector": torch.rand(N, generator=gen) + 0.5, "scalar": torch.tensor(1.5)}.get(scale, scale)
    if isinstance(s, torch.Tensor):
        s = s.to(pdt).requires_grad_(True)
    return x, r, w, b, s


F32, F16, BF16, I64 = torch.float32, torch.float16, torch.bfloat16, torch.int64
MN, ROW, COL = (M, N), (M,), (N,)

# (name, call(x, r, w, b, s, backend), x dtype, param dtype, scale, expected saved (shape, dtype) list)
VARIANTS = [
    ("layer_norm: x, weight, mean, rstd",
     lambda x, r, w, b, s, be: fusednorm.layer_norm(x, w, b, backend=be), F32, None, None,
     [(MN, F32), (COL, F32), (ROW, F32), (ROW, F32)]),
    ("layer_norm bf16 x, fp32 params",
     lambda x, r, w, b, s, be: fusednorm.layer_norm(x, w, b, backend=be), BF16, F32, None,
     [(MN, BF16), (COL, F32), (ROW, F32), (ROW, F32)]),
    ("layer_norm without affine: x, mean, rstd",
     lambda x, r, w, b, s, be: fusednorm.layer_norm(x, backend=be), F16, None, None,
     [(MN, F16), (ROW, F32), (ROW, F32)]),
    ("rms_norm: x, weight, rstd",
     lambda x, r, w, b, s, be: fusednorm.rms_norm(x, w, backend=be), F16, None, None,
     [(MN, F16), (COL, F16), (ROW, F32)]),
    ("Post-LN, no scale: h only",
     lambda x, r, w, b, s, be: fusednorm.add_layer_norm(x, r, w, b, backend=be), F16, F32, None,
     [(MN, F16), (COL, F32), (ROW, F32), (ROW, F32)]),
    ("Post-LN, constant scale (DeepNorm): h only",
     lambda x, r, w, b, s, be: fusednorm.add_rms_norm(x, r, w, residual_scale=s, backend=be), BF16, None, 2.0,
     [(MN, BF16), (COL, BF16), (ROW, F32)]),
    ("Post-LN, learned vector scale: x and residual, no h",
     lambda x, r, w, b, s, be: fusednorm.add_layer_norm(x, r, w, b, residual_scale=s, backend=be), F16, F32,
     "vector", [(MN, F16), (MN, F16), (COL, F32), (COL, F32), (ROW, F32), (ROW, F32)]),
    ("Post-LN, learned 0-d scale: x and residual, no h",
     lambda x, r, w, b, s, be: fusednorm.add_rms_norm(x, r, w, residual_scale=s, backend=be), F32, None, "scalar",
     [(MN, F32), (MN, F32), (COL, F32), ((), F32), (ROW, F32)]),
    ("Pre-LN: h (the returned one)",
     lambda x, r, w, b, s, be: fusednorm.add_layer_norm(x, r, w, b, prenorm=True, backend=be), BF16, F32, None,
     [(MN, BF16), (COL, F32), (ROW, F32), (ROW, F32)]),
    ("Pre-LN, residual in fp32: fp32 h",
     lambda x, r, w, b, s, be: fusednorm.add_rms_norm(x, r.float(), w, prenorm=True, residual_in_fp32=True,
                                                      backend=be), F16, F32, None,
     [(MN, F32), (COL, F32), (ROW, F32)]),
    ("Pre-LN, learned scale: h and residual",
     lambda x, r, w, b, s, be: fusednorm.add_layer_norm(x, r, w, b, residual_scale=s, prenorm=True, backend=be),
     F16, F32, "vector", [(MN, F16), (MN, F16), (COL, F32), (COL, F32), (ROW, F32), (ROW, F32)]),
    ("Post-LN + dropout: h and the int64 seed, no mask",
     lambda x, r, w, b, s, be: fusednorm.add_layer_norm(x, r, w, b, dropout_p=0.5, backend=be), F16, None, None,
     [(MN, F16), (COL, F16), (ROW, F32), (ROW, F32), ((1,), I64)]),
    ("learned scale + dropout: x, residual and the seed",
     lambda x, r, w, b, s, be: fusednorm.add_rms_norm(x, r, w, residual_scale=s, dropout_p=0.1, backend=be), F32,
     None, "vector", [(MN, F32), (MN, F32), (COL, F32), (COL, F32), (ROW, F32), ((1,), I64)]),
    ("Pre-LN + dropout: h and the seed",
     lambda x, r, w, b, s, be: fusednorm.add_layer_norm(x, r, None, None, prenorm=True, dropout_p=0.3, backend=be),
     BF16, None, None, [(MN, BF16), (ROW, F32), (ROW, F32), ((1,), I64)]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_saved_tensors_are_designs_list(backend, variant):
    name, call, dtype, pdt, scale, expected = variant
    x, r, w, b, s = _args(dtype, pdt, scale)
    out, saved = _saved(lambda: call(x, r, w, b, s, backend))
    assert _signature(saved) == sorted(expected, key=str)
    # No dropout mask in any form: nothing boolean/uint8.
    assert not any(t.dtype in (torch.bool, torch.uint8) for t in saved)
    # Saved activations are the caller's x/residual or the returned h, never copies; the one new (M, N)
    # tensor is the h of Post-LN without a learned scale, which the backward reads instead of x, residual.
    outs = out if isinstance(out, tuple) else (out,)
    held = {t.untyped_storage().data_ptr() for t in (x, r, *outs)}
    new = [t for t in saved if t.shape == MN and t.untyped_storage().data_ptr() not in held]
    fresh_h = name.startswith("Post-LN") and "no h" not in name
    assert len(new) == (1 if fresh_h else 0)
    sum(o.float().sum() for o in outs).backward()  # and the backward runs from exactly these


def test_nothing_is_saved_without_grad():
    x, r, w, b, s = _args(scale="vector")
    with torch.no_grad():
        _, saved = _saved(lambda: fusednorm.add_layer_norm(x, r, w, b, residual_scale=s, dropout_p=0.2))
    assert saved == []
    _, saved = _saved(lambda: fusednorm.layer_norm(x.detach(), w.detach(), b.detach()))
    assert saved == []


def test_modules_save_no_mask():
    m = fusednorm.AddLayerNorm(N, residual_scale="vector", dropout_p=0.5)
    x, r = torch.randn(M, N, requires_grad=True), torch.randn(M, N)
    _, saved = _saved(lambda: m(x, r))
    assert ((1,), I64) in _signature(saved)
    assert not any(t.dtype in (torch.bool, torch.uint8) for t in saved)


def _eager(kind, x, r, w, b, s, p, prenorm):
    """torch eager's composition of the same math, in the same dtypes."""
    xd = F.dropout(x, p) if p else x
    if kind.startswith("add"):
        h = (r * s if s is not None else r) + xd
    else:
        h = xd
    if "rms" in kind:
        y = F.rms_norm(h, (N,), w, 1e-6)
    else:
        y = F.layer_norm(h, (N,), w, b)
    return (y, h) if prenorm else y


EAGER_CASES = [("layer_norm", None, 0.0, False), ("rms_norm", None, 0.0, False), ("add_layer_norm", None, 0.0, False),
               ("add_layer_norm", "vector", 0.0, False), ("add_layer_norm", 2.0, 0.0, True),
               ("add_rms_norm", "vector", 0.0, True), ("add_layer_norm", None, 0.1, False),
               ("add_layer_norm", "vector", 0.1, True), ("add_rms_norm", "scalar", 0.1, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,scale,p,prenorm", EAGER_CASES)
def test_saved_bytes_never_exceed_torch_eager(kind, scale, p, prenorm, dtype):
    """On the CPU the forward's share of the forward + backward peak is what it saves: compare the bytes
    (shared storages counted once) with torch eager's composition; dropout must save 8 bytes, not a
    mask of M * N bytes."""
    x, r, w, b, s = _args(dtype, None, scale)
    fn = getattr(fusednorm, kind)
    kwargs = dict(residual_scale=s, dropout_p=p, prenorm=prenorm) if kind.startswith("add") else {}
    if kind == "layer_norm":
        _, fused = _saved(lambda: fn(x, w, b))
    elif kind == "rms_norm":
        _, fused = _saved(lambda: fn(x, w))
    elif kind == "add_layer_norm":
        _, fused = _saved(lambda: fn(x, r, w, b, **kwargs))
    else:
        _, fused = _saved(lambda: fn(x, r, w, **kwargs))
    _, eager = _saved(lambda: _eager(kind, x, r, w, b, s, p, prenorm))
    assert _bytes(fused) <= _bytes(eager), (_signature(fused), _signature(eager))
    if p:
        assert _bytes(eager) - _bytes(fused) >= x.numel() - 8  # the mask that eager keeps


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
