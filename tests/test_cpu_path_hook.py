"""The eager layer's hook for the CPU path (fusednorm.cpu_path): which calls it takes, with which arguments."""

import pytest
import torch

import fusednorm
from fusednorm import _plan, cpu_path


@pytest.fixture
def direct(monkeypatch):
    """cpu_path.usable says yes to every call it is asked about; the functions of cpu_path.specialize record
    their arguments with the signature they were made for."""
    calls, asked = [], []

    def usable(*args):
        asked.append(args)
        return True

    def specialize(variant, x_dtype, residual_dtype, weight_dtype, bias_dtype, scale_dtype, eps, scale_value,
                   dropout_p, weight_offset=0.0):
        def run(x, residual, weight, bias, residual_scale):
            calls.append(dict(variant=variant, x=x, residual=residual, weight=weight, bias=bias,
                              residual_scale=residual_scale, eps=eps, scale_value=scale_value, dropout_p=dropout_p))
            y = torch.full_like(x, 7.0)
            return (y, y + 1) if variant.prenorm else y
        return run

    monkeypatch.setattr(cpu_path, "usable", usable)
    monkeypatch.setattr(cpu_path, "specialize", specialize)
    _plan.clear()
    yield calls, asked
    _plan.clear()


@pytest.mark.parametrize("grad", [False, True])
def test_eager_cpu_calls_take_the_cpu_path_with_the_callers_tensors(direct, grad):
    calls, asked = direct
    x, r = torch.randn(2, 3, 8, requires_grad=grad), torch.randn(2, 3, 8)
    w, b = torch.randn(8), torch.randn(8)
    with torch.set_grad_enabled(grad):
        y, h = fusednorm.add_layer_norm(x, r, w, b, 1e-3, residual_scale=0.5, prenorm=True)
        fusednorm.add_layer_norm(x, r, w, b, 1e-3, residual_scale=0.5, prenorm=True)
    assert torch.equal(y, torch.full_like(x, 7.0)) and torch.equal(h, torch.full_like(x, 8.0))
    assert len(calls) == 2 and len(asked) == 1  # decided once per call signature
    c = calls[0]
    assert c["x"] is x and c["residual"] is r and c["weight"] is w and c["bias"] is b  # not the (M, N) rows
    assert (c["eps"], c["scale_value"], c["dropout_p"], c["residual_scale"]) == (1e-3, 0.5, 0.0, 0.5)
    assert c["variant"].prenorm and c["variant"].has_residual and not c["variant"].is_rms


def test_every_public_function_has_the_hook(direct):
    calls, _ = direct
    x, r, w = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8)
    fusednorm.layer_norm(x, w)
    fusednorm.rms_norm(x, w, None)
    fusednorm.add_layer_norm(x, r, w)
    fusednorm.add_rms_norm(x, r, w, residual_scale=torch.ones(8), dropout_p=0.25)
    assert [(c["variant"].is_rms, c["residual"] is r) for c in calls] == [
        (False, False), (True, False), (False, True), (True, True)]
    assert calls[1]["eps"] == torch.finfo(torch.float32).eps and calls[3]["dropout_p"] == 0.25


def test_no_cpu_path_for_other_backends_telemetry_or_applied_functions(direct):
    calls, asked = direct
    x, r, w = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8)
    fusednorm.rms_norm(x, w, backend="triton") if "triton" in fusednorm.available_backends("cpu") else None
    assert fusednorm.LayerNormFunction.apply(x, w).shape == x.shape
    module = fusednorm.AddLayerNorm(8)
    with fusednorm.monitor(torch.nn.Sequential(module)):
        module(x, r)
    assert calls == []
    assert all(args[1] == "torch" for args in asked)


def test_compiled_calls_never_take_the_cpu_path(direct):
    calls, _ = direct
    x, r, w = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8)
    compiled = torch.compile(lambda x, r: fusednorm.add_rms_norm(x, r, w), backend="eager", fullgraph=True)
    assert not torch.equal(compiled(x, r), torch.full_like(x, 7.0))
    assert calls == []
