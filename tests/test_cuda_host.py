"""The "cuda" backend's host side, testable without a GPU (CI): availability messages, the extension's
registration, its launch heuristic, its argument checks, its Philox mask and its fake functions.

Tests that need the built extension (``fusednorm._C``, see .ci/build_cuda.sh) are skipped when it is not
built; the availability tests run either way.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fusednorm
from fusednorm.backends import BackendUnavailableError, cuda_impl
from fusednorm.dropout import KEEP_BITS, draw_seed, dropout_keep_mask, keep_threshold, philox_r0

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
# The extension, when built.
# ---------------------------------------------------------------------------------------------
@needs_extension
def test_extension_registers_its_ops_in_the_fusednorm_namespace():
    for name in ("cuda_fwd", "cuda_bwd", "cuda_launch_config", "cuda_philox_r0"):
        assert hasattr(torch.ops.fusednorm, name), name
    # The Python ops of fusednorm/ops.py share the namespace (TORCH_LIBRARY_FRAGMENT, not a new library).
    assert hasattr(torch.ops.fusednorm, "fwd") and hasattr(torch.ops.fusednorm, "bwd")
    schema = str(torch.ops.fusednorm.cuda_fwd.default._schema)
    assert "Tensor? residual" in schema and "ScalarType h_dtype" in schema


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
            assert c.grid <= 132 * 2, "one wave of partial rows at most"
            assert c.smem_bytes == 3 * c.rows_per_block * c.chunk_cols * (8 if elem_bytes == 8 else 4)
            assert c.smem_bytes <= 96 * 1024, "fits the 163 KiB of an A100 and the 227 KiB of an H100"
        else:
            assert c.smem_bytes == 0
        # The row stays in registers up to N = 8192 for 16/32-bit inputs (forward and backward).
        if n <= 8192 and elem_bytes in (2, 4):
            assert c.row_fits, (n, c)


@needs_extension
def test_launch_grid_covers_rows_and_caps():
    # Forward: one row group per row, up to 32 waves; backward: one wave.
    c = cuda_impl.launch_config(1000, 1024, 2, num_sms=100, blocks_per_sm=4, backward=False)
    assert c.grid == -(-1000 // c.rows_per_block)
    c = cuda_impl.launch_config(10**7, 1024, 2, num_sms=100, blocks_per_sm=4, backward=False)
    assert c.grid == 100 * 4 * 32
    c = cuda_impl.launch_config(10**7, 1024, 2, num_sms=100, blocks_per_sm=4, backward=True)
    assert c.grid == 100 * 4
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


def _fwd_args(x, **overrides):
    args = dict(x=x, residual=None, weight=None, bias=None, residual_scale=None, scale_value=1.0, eps=1e-5,
                dropout_p=0.0, keep_threshold=0, seed=None, is_rms=False, store_h=False, h_dtype=x.dtype)
    args.update(overrides)
    return args


def _call_fwd(**args):
    return torch.ops.fusednorm.cuda_fwd(*args.values())


@needs_extension
def test_cpu_tensors_get_a_clear_error_not_a_crash():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors.*cpu"):
        _call_fwd(**_fwd_args(x))
    dy = torch.randn(4, 16)
    rstd = torch.ones(4)
    with pytest.raises(ValueError, match="needs CUDA tensors.*cpu"):
        torch.ops.fusednorm.cuda_bwd(dy, None, x, None, None, None, None, None, 1.0, rstd, rstd, 0.0, 0, None,
                                     False, torch.float32, None, False)
    # The backend functions (the contract's signatures) say the same before reaching the op.
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_impl.forward(x, None, None, None, None, 1.0, 1e-5, 0.0, None, False, False, x.dtype)


@needs_extension
@pytest.mark.parametrize("overrides, error, message", [
    (dict(residual=torch.randn(4, 15)), ValueError, "residual must have shape"),
    (dict(residual=torch.randn(4, 16, dtype=torch.float64)), TypeError, "residual must have x's dtype"),
    (dict(weight=torch.randn(15)), ValueError, r"weight must have shape \(16,\)"),
    (dict(weight=torch.randn(16, dtype=torch.float16)), TypeError, "weight must have x's dtype"),
    (dict(bias=torch.randn(32)[::2]), ValueError, "bias must be contiguous"),
    (dict(residual=torch.randn(4, 16), residual_scale=torch.randn(3)), ValueError, "residual_scale must be 0-d"),
    (dict(residual_scale=torch.randn(())), ValueError, "residual_scale needs a residual"),
    (dict(h_dtype=torch.float16), TypeError, "h_dtype"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=0.5, keep_threshold=2**23), ValueError, "seed"),
    (dict(dropout_p=0.5, keep_threshold=2**25, seed=torch.zeros(1, dtype=torch.int64)), ValueError, "keep_threshold"),
    (dict(dropout_p=0.5, keep_threshold=2**23, seed=torch.zeros(1)), ValueError, "seed must be an int64"),
    (dict(eps=-1.0), ValueError, "eps"),
])
def test_forward_argument_checks(overrides, error, message):
    x = torch.randn(4, 16)
    with pytest.raises(error, match=message):
        _call_fwd(**_fwd_args(x, **overrides))


@needs_extension
def test_forward_shape_and_stride_checks():
    with pytest.raises(ValueError, match="2-D"):
        _call_fwd(**_fwd_args(torch.randn(2, 3, 4)))
    with pytest.raises(ValueError, match="unit stride"):
        _call_fwd(**_fwd_args(torch.randn(16, 4).t()))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        _call_fwd(**_fwd_args(torch.ones(4, 16, dtype=torch.int32)))


@needs_extension
def test_backward_argument_checks():
    dy = torch.randn(4, 16)
    rstd = torch.ones(4)
    mean = torch.zeros(4)

    def call(**overrides):
        args = dict(dy=dy, dh_in=None, x=dy, residual=None, h=None, weight=None, bias_dtype=None,
                    residual_scale=None, scale_value=1.0, mean=mean, rstd=rstd, dropout_p=0.0, keep_threshold=0,
                    seed=None, is_rms=False, x_dtype=torch.float32, residual_dtype=None, store_dresidual=False)
        args.update(overrides)
        return torch.ops.fusednorm.cuda_bwd(*args.values())

    with pytest.raises(ValueError, match="needs h .* or x"):
        call(x=None)
    with pytest.raises(TypeError, match="dy must have x's dtype"):
        call(x_dtype=torch.float16)
    with pytest.raises(ValueError, match="recomputing h needs the residual"):
        call(residual_dtype=torch.float32)
    with pytest.raises(ValueError, match="rstd must be a contiguous"):
        call(rstd=torch.ones(5))
    with pytest.raises(ValueError, match="mean must be a contiguous"):
        call(mean=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="store_dresidual needs residual_dtype"):
        call(store_dresidual=True)
    with pytest.raises(ValueError, match="dh_in must have shape"):
        call(dh_in=torch.randn(4, 8))
    with pytest.raises(ValueError, match="learned residual_scale needs the residual"):
        call(h=dy, residual_dtype=torch.float32, residual_scale=torch.ones(16))


@needs_extension
@pytest.mark.parametrize("is_rms, store_h", [(False, False), (True, True)])
def test_fake_functions_give_the_contract_shapes(is_rms, store_h):
    x = torch.empty(6, 10, dtype=torch.float16, device="meta")
    residual = torch.empty(6, 10, dtype=torch.float32, device="meta")
    y, h, mean, rstd = _call_fwd(**_fwd_args(x, residual=residual, is_rms=is_rms, store_h=store_h,
                                             h_dtype=torch.float32))
    assert y.shape == (6, 10) and y.dtype == torch.float16
    assert h.shape == ((6, 10) if store_h else (0,)) and h.dtype == torch.float32
    assert mean.shape == ((0,) if is_rms else (6,)) and rstd.shape == (6,) and rstd.dtype == torch.float32
    weight = torch.empty(10, dtype=torch.float32, device="meta")
    scale = torch.empty((), dtype=torch.float16, device="meta")
    dx, dres, dw, db, ds = torch.ops.fusednorm.cuda_bwd(
        y, None, x, residual, None, weight, torch.float16, scale, 1.0, mean, rstd, 0.0, 0, None, is_rms,
        torch.float16, torch.float32, True)
    assert dx.shape == (6, 10) and dx.dtype == torch.float16
    assert dres.shape == (6, 10) and dres.dtype == torch.float32
    assert dw.shape == (10,) and dw.dtype == torch.float32
    assert db.shape == (10,) and db.dtype == torch.float16
    assert ds.shape == () and ds.dtype == torch.float16


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
