"""The "cuda" backend's host side, testable without a GPU (CI): availability messages, the extension's
registration, the flag word and facts of csrc/fusednorm.h against fusednorm.variant (in the extension
and in the CPU emulation), the dropout threshold, the launch heuristic, the argument checks, the Philox
mask and the fake functions.

Tests that need the built extension (``fusednorm._C``, see .ci/build_cuda.sh) are skipped when it is not
built; the availability tests run either way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools

import pytest
import torch
from _cuda_emulation import DTYPE_CODES, VARIANT_FACTS, emulated_backend

import fusednorm
from fusednorm.backends import BackendUnavailableError, cuda_impl
from fusednorm.backends.contract import ForwardArgs
from fusednorm.dropout import KEEP_BITS, draw_seed, dropout_keep_mask, keep_threshold, philox_r0
from fusednorm.variant import ScaleKind, Variant, all_variants

BUILT = importlib.util.find_spec("fusednorm._C") is not None and cuda_impl.is_built()
needs_extension = pytest.mark.skipif(not BUILT, reason="fusednorm._C is not built (.ci/build_cuda.sh builds it)")
HAS_CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# Availability: the reason is precise in every state.
# ---------------------------------------------------------------------------------------------
def test_why_unavailable_names_the_reason():
    reason = cuda_impl.why_unavailable()
    if not BUILT:
        assert reason is not None and "not built" in reason and "FUSEDNORM_BUILD_CUDA=1" in reason
    elif not HAS_CUDA:
        assert reason is not None and "built" in reason and "no CUDA GPU" in reason
    else:
        assert reason is None


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only behaviour")
def test_asking_for_cuda_backend_without_gpu_raises_the_reason():
    x = torch.randn(2, 8)
    with pytest.raises(BackendUnavailableError, match="cuda backend"):
        fusednorm.layer_norm(x, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="cuda backend"):
        fusednorm.set_backend("cuda")
    assert "cuda" not in fusednorm.available_backends("cpu")


# ---------------------------------------------------------------------------------------------
# The variant as C++ sees it: csrc/fusednorm.h's flag word and facts equal fusednorm.variant's, in the
# extension (torch.ops.fusednorm.cuda_variant_facts) and in the CPU emulation (the same header, g++).
# ---------------------------------------------------------------------------------------------
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _cpp_host(source: str):
    """(variant_facts(flags, x_dtype) -> dict, keep_threshold(p) -> int) of the extension or the emulation;
    both raise ValueError for a word that is not a variant."""
    if source == "extension":
        if not BUILT:
            pytest.skip("fusednorm._C is not built (.ci/build_cuda.sh builds it)")
        return (lambda flags, x_dtype: dict(zip(VARIANT_FACTS, torch.ops.fusednorm.cuda_variant_facts(flags, x_dtype),
                                                 strict=True)),
                torch.ops.fusednorm.cuda_keep_threshold)
    emulated = emulated_backend()
    return emulated.variant_facts, emulated.keep_threshold


def _python_facts(v: Variant, x_dtype: torch.dtype) -> dict:
    facts = {name: int(getattr(v, name)) for name in VARIANT_FACTS if not name.endswith("_dtype")}
    residual = v.residual_dtype(x_dtype)
    return dict(facts, residual_dtype=DTYPE_CODES[residual] if residual is not None else -1,
                h_dtype=DTYPE_CODES[v.h_dtype(x_dtype)])


@pytest.mark.parametrize("source", ["extension", "emulation"])
def test_cpp_variant_facts_equal_the_python_variant(source):
    cpp_facts, _ = _cpp_host(source)
    # Every variant, with and without the telemetry flag (store_stats, bit 10).
    variants = [w for v in all_variants() for w in (v, dataclasses.replace(v, store_stats=True))]
    for v, x_dtype in itertools.product(variants, X_DTYPES):
        assert cpp_facts(v.flags, x_dtype) == _python_facts(v, x_dtype), (v.name, x_dtype)
    # Every other word too: C++ accepts exactly the words Variant.from_flags accepts, with the same facts.
    accepted = 0
    for word in [*range(1 << 11), -1, 1 << 40]:
        try:
            v = Variant.from_flags(word)
        except ValueError:
            with pytest.raises(ValueError, match="variant"):
                cpp_facts(word, torch.float16)
            continue
        accepted += 1
        assert cpp_facts(word, torch.bfloat16) == _python_facts(v, torch.bfloat16), v
    assert accepted >= len({v.flags for v in variants}) == len(variants)


@pytest.mark.parametrize("source", ["extension", "emulation"])
def test_cpp_keep_threshold_rounds_like_the_dropout_module(source):
    _, cpp_keep_threshold = _cpp_host(source)
    scale = float(1 << KEEP_BITS)
    # p * 2^24 a half-integer: round half to even (Python's round), both parities.
    ties = [(k + 0.5) / scale for k in (0, 1, 2, 3, 1000, 1001, 2**23 - 1, 2**23, 2**24 - 2)]
    assert [keep_threshold(p) for p in ties[:4]] == [0, 2, 2, 4]
    near = [(k + d) / scale for k in (5, 6, 2**22) for d in (0.5 - 2**-20, 0.5 + 2**-20, 0.0, 0.999)]
    randoms = torch.rand(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).tolist()
    for p in [0.0, 0.1, 0.25, 0.5, 0.9, 1.0 - 2.0**-24, 2.0**-30, *ties, *near, *randoms]:
        assert cpp_keep_threshold(p) == keep_threshold(p), p


# ---------------------------------------------------------------------------------------------
# The extension, when built.
# ---------------------------------------------------------------------------------------------
@needs_extension
def test_extension_registers_its_ops_in_the_fusednorm_namespace():
    for name in ("cuda_fwd", "cuda_bwd", "cuda_launch_config", "cuda_variant_facts", "cuda_keep_threshold",
                 "cuda_philox_r0"):
        assert hasattr(torch.ops.fusednorm, name), name
    # The Python ops of fusednorm/ops.py share the namespace (TORCH_LIBRARY_FRAGMENT, not a new library).
    assert hasattr(torch.ops.fusednorm, "fwd") and hasattr(torch.ops.fusednorm, "bwd")
    # cuda_fwd / cuda_bwd take the op layer's arguments minus `backend`.
    for cuda_op, op in ((torch.ops.fusednorm.cuda_fwd, torch.ops.fusednorm.fwd),
                        (torch.ops.fusednorm.cuda_bwd, torch.ops.fusednorm.bwd)):
        cuda_args = [(a.name, str(a.type)) for a in cuda_op.default._schema.arguments]
        op_args = [(a.name, str(a.type)) for a in op.default._schema.arguments if a.name != "backend"]
        assert cuda_args == op_args
        assert len(cuda_op.default._schema.returns) == len(op.default._schema.returns)


ELEM_BYTES = (2, 4, 8)


@needs_extension
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("elem_bytes", ELEM_BYTES)
def test_launch_heuristic_is_sane_for_every_width(elem_bytes, backward):
    group = 16 // elem_bytes
    widths = sorted({1, 2, 7, 31, 32, 33, 100, 127, 512, 768, 1000, 1024, 1536, 2048, 3072, 4096, 5120, 8192,
                     12288, 16384, 16411, 32768, 65536, 100_000})
    previous_tpr = 0
    for n in widths:
        c = cuda_impl.launch_config(4096, n, elem_bytes, num_sms=132, blocks_per_sm=2, backward=backward,
                                    partial_slots=3 if backward else 0)
        assert c.threads_per_row in (32, 64, 128, 256, 512), (n, c)
        assert c.threads_per_row * c.rows_per_block <= 512, (n, c)
        assert c.threads_per_row * c.rows_per_block >= min(128, c.threads_per_row), (n, c)
        assert c.chunk_cols == c.threads_per_row * c.groups_per_thread * group, (n, c)
        assert c.row_fits == (n <= c.chunk_cols), (n, c)
        # The smallest row group that holds the row: half as many threads would not.
        if c.threads_per_row > 32 and c.row_fits:
            assert n > (c.threads_per_row // 2) * c.groups_per_thread * group, (n, c)
        assert c.threads_per_row >= previous_tpr, "wider rows never get fewer threads"
        previous_tpr = c.threads_per_row
        if backward:
            # The partition is the problem's (csrc/fusednorm.h backward_grid): two waves of a 132-SM
            # reference chip at the block shape's reference occupancy, whatever this device is.
            threads = c.threads_per_row * c.rows_per_block
            assert c.grid <= 2 * 132 * (2048 // threads), "two reference waves of partial rows at most"
            other = cuda_impl.launch_config(4096, n, elem_bytes, num_sms=16, blocks_per_sm=1, backward=True,
                                            partial_slots=3)
            assert other.grid == c.grid, "the backward's grid does not depend on the device"
            assert c.smem_bytes == 3 * c.rows_per_block * c.chunk_cols * (8 if elem_bytes == 8 else 4)
            assert c.smem_bytes <= 96 * 1024, "fits the 163 KiB of an A100 and the 227 KiB of an H100"
        else:
            assert c.smem_bytes == 0
        # The row stays in registers up to N = 8192 for 16/32-bit inputs (forward and backward).
        if n <= 8192 and elem_bytes in (2, 4):
            assert c.row_fits, (n, c)


@needs_extension
def test_launch_grid_covers_rows_and_caps():
    # Forward: one row group per row, up to 32 waves of this device; backward: the problem's partition.
    c = cuda_impl.launch_config(1000, 1024, 2, num_sms=100, blocks_per_sm=4, backward=False)
    assert c.grid == -(-1000 // c.rows_per_block)
    c = cuda_impl.launch_config(10**7, 1024, 2, num_sms=100, blocks_per_sm=4, backward=False)
    assert c.grid == 100 * 4 * 32
    c = cuda_impl.launch_config(10**7, 1024, 2, num_sms=100, blocks_per_sm=4, backward=True)
    same = cuda_impl.launch_config(10**7, 1024, 2, num_sms=132, blocks_per_sm=1, backward=True)
    assert c.grid == same.grid and c.grid % (2 * 132) == 0, "backward: two waves of the 132-SM reference chip"
    c = cuda_impl.launch_config(3, 1024, 2, num_sms=100, blocks_per_sm=4, backward=True)
    assert c.grid == -(-3 // c.rows_per_block)
    assert cuda_impl.launch_config(0, 1024, 2, num_sms=100, blocks_per_sm=4, backward=True).grid == 1
    with pytest.raises(ValueError, match="elem_bytes"):
        cuda_impl.launch_config(1, 8, 3, num_sms=1, blocks_per_sm=1, backward=False)


@needs_extension
@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0 - 2.0**-24])
@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5, 2**62 - 1])
def test_cpp_philox_mask_is_the_dropout_module_mask_bit_for_bit(p, seed):
    seed_tensor = torch.tensor([seed], dtype=torch.int64)
    rows, cols = 7, 131
    index = torch.arange(rows * cols, dtype=torch.int64).reshape(rows, cols)
    words = torch.ops.fusednorm.cuda_philox_r0(seed_tensor, index)
    keep = (words >> (32 - KEEP_BITS)) >= keep_threshold(p)
    assert torch.equal(keep, dropout_keep_mask(seed_tensor, rows, cols, p))


@needs_extension
def test_cpp_philox_words_past_2_to_the_32():
    # Tensors of more than 2^32 elements: the index's high word is the counter's second word.
    seed = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64)
    index = torch.cat([torch.arange(2**32 - 40, 2**32 + 40), torch.arange(2**40, 2**40 + 40),
                       torch.tensor([2**63 - 1])]).to(torch.int64)
    assert torch.equal(torch.ops.fusednorm.cuda_philox_r0(seed, index), philox_r0(seed, index))


PLAIN = Variant(has_weight=False)  # a LayerNorm without parameters
RESIDUAL = Variant(has_residual=True, has_weight=False)
VECTOR = Variant(has_residual=True, scale_kind=ScaleKind.VECTOR, has_weight=False)
SCALAR = Variant(has_residual=True, scale_kind=ScaleKind.SCALAR, has_weight=False)
DROPOUT = Variant(has_dropout=True, has_weight=False)


def _flags(variant: Variant | int) -> int:
    return variant if isinstance(variant, int) else variant.flags


def _fwd_args(x, variant: Variant | int = PLAIN, **overrides) -> dict:
    """cuda_fwd's arguments by name."""
    args = dict(x=x, residual=None, weight=None, bias=None, residual_scale=None, seed=None, variant=_flags(variant),
                eps=1e-5, scale_value=1.0, dropout_p=0.0, weight_offset=0.0)
    args.update(overrides)
    return args


