"""Public API: drop-in Functions, backend choice, dropout reproducibility, shapes, and every misuse."""

import dataclasses

import pytest
import torch
from _backend_targets import function_path  # tests/ is on sys.path (pytest's rootdir import)

import fusednorm
from fusednorm.dropout import dropout_keep_mask
from fusednorm.testing import Case, assert_section6, check_case, compare, peek_dropout_mask

N = 8


def _inputs(dtype=torch.float32, shape=(4, N)):
    x = torch.randn(*shape, dtype=dtype)
    return x, torch.randn(*shape, dtype=dtype), torch.ones(shape[-1], dtype=dtype), torch.zeros(shape[-1], dtype=dtype)


# ---- the helper itself must be able to fail -------------------------------------------------------

def test_comparison_fails_on_wrong_values_and_nan():
    case = Case("layer_norm", (2, 4))
    ref = torch.randn(2, 4, dtype=torch.float64)
    own = ref.float()
    assert compare(case, "y", ref.float(), ref, own).ok
    assert not compare(case, "y", (ref + 1e-3).float(), ref, own).ok
    nan = ref.float().clone()
    nan[0, 0] = float("nan")
    assert not compare(case, "y", nan, ref, own).ok
    assert not compare(case, "y", None, ref, own).ok
    ref_nan = ref.clone()
    ref_nan[1, 1] = float("nan")
    assert compare(case, "y", ref_nan.float(), ref_nan, ref_nan.float()).ok


def test_check_case_catches_a_wrong_backend(monkeypatch):
    from fusednorm.backends import torch_impl

    forward = torch_impl.forward

    def wrong(variant, args):
        result = forward(variant, args)
        return result._replace(y=result.y * 1.001)

    monkeypatch.setattr(torch_impl, "forward", wrong)
    function_path(monkeypatch)  # the torch backend itself, not the CPU path (fusednorm.cpu_path)
    assert not all(r.ok for r in check_case(Case("layer_norm", (4, 64)), "torch"))
    with pytest.raises(AssertionError, match="y: err"):
        assert_section6(check_case(Case("layer_norm", (4, 64)), "torch"))


def test_section6_assertion_fails_on_a_missing_output():
    """Every output and gradient of the case must be compared: one left out fails the assertion."""
    results = check_case(Case("add_rms_norm[vector,prenorm]", (3, 8)), "torch")
    assert_section6(results)
    assert {r.output for r in results} == {"y", "h", "dx", "dresidual", "dweight", "dresidual_scale"}
    with pytest.raises(AssertionError):
        assert_section6([r for r in results if r.output != "dresidual_scale"])
    with pytest.raises(AssertionError, match="nothing was compared"):
        assert_section6([])


def test_oracle_applies_weight_offset_from_the_formula(monkeypatch):
    """weight_offset: the affine weight is weight + weight_offset. A backend that ignores it fails the check
    (the inputs' stored weight is ~0 with an offset of 1, so the affine weight is ~1 either way)."""
    case = Case("rms_norm", (4, 16), weight_offset=1.0)
    function_path(monkeypatch)  # the torch backend itself, not the CPU path (fusednorm.cpu_path)
    assert_section6(check_case(case, "torch"))
    from fusednorm.backends import torch_impl

    forward, backward = torch_impl.forward, torch_impl.backward
    monkeypatch.setattr(torch_impl, "forward", lambda v, a: forward(v, dataclasses.replace(a, weight_offset=0.0)))
    monkeypatch.setattr(torch_impl, "backward", lambda v, a: backward(v, dataclasses.replace(a, weight_offset=0.0)))
    assert not all(r.ok for r in check_case(case, "torch"))


# ---- drop-in Functions and shapes ------------------------------------------------------------------

def test_functions_are_the_public_functions():
    x, r, w, b = _inputs()
    s = torch.full((N,), 0.5)
    assert torch.equal(fusednorm.LayerNormFunction.apply(x, w, b, 1e-5), fusednorm.layer_norm(x, w, b))
    assert torch.equal(fusednorm.RMSNormFunction.apply(x, w, 1e-6), fusednorm.rms_norm(x, w))
    y, h = fusednorm.AddLayerNormFunction.apply(x, r, w, b, 1e-5, s, 0.0, True, False)
    y2, h2 = fusednorm.add_layer_norm(x, r, w, b, residual_scale=s, prenorm=True)
    assert torch.equal(y, y2) and torch.equal(h, h2)
    assert torch.equal(fusednorm.AddRMSNormFunction.apply(x, r, w, 1e-6, 2.0), fusednorm.add_rms_norm(
        x, r, w, residual_scale=2.0))


