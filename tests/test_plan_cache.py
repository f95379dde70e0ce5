"""The eager call plans (fusednorm._plan): a plan cached for one call is never used for a call that differs in a
fact the plan depends on (dtype, device, sizes, strides, layout, requires_grad, Python types, scalars), with
torch's C++ tensor guard checking the tensors' facts and with the Python fallback. Each result is compared with a
float64 reference computed here, so a stale plan (a wrong stride, dtype or shape used) fails."""

import pytest
import torch
import torch.nn.functional as F
from _backend_targets import TARGETS  # tests/ is on sys.path (pytest's rootdir import)

import fusednorm
from fusednorm import _plan

N = 8


@pytest.fixture(params=["tensor-guard", "python-facts"])
def facts_check(request, monkeypatch):
    """Plans cached afresh, their tensors' facts checked by torch's tensor guard or by the Python fallback."""
    monkeypatch.setattr(_plan, "_PLANS", {})
    if request.param == "python-facts":
        monkeypatch.setattr(_plan, "_TensorGuards", None)
    elif _plan._TensorGuards is None:
        pytest.fail("torch's tensor guard is missing or failed fusednorm's self-test: eager calls take the "
                    "slower Python facts check (see fusednorm._plan._tensor_guards_work)")
    return request.param


@pytest.fixture(params=TARGETS)
def target(request, monkeypatch):
    backend, device, set_up = request.param
    if set_up is not None:
        set_up(monkeypatch)
    return backend


def _reference(x, residual=None, weight=None, bias=None, scale=1.0):
    h = x.double() if residual is None else residual.double() * (scale.double() if torch.is_tensor(scale)
                                                                   else scale) + x.double()
    return F.layer_norm(h, (h.shape[-1],), None if weight is None else weight.double(),
                        None if bias is None else bias.double(), 1e-5)


def _check(y, ref, msg=""):
    assert y.shape == ref.shape, msg
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{msg}: {m}")