def _bwd_args(dy, variant: Variant | int = PLAIN, **overrides) -> dict:
    """cuda_bwd's arguments by name (x given: PLAIN does not store h)."""
    rows = dy.shape[0]
    args = dict(dy=dy, dh_in=None, x=dy, residual=None, h=None, weight=None, residual_scale=None,
                mean=torch.zeros(rows), rstd=torch.ones(rows), seed=None, variant=_flags(variant), scale_value=1.0,
                dropout_p=0.0, weight_offset=0.0, bias_dtype=None)
    args.update(overrides)
    return args


@needs_extension
def test_cpu_tensors_get_a_clear_error_not_a_crash():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors.*cpu"):
        torch.ops.fusednorm.cuda_fwd(**_fwd_args(x))
    with pytest.raises(ValueError, match="needs CUDA tensors.*cpu"):
        torch.ops.fusednorm.cuda_bwd(**_bwd_args(torch.randn(4, 16)))
    # The backend functions (the contract's signatures) say the same before reaching the op.
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_impl.forward(PLAIN, ForwardArgs(x))


@needs_extension
@pytest.mark.parametrize("overrides, error, message", [
    (dict(variant=RESIDUAL, residual=torch.randn(4, 15)), ValueError, "residual must have shape"),
    (dict(variant=RESIDUAL, residual=torch.randn(4, 16, dtype=torch.float64)), TypeError,
     "residual must have dtype torch.float32"),
    (dict(variant=RESIDUAL), ValueError, "needs residual, got None"),
    (dict(residual=torch.randn(4, 16)), ValueError, "takes no residual, got a tensor"),
    (dict(variant=Variant(), weight=torch.randn(15)), ValueError, r"weight must have shape \(16,\)"),
    (dict(variant=Variant(), weight=torch.randn(16, dtype=torch.float16)), TypeError, "weight must have x's dtype"),
    (dict(variant=Variant()), ValueError, "needs weight"),
    (dict(weight=torch.randn(16)), ValueError, "takes no weight"),
    (dict(variant=Variant(has_weight=False, has_bias=True), bias=torch.randn(32)[::2]), ValueError,
     "bias must be contiguous"),
    (dict(variant=VECTOR, residual=torch.randn(4, 16), residual_scale=torch.randn(3)), ValueError,
     r"needs a \(N,\) residual_scale"),
    (dict(variant=SCALAR, residual=torch.randn(4, 16), residual_scale=torch.randn(16)), ValueError,
     "needs a 0-d residual_scale"),
    (dict(variant=RESIDUAL, residual=torch.randn(4, 16), residual_scale=torch.randn(())), ValueError,
     "takes no residual_scale"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
    (dict(dropout_p=0.5), ValueError, "has no dropout, got dropout_p 0.5"),
    (dict(variant=DROPOUT, seed=torch.zeros(1, dtype=torch.int64)), ValueError, "has dropout, got dropout_p 0"),
    (dict(variant=DROPOUT, dropout_p=0.5), ValueError, "needs a seed"),
    (dict(variant=DROPOUT, dropout_p=0.5, seed=torch.zeros(1)), ValueError, "seed must be an int64"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(variant=1 << 12), ValueError, "not a fusednorm.variant.Variant flag word: unknown bits"),
    (dict(variant=Variant(is_rms=True).flags | Variant(has_bias=True).flags), ValueError, "RMSNorm has no bias"),
])
def test_forward_argument_checks(overrides, error, message):
    args = dict(overrides)
    variant = args.pop("variant", PLAIN)
    with pytest.raises(error, match=message):
        torch.ops.fusednorm.cuda_fwd(**_fwd_args(torch.randn(4, 16), variant, **args))


@needs_extension
def test_forward_shape_and_stride_checks():
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.fusednorm.cuda_fwd(**_fwd_args(torch.randn(2, 3, 4)))
    with pytest.raises(ValueError, match="unit stride"):
        torch.ops.fusednorm.cuda_fwd(**_fwd_args(torch.randn(16, 4).t()))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        torch.ops.fusednorm.cuda_fwd(**_fwd_args(torch.ones(4, 16, dtype=torch.int32)))


@needs_extension
def test_backward_argument_checks():
    dy = torch.randn(4, 16)
    prenorm = Variant(prenorm=True, has_weight=False)

    def call(variant=PLAIN, **overrides):
        return torch.ops.fusednorm.cuda_bwd(**_bwd_args(dy, variant, **overrides))

    with pytest.raises(ValueError, match="needs x"):
        call(x=None)
    with pytest.raises(ValueError, match="needs h"):
        call(prenorm)
    with pytest.raises(TypeError, match="h must have dtype torch.float32"):
        call(Variant(prenorm=True, h_f32=True, has_weight=False), h=dy.half())
    with pytest.raises(TypeError, match="x must have dtype torch.float32"):
        call(x=dy.double())
    with pytest.raises(ValueError, match="needs residual"):  # h is rebuilt from x and the residual
        call(VECTOR, residual_scale=torch.ones(16))
    with pytest.raises(ValueError, match="needs residual"):  # dscale reads it, also when h is stored
        call(Variant(has_residual=True, scale_kind=ScaleKind.VECTOR, prenorm=True, has_weight=False), h=dy,
             residual_scale=torch.ones(16))
    with pytest.raises(ValueError, match="rstd must be a contiguous"):
        call(rstd=torch.ones(5))
    with pytest.raises(ValueError, match="mean must be a contiguous"):
        call(mean=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="dh_in must have shape"):
        call(dh_in=torch.randn(4, 8))
    with pytest.raises(ValueError, match="takes no weight"):
        call(weight=torch.ones(16))
    with pytest.raises(TypeError, match="bias_dtype must be"):
        call(bias_dtype=torch.float64)
    with pytest.raises(ValueError, match="not a fusednorm.variant.Variant flag word"):
        call(Variant(has_weight=False).flags | 1 << 20)


@needs_extension
@pytest.mark.parametrize("variant", [
    Variant(has_residual=True, residual_f32=True, scale_kind=ScaleKind.SCALAR, has_bias=True),
    Variant(is_rms=True, has_residual=True, prenorm=True, residual_f32=True, h_f32=True, has_dropout=True),
    Variant(has_residual=True, residual_f32=True, scale_kind=ScaleKind.VECTOR, store_stats=True),
], ids=lambda v: v.name)
def test_fake_functions_give_the_contract_shapes(variant):
    m, n = 6, 10
    meta = dict(device="meta")
    x = torch.empty(m, n, dtype=torch.float16, **meta)
    residual = torch.empty(m, n, dtype=torch.float32, **meta)
    weight = torch.empty(n, dtype=torch.float32, **meta)
    bias = torch.empty(n, dtype=torch.float16, **meta) if variant.has_bias else None
    scale = torch.empty((), dtype=torch.float16, **meta) if variant.learned_scale else None
    seed = torch.empty(1, dtype=torch.int64, **meta) if variant.has_dropout else None
    y, h, mean, rstd, stats = torch.ops.fusednorm.cuda_fwd(x, residual, weight, bias, scale, seed, variant.flags,
                                                           1e-5, 1.0, 0.25 if variant.has_dropout else 0.0, 0.0)
    assert y.shape == (m, n) and y.dtype == torch.float16
    assert stats.shape == ((m, 8) if variant.store_stats else (0,)) and stats.dtype == torch.float32
    assert h.shape == ((m, n) if variant.store_h else (0,)) and h.dtype == variant.h_dtype(torch.float16)
    assert mean.shape == ((0,) if variant.is_rms else (m,)) and rstd.shape == (m,) and rstd.dtype == torch.float32
    dx, dres, dw, db, ds = torch.ops.fusednorm.cuda_bwd(
        y, h if variant.prenorm else None, x, residual, h if variant.store_h else None, weight, scale, mean, rstd,
        seed, variant.flags, 1.0, 0.25 if variant.has_dropout else 0.0, 0.0, bias.dtype if bias is not None else None)
    assert dx.shape == (m, n) and dx.dtype == torch.float16
    assert dres.shape == ((m, n) if variant.store_dresidual else (0,)) and dres.dtype == torch.float32
    assert dw.shape == (n,) and dw.dtype == torch.float32
    assert db.shape == ((n,) if variant.has_bias else (0,))
    assert ds.shape == (() if variant.learned_scale else (0,))


@needs_extension
def test_dropout_seed_is_drawn_on_the_input_device():
    # The kernels read the seed from a device tensor (no host sync); the CPU draw is what CPU checks see.
    seed = draw_seed("cpu")
    assert seed.dtype == torch.int64 and seed.shape == (1,)


# ---------------------------------------------------------------------------------------------
# setup.py: a plain install stays pure Python; FUSEDNORM_BUILD_CUDA=1 fails loudly, saying why.
# ---------------------------------------------------------------------------------------------
def _setup_namespace() -> dict:
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    source = open(path).read()
    # Everything but the module-level calls (cuda_extensions() and setup()).
    source = source.split("\next_modules, cmdclass = cuda_extensions()")[0]
    namespace = {"__file__": path}
    exec(compile(source, path, "exec"), namespace)
    return namespace


def test_setup_without_torch_is_pure_python_unless_asked(monkeypatch):
    import sys

    namespace = _setup_namespace()
    monkeypatch.setitem(sys.modules, "torch", None)  # pip's isolated build environment: no torch
    monkeypatch.delenv("FUSEDNORM_BUILD_CUDA", raising=False)
    assert namespace["cuda_extensions"]() == ([], {})
    monkeypatch.setenv("FUSEDNORM_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="no-build-isolation"):
        namespace["cuda_extensions"]()
    monkeypatch.setenv("FUSEDNORM_BUILD_CUDA", "0")
    assert namespace["cuda_extensions"]() == ([], {})


def test_setup_rejects_a_cuda_home_without_headers(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: setup.py stops before looking at CUDA_HOME")
    namespace = _setup_namespace()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\nexec /opt/cuda/bin/nvcc \"$@\"\n")  # a wrapper's root
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert "include/cuda_runtime.h" in namespace["_why_not_buildable"]()
    monkeypatch.setenv("FUSEDNORM_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="real toolkit root"):
        namespace["cuda_extensions"]()