def test_empty_batch_gives_empty_outputs_and_zero_param_grads():
    x = torch.randn(0, N, requires_grad=True)
    r = torch.randn(0, N, requires_grad=True)
    w = torch.ones(N, requires_grad=True)
    b = torch.zeros(N, requires_grad=True)
    s = torch.ones(N, requires_grad=True)
    y, h = fusednorm.add_layer_norm(x, r, w, b, residual_scale=s, prenorm=True)
    assert y.shape == (0, N) and h.shape == (0, N)
    (y.sum() + h.sum()).backward()
    for p in (w, b, s):
        assert torch.equal(p.grad, torch.zeros(N))
    assert x.grad.shape == (0, N)


def test_non_contiguous_input_equals_contiguous():
    base = torch.randn(N, 6, 5).transpose(0, 2)  # (5, 6, N), last dim strided
    r = torch.randn(5, 6, 2 * N)[..., ::2]
    w = torch.rand(N) + 0.5
    y = fusednorm.add_rms_norm(base, r, w, residual_scale=0.5)
    assert torch.equal(y, fusednorm.add_rms_norm(base.contiguous(), r.contiguous(), w, residual_scale=0.5))


def test_prenorm_returns_h_in_requested_dtype():
    x, r, w, b = _inputs(torch.bfloat16)
    y, h = fusednorm.add_layer_norm(x, r, w, b, prenorm=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    y, h = fusednorm.add_layer_norm(x, r, w, b, prenorm=True, residual_in_fp32=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(h, x.float() + r.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_rms_norm_eps_none_matches_torch(dtype):
    x = (torch.randn(3, N) * 1e-4).to(dtype)  # small enough that eps matters
    ref = torch.nn.functional.rms_norm(x, (N,), eps=None)
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    torch.testing.assert_close(fusednorm.rms_norm(x, None, None), ref, atol=tol, rtol=tol)


# ---- dropout ------------------------------------------------------------------------------------

def test_dropout_is_reproducible_under_manual_seed_and_varies_otherwise():
    x, r, w, b = _inputs(shape=(16, 64))
    torch.manual_seed(3)
    y1 = fusednorm.add_layer_norm(x, r, w, b, dropout_p=0.5)
    torch.manual_seed(3)
    y2 = fusednorm.add_layer_norm(x, r, w, b, dropout_p=0.5)
    y3 = fusednorm.add_layer_norm(x, r, w, b, dropout_p=0.5)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


def test_dropout_mask_is_recoverable_and_used():
    x = torch.randn(8, 32)
    torch.manual_seed(11)
    mask = peek_dropout_mask("cpu", 8, 32, 0.4)
    _, h = fusednorm.add_layer_norm(x, torch.zeros_like(x), None, prenorm=True, dropout_p=0.4)
    assert torch.equal(h != 0, mask)
    torch.testing.assert_close(h, torch.where(mask, x / 0.6, 0.0))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(p):
    mask = dropout_keep_mask(torch.tensor([12345]), 256, 512, p)
    rate = mask.float().mean().item()
    assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / mask.numel()) ** 0.5 + 1e-4


def test_dropout_mask_known_answer():
    """Philox4x32-10 known-answer vector (Random123): counter 0, key 0 -> first word 0x6627e8d5."""
    from fusednorm.dropout import philox_r0

    assert philox_r0(torch.tensor([0]), torch.tensor([0])).item() == 0x6627E8D5


# ---- backend choice ----------------------------------------------------------------------------

def test_backend_choice():
    x = torch.randn(2, N)
    assert fusednorm.backends.resolve("auto", x.device) == "torch"
    fusednorm.set_backend("torch")
    assert fusednorm.get_backend() == "torch"
    assert torch.equal(fusednorm.layer_norm(x), fusednorm.layer_norm(x, backend="torch"))
    assert "torch" in fusednorm.available_backends("cpu")


def test_unavailable_backend_says_why():
    x = torch.randn(2, N)
    if "cuda" not in fusednorm.available_backends("cpu"):
        with pytest.raises(fusednorm.BackendUnavailableError, match="cuda backend"):
            fusednorm.layer_norm(x, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        fusednorm.layer_norm(x, backend="cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        fusednorm.set_backend("fast")
    with pytest.raises(TypeError, match="backend must be a str"):
        fusednorm.layer_norm(x, backend=1)


# ---- misuse: every bad argument is named --------------------------------------------------------

X = torch.randn(4, N)
R = torch.randn(4, N)
W = torch.ones(N)
BAD_CALLS = [
    ("x not a tensor", lambda: fusednorm.layer_norm([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    ("x integer", lambda: fusednorm.layer_norm(torch.ones(2, N, dtype=torch.int32)), TypeError, "x must be float16"),
    ("x 0-d", lambda: fusednorm.layer_norm(torch.tensor(1.0)), ValueError, "x must have at least one dimension"),
    ("x N=0", lambda: fusednorm.layer_norm(torch.ones(2, 0)), ValueError, "last dimension N >= 1"),
    ("weight shape", lambda: fusednorm.layer_norm(X, torch.ones(N + 1)), ValueError, "weight must have shape"),
    ("weight broadcastable", lambda: fusednorm.layer_norm(X, torch.ones(1)), ValueError, "weight must have shape"),
    ("weight 2-d", lambda: fusednorm.rms_norm(X, torch.ones(1, N)), ValueError, "weight must have shape"),
    ("bias shape", lambda: fusednorm.layer_norm(X, W, torch.ones(3)), ValueError, "bias must have shape"),
    ("weight dtype", lambda: fusednorm.layer_norm(X, W.int()), TypeError, "weight must be a float16, bfloat16"),
    ("weight device", lambda: fusednorm.layer_norm(X, W.to("meta")), ValueError, "weight must be on x's device"),
    ("weight type", lambda: fusednorm.layer_norm(X, [1.0] * N), TypeError, "weight must be a torch.Tensor"),
    ("residual shape", lambda: fusednorm.add_layer_norm(X, torch.randn(4, 1), W), ValueError,
     "residual must have x's shape"),
    ("residual dtype", lambda: fusednorm.add_layer_norm(X, R.double(), W), TypeError, "residual must have x's dtype"),
    ("residual device", lambda: fusednorm.add_rms_norm(X, R.to("meta"), W), ValueError, "residual must be on"),
    ("residual type", lambda: fusednorm.add_rms_norm(X, 1.0, W), TypeError, "residual must be a torch.Tensor"),
    ("eps negative", lambda: fusednorm.layer_norm(X, eps=-1.0), ValueError, "eps must be a finite float >= 0"),
    ("eps tensor", lambda: fusednorm.layer_norm(X, eps=torch.tensor(1e-5)), TypeError, "eps must be a Python float"),
    ("p = 1", lambda: fusednorm.add_layer_norm(X, R, W, dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("p < 0", lambda: fusednorm.add_layer_norm(X, R, W, dropout_p=-0.1), ValueError, r"dropout_p must be in"),
    ("p type", lambda: fusednorm.add_layer_norm(X, R, W, dropout_p="0.1"), TypeError, "dropout_p must be"),
    ("scale shape", lambda: fusednorm.add_layer_norm(X, R, W, residual_scale=torch.ones(N - 1)), ValueError,
     "residual_scale must be a 0-d tensor or have shape"),
    ("scale (1,)", lambda: fusednorm.add_layer_norm(X, R, W, residual_scale=torch.ones(1)), ValueError,
     "residual_scale must be a 0-d tensor"),
    ("scale type", lambda: fusednorm.add_layer_norm(X, R, W, residual_scale="vector"), TypeError,
     "residual_scale must be None, a Python float"),
    ("scale dtype", lambda: fusednorm.add_layer_norm(X, R, W, residual_scale=torch.ones(N, dtype=torch.int64)),
     TypeError, "residual_scale must be a float16, bfloat16, float32 or float64 tensor"),
    ("scale without residual", lambda: fusednorm.add_layer_norm(X, None, W, residual_scale=2.0), ValueError,
     "residual_scale was given but residual is None"),
    ("prenorm type", lambda: fusednorm.add_layer_norm(X, R, W, prenorm=1), TypeError, "prenorm must be a bool"),
    ("residual_in_fp32 type", lambda: fusednorm.add_rms_norm(X, R, W, residual_in_fp32="yes"), TypeError,
     "residual_in_fp32 must be a bool"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_misuse_raises_with_argument_name(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_available_backends_for_cuda_tensors_without_a_gpu_is_empty(monkeypatch):
    """No CUDA device: no backend can run on CUDA tensors, so none is listed for them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fusednorm.available_backends("cuda") == []
    assert "torch" in fusednorm.available_backends("cpu")
