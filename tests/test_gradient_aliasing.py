"""README's aliasing guarantee, exactly: outputs and gradients never share memory with the inputs, the
outputs never with each other nor with a gradient, and the parameter gradients are tensors of their own.
One exception, the same as eager PyTorch's ``x + residual``: when the residual is added unscaled, without
dropout, in x's dtype (``Variant.dresidual_is_dx``), d residual = d x and the backward hands one tensor to
both (``torch.autograd.grad`` returns it twice); accumulated ``.grad`` fields are still separate tensors.
On every backend this machine runs (tests/_backend_targets.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _backend_targets import TARGETS, target_fixture

import fusednorm


@pytest.fixture(params=TARGETS)
def target(request, monkeypatch) -> tuple[str, str]:
    return target_fixture(request, monkeypatch)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


# (id, keywords of add_layer_norm, residual in float32, whether eager x + residual would share dx and dresidual)
CALLS = [
    ("unscaled", {}, False, True),
    ("unscaled-prenorm", dict(prenorm=True), False, True),
    ("unscaled-residual_in_fp32", dict(prenorm=True, residual_in_fp32=True), False, True),
    ("constant-scale", dict(residual_scale=0.5), False, False),
    ("learned-scale", dict(residual_scale="vector"), False, False),
    ("dropout", dict(dropout_p=0.25), False, False),
    ("float32-residual", {}, True, False),
]


@pytest.mark.parametrize(("keywords", "residual_f32", "shared"), [c[1:] for c in CALLS], ids=[c[0] for c in CALLS])
def test_which_gradients_share_memory(target, keywords, residual_f32, shared):
    backend, device = target
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=gen).to(device, torch.bfloat16).requires_grad_()
    r = torch.randn(4, 8, generator=gen).to(device, torch.float32 if residual_f32 else torch.bfloat16)
    r.requires_grad_()
    w, b = (torch.rand(8, generator=gen).add(0.5).to(device).requires_grad_() for _ in range(2))
    keywords = dict(keywords)
    leaves = [x, r, w, b]
    if keywords.get("residual_scale") == "vector":
        keywords["residual_scale"] = torch.rand(8, generator=gen).add(0.5).to(device).requires_grad_()
        leaves.append(keywords["residual_scale"])
    out = fusednorm.add_layer_norm(x, r, w, b, **keywords, backend=backend)
    outs = out if keywords.get("prenorm") else (out,)
    loss = sum(o.float().square().sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves, retain_graph=True)
    dx, dresidual, *params = grads
    assert (dx is dresidual) == shared
    assert (_storage(dx) == _storage(dresidual)) == shared
    inputs = {_storage(t) for t in leaves}
    assert not inputs & {_storage(t) for t in (*outs, *grads)}
    assert len({_storage(t) for t in outs}) == len(outs)
    assert not {_storage(t) for t in outs} & {_storage(t) for t in grads}
    assert len({_storage(t) for t in (dx, *params)}) == 1 + len(params)
    if not keywords.get("dropout_p"):  # eager PyTorch shares in exactly the same calls
        scale = keywords.get("residual_scale", 1.0)
        xe, re = x.detach().requires_grad_(), r.detach().requires_grad_()
        h = re * scale + xe if not isinstance(scale, float) or scale != 1.0 else xe + re
        ye = F.layer_norm(h.float(), (8,), w.detach(), b.detach())
        dxe, dre = torch.autograd.grad(ye.square().sum(), [xe, re])
        assert (dxe is dre) == shared
    loss.backward()  # accumulated into .grad: separate tensors, also where the gradient was one
    assert _storage(x.grad) != _storage(r.grad)
