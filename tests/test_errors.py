"""Issue 13, items 4 and 5: no gradient for unused parameters, and errors that say what went wrong.

Each test failed before its fix (checked on the parent commit): weight/bias got zero gradients when only
h was used; an in-place change of a saved 3-d x raised autograd's "a view was created in no_grad mode";
torch.func transforms said "must override the setup_context staticmethod"; sparse / nested x gave
RuntimeErrors naming no argument; TRITON_INTERPRET=1 set after triton's import listed triton as available
and then failed with "Cannot call @triton.jit'd outside of the scope of a kernel". (Double backward:
tests/test_export.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fusednorm

BACKENDS = fusednorm.available_backends("cpu")
N = 8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_parameters_that_only_y_uses_get_no_gradient_when_y_is_unused(backend, rms):
    """Pre-LN, only h used downstream: weight and bias get None (as in eager torch: they take no part in h),
    so AdamW leaves them untouched; x, the residual and a learned scale still get theirs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, N, generator=gen, requires_grad=True)
    residual = torch.randn(2, 3, N, generator=gen, requires_grad=True)
    weight = torch.nn.Parameter(torch.ones(N))
    bias = None if rms else torch.nn.Parameter(torch.zeros(N))
    scale = torch.nn.Parameter(torch.full((N,), 0.5))
    if rms:
        _, h = fusednorm.add_rms_norm(x, residual, weight, residual_scale=scale, prenorm=True, backend=backend)
    else:
        _, h = fusednorm.add_layer_norm(x, residual, weight, bias, residual_scale=scale, prenorm=True, backend=backend)
    dh = torch.randn(h.shape, generator=gen)
    (h * dh).sum().backward()
    assert weight.grad is None and (bias is None or bias.grad is None)
    torch.testing.assert_close(x.grad, dh)
    torch.testing.assert_close(residual.grad, dh * 0.5)
    torch.testing.assert_close(scale.grad, (dh * residual.detach()).sum((0, 1)))
    params = [weight] + ([bias] if bias is not None else [])
    before = [p.detach().clone() for p in params]
    torch.optim.AdamW(params + [scale], lr=0.01, weight_decay=0.01).step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


@pytest.mark.usefixtures("torch_function_path")  # the Function path (see tests/conftest.py)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("under_no_grad", [False, True])
def test_changing_a_saved_input_in_place_fails_like_eager(backend, under_no_grad):
    """x (3-d: the functions take (M, N) rows of it) and the residual are saved for the backward of a learned
    scale; an in-place change before backward raises eager's 'modified by an inplace operation'."""
    w = torch.ones(N, requires_grad=True)
    for changed in ("x", "residual"):
        leaf = torch.randn(2, 3, N, requires_grad=True)
        x, residual = leaf * 1.0, torch.randn(2, 3, N)
        y = fusednorm.add_layer_norm(x, residual, w, residual_scale=torch.ones(N, requires_grad=True),
                                     backend=backend)
        target = x if changed == "x" else residual
        if under_no_grad:
            with torch.no_grad():
                target.add_(1.0)
        else:
            target.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("transform", ["vmap", "grad", "jacrev"])
def test_torch_func_transforms_say_they_are_not_supported(transform):
    w = torch.ones(N)
    fn = {"vmap": lambda t: fusednorm.layer_norm(t, w), "grad": lambda t: fusednorm.rms_norm(t, w).sum(),
          "jacrev": lambda t: fusednorm.add_layer_norm(t, t, w)}[transform]
    with pytest.raises(RuntimeError, match="fusednorm does not support torch.func transforms"):
        getattr(torch.func, transform)(fn)(torch.randn(3, N))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors", "ignore:Sparse CSR tensor support")
def test_sparse_and_nested_x_are_refused_naming_x():
    w = torch.ones(N)
    pieces = [torch.randn(2, N), torch.randn(3, N)]
    for x, expected in ((torch.randn(4, N).to_sparse(), "layout torch.sparse_coo"),
                        (torch.randn(4, N).to_sparse_csr(), "layout torch.sparse_csr"),
                        (torch.nested.nested_tensor(pieces), "nested tensor"),
                        (torch.nested.nested_tensor(pieces, layout=torch.jagged), "nested tensor")):
        for call in (lambda x=x: fusednorm.layer_norm(x, w), lambda x=x: fusednorm.add_rms_norm(x, None, w)):
            with pytest.raises(TypeError, match=f"x must be a dense \\(strided\\) tensor, got .*{expected}"):
                call()


_LATE_INTERPRET = """
import os, torch, triton
os.environ["TRITON_INTERPRET"] = "1"
import fusednorm
print(fusednorm.available_backends("cpu"))
try:
    fusednorm.layer_norm(torch.randn(4, 8), backend="triton")
except fusednorm.BackendUnavailableError as e:
    print(e)
"""


def test_triton_interpret_set_after_triton_was_imported_is_detected():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _LATE_INTERPRET], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    listed, message = run.stdout.strip().splitlines()[-2:]
    assert listed == "['torch']"
    assert "TRITON_INTERPRET=1 was set after triton had been imported" in message
    assert "before anything imports triton" in message
