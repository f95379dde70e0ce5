"""The CUDA kernels of csrc/ run on the CPU: their templates compiled as host C++ together with the
host code the GPU path runs (csrc/host.h), through tests/_cuda_emulation.py. The float64-oracle matrix
(DESIGN section 6) runs them in tests/test_correctness.py (target "cuda-emulated",
``fusednorm.case_matrix.emulated``, weight_offset included); this file keeps what is the CUDA path's own:
bit-identical gradients, the vectorized and scalar paths agreeing, and NaN at a dropped position.

This is how CI without a GPU checks the kernels' logic: indexing, the 128-bit and scalar-tail paths,
chunked wide rows, the row reductions, the backward's column partials and their fixed-order sum,
dropout regenerated in the backward, store_h statistics; and the host side: the flag word decoded,
the parameter structs filled, the alignment test, the launch block. It does not check what only the
device compiler and hardware decide (register allocation, FMA contraction, the occupancy-derived
grid); tests/test_cuda_gpu.py does, on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from _cuda_emulation import install_as_cuda

import fusednorm


@pytest.fixture
def as_cuda_backend(monkeypatch):
    """backend="cuda" runs the emulated kernels on CPU tensors for the duration of a test."""
    return install_as_cuda(monkeypatch)


def test_emulated_gradients_bit_identical_and_strided_input(as_cuda_backend):
    def run():
        gen = torch.Generator().manual_seed(0)
        base = torch.randn(40, 130, generator=gen) + 2
        x = base[:, 1:129].clone().requires_grad_(True)  # contiguous rows of 128: the 128-bit path
        strided = base[:, 1:129]  # rows 130 apart, unaligned start: the scalar path
        residual = torch.randn(40, 128, generator=gen, requires_grad=True)
        weight = torch.randn(128, generator=gen, requires_grad=True)
        bias = torch.randn(128, generator=gen, requires_grad=True)
        scale = torch.rand((), generator=gen).requires_grad_(True)
        torch.manual_seed(5)
        y = fusednorm.add_layer_norm(x, residual, weight, bias, residual_scale=scale, dropout_p=0.1, backend="cuda")
        y.backward(torch.randn(40, 128, generator=gen))
        torch.manual_seed(5)
        y_strided = fusednorm.add_layer_norm(strided, residual.detach(), weight.detach(), bias.detach(),
                                             residual_scale=scale.detach(), dropout_p=0.1, backend="cuda")
        return [y.detach(), y_strided, x.grad, residual.grad, weight.grad, bias.grad, scale.grad]

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first[0], first[1]), "vectorized and scalar paths give the same bits"


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_emulated_nonfinite_value_at_a_dropped_position_poisons_its_row(op, as_cuda_backend):
    import test_reliability  # the same check as for the other backends (a module attribute: not collected)

    test_reliability.test_nonfinite_value_at_a_dropped_position_still_poisons_its_row("cuda", op, float("nan"))