def _variations():
    """(name, make) pairs: make() -> (x, residual, weight, bias, scale) after a first call with the plain ones."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    return [
        ("plain", lambda: (rand(4, N), None, rand(N), rand(N), None)),
        ("weight float64", lambda: (rand(4, N), None, rand(N, dtype=torch.float64), rand(N), None)),
        ("strided weight", lambda: (rand(4, N), None, rand(2 * N)[::2], rand(N), None)),
        ("strided bias", lambda: (rand(4, N), None, rand(N), rand(N, 2)[:, 1], None)),
        ("transposed x", lambda: (rand(N, 4).t(), None, rand(N), rand(N), None)),
        ("row-strided x", lambda: (rand(4, 2 * N)[:, :N], None, rand(N), rand(N), None)),
        ("3-d x", lambda: (rand(2, 2, N), None, rand(N), rand(N), None)),
        ("more rows", lambda: (rand(6, N), None, rand(N), rand(N), None)),
        ("no bias", lambda: (rand(4, N), None, rand(N), None, None)),
        ("x requires grad", lambda: (rand(4, N).requires_grad_(), None, rand(N), rand(N), None)),
        ("residual", lambda: (rand(4, N), rand(4, N), rand(N), rand(N), None)),
        ("strided residual", lambda: (rand(4, N), rand(N, 4).t(), rand(N), rand(N), None)),
        ("scalar scale", lambda: (rand(4, N), rand(4, N), rand(N), rand(N), rand(()))),
        ("vector scale", lambda: (rand(4, N), rand(4, N), rand(N), rand(N), rand(N))),
        ("strided vector scale", lambda: (rand(4, N), rand(4, N), rand(N), rand(N), rand(2 * N)[::2])),
        ("constant scale", lambda: (rand(4, N), rand(4, N), rand(N), rand(N), 0.5)),
    ]


def _call(backend, x, residual, weight, bias, scale):
    if residual is None:
        return fusednorm.layer_norm(x, weight, bias, backend=backend)
    return fusednorm.add_layer_norm(x, residual, weight, bias, residual_scale=scale, backend=backend)


def test_each_call_gets_a_plan_for_its_own_tensors(facts_check, target):
    """Plain calls and each variation in turn: a plan cached for one must not serve the other (most variations
    share the plain call's key, x's shape and the Python types and scalars: only the tensors' facts differ)."""
    (_, plain), *variations = _variations()
    for name, make in variations:
        for step, args in enumerate((plain(), make(), plain(), make())):
            x, residual, weight, bias, scale = args
            _check(_call(target, *args), _reference(x, residual, weight, bias, 1.0 if scale is None else scale),
                   f"{name}, call {step}")


def test_a_module_changed_in_place_gets_a_new_plan(facts_check):
    """module.to() and param.data = ... keep the Parameter objects and change their facts."""
    module = fusednorm.LayerNorm(N)
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    x = torch.randn(4, N)
    _check(module(x), _reference(x, None, module.weight, module.bias))
    module.to(torch.float64)
    assert module.weight.dtype == torch.float64
    _check(module(x.double()), _reference(x, None, module.weight, module.bias))
    module.weight.data = torch.randn(2 * N, dtype=torch.float64)[::2]  # same shape, stride 2
    _check(module(x.double()), _reference(x, None, module.weight, module.bias))
    module.weight.data = torch.randn(N + 1, dtype=torch.float64)  # now wrong for x: an error, not a stale plan
    with pytest.raises(ValueError, match="weight"):
        module(x.double())


def test_a_cached_call_still_rejects_bad_arguments(facts_check):
    x, weight = torch.randn(4, N), torch.randn(N)
    fusednorm.layer_norm(x, weight, eps=1e-5)
    with pytest.raises(TypeError, match="eps"):
        fusednorm.layer_norm(x, weight, eps=True)  # True == 1 == 1.0: the key holds the types too
    with pytest.raises(ValueError, match="weight"):
        fusednorm.layer_norm(x, weight.to("meta"))
    with pytest.raises(ValueError, match="weight"):
        fusednorm.layer_norm(x, torch.randn(N + 1))
    fusednorm.add_layer_norm(x, torch.randn(4, N), weight, prenorm=False)
    with pytest.raises(TypeError, match="prenorm"):
        fusednorm.add_layer_norm(x, torch.randn(4, N), weight, prenorm=0)
    with pytest.raises(TypeError, match="residual"):
        fusednorm.add_layer_norm(x, torch.randn(4, N, dtype=torch.float64), weight)


def test_the_plan_cache_holds_one_entry_per_signature(facts_check):
    """Repeated calls reuse their plan (no growth), and a key keeps at most _MAX_PLANS_PER_KEY plans."""
    x, weight = torch.randn(4, N), torch.randn(N)
    for _ in range(3):
        fusednorm.layer_norm(x, weight)
    assert sum(len(entries) for entries in _plan._PLANS.values()) == 1
    for i in range(_plan._MAX_PLANS_PER_KEY + 3):  # same key (x's shape, types, scalars); other weight strides
        fusednorm.layer_norm(x, torch.randn(N, i + 1)[:, 0])
    assert max(len(entries) for entries in _plan._PLANS.values()) == _plan._MAX_PLANS_PER_KEY


def _call_kinds():
    x, r, w, b, s = torch.randn(4, N), torch.randn(4, N), torch.randn(N), torch.randn(N), torch.randn(N)
    x3 = torch.randn(2, 2, N)
    ln, add_rms = fusednorm.LayerNorm(N), fusednorm.AddRMSNorm(N, residual_scale="scalar", prenorm=True)
    return [
        ("layer_norm", lambda: fusednorm.layer_norm(x, w, b)),
        ("layer_norm 3-d", lambda: fusednorm.layer_norm(x3, w, b)),
        ("layer_norm no affine", lambda: fusednorm.layer_norm(x)),
        ("rms_norm", lambda: fusednorm.rms_norm(x, w)),
        ("rms_norm eps None", lambda: fusednorm.rms_norm(x, w, eps=None)),
        ("add_layer_norm", lambda: fusednorm.add_layer_norm(x, r, w, b)),
        ("add_layer_norm no residual", lambda: fusednorm.add_layer_norm(x, None, w, b)),
        ("add_rms_norm prenorm", lambda: fusednorm.add_rms_norm(x, r, w, prenorm=True)),
        ("add_rms_norm residual_in_fp32", lambda: fusednorm.add_rms_norm(x, r, w, residual_in_fp32=True)),
        ("add_layer_norm constant scale", lambda: fusednorm.add_layer_norm(x, r, w, b, residual_scale=0.5)),
        ("add_layer_norm vector scale", lambda: fusednorm.add_layer_norm(x, r, w, b, residual_scale=s)),
        ("add_layer_norm dropout", lambda: fusednorm.add_layer_norm(x, r, w, b, dropout_p=0.1)),
        ("add_layer_norm residual is x", lambda: fusednorm.add_layer_norm(x, x, w, b)),
        ("layer_norm bias is weight", lambda: fusednorm.layer_norm(x, w, w)),
        ("LayerNorm module", lambda: ln(x)),
        ("AddRMSNorm module", lambda: add_rms(x, r)),
    ]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_repeated_calls_are_checked_once(facts_check, target, grad, monkeypatch):
    """Each kind of call is checked and planned at its first call at most (add_layer_norm without a residual
    finds layer_norm's plan): later calls find their plan."""
    fusednorm.set_backend(target)
    checked = []
    real = _plan.checked
    monkeypatch.setattr(_plan, "checked", lambda *args: checked.append(args) or real(*args))
    for name, call in _call_kinds():
        checked.clear()
        with torch.set_grad_enabled(grad):
            for _ in range(3):
                call()
        assert len(checked) <= 1, f"{name}: {len(checked)} full checks in 3 calls"


def test_the_plan_cache_keeps_no_tensor_alive(facts_check):
    """Plans hold facts, not tensors: an activation or a parameter is freed when its caller drops it."""
    import gc
    import weakref

    x, weight, residual, scale = torch.randn(4, N), torch.randn(N), torch.randn(4, N), torch.randn(N)
    fusednorm.layer_norm(x, weight)
    fusednorm.add_layer_norm(x, residual, weight, residual_scale=scale)
    refs = [weakref.ref(t) for t in (x, weight, residual, scale)]
    del x, weight, residual, scale
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert _plan._PLANS  # the plans themselves are still cached
