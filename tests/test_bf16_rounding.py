"""float32 -> bfloat16 rounds to nearest even on every backend, the Triton interpreter included
(``fusednorm.triton.helpers.rounded_to``; the interpreter alone would truncate: 57% of a bf16 y
bit-identical to the torch backend's, every other element one ulp toward zero).

Where two backends compute the same float32 values they give the same bits. Which outputs that holds
for: h (residual * scale + x) is element-wise, the same float32 value on every backend: the same bits. y, dx
and dresidual are element-wise functions of the inputs and of per-row float32 statistics (mean, rstd, the
backward's row sums); each backend sums the rows in its own order (torch's vectorised sum, a Triton tree,
CUDA warp shuffles), so the statistics may differ in their last float32 bit; a 16-bit output then differs,
by one ulp, only where its float32 value lies within that bit of a rounding boundary (~2^-16 of the
elements; at most 1e-3 of them are allowed), and a float32 output in its last bits. The column sums
(dweight, dbias, dscale) add the rows in another partition (per-program partials, then their sum): a few
ulp of their dtype.

Public API only (tests/_backend_targets.py), so that the same file runs against older revisions. The reference
is the torch backend itself (its autograd Function, ``cpu_path.disabled()``): the CPU path lets autograd
round 16-bit gradients between ATen's ops (tests/test_cpu_path.py holds it to its own guarantees).
"""

from __future__ import annotations

import pytest
import torch
from _backend_targets import TARGETS, target_fixture

import fusednorm
from fusednorm import cpu_path

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(params=[t for t in TARGETS if t.id not in ("torch", "cpu-path")])
def target(request, monkeypatch) -> tuple[str, str]:
    return target_fixture(request, monkeypatch)


# (name, function, x dtype, residual dtype or None, parameter dtype, keywords)
CASES = [
    ("add_layer_norm-prenorm-bf16", "add_layer_norm", BF16, BF16, BF16, dict(prenorm=True)),
    ("add_layer_norm-deepnorm-bf16", "add_layer_norm", BF16, BF16, BF16, dict(residual_scale=0.7071067811865476)),
    ("add_layer_norm-learned-scale-bf16", "add_layer_norm", BF16, BF16, F32, dict(residual_scale="vector")),
    ("add_rms_norm-fp32-stream-bf16", "add_rms_norm", BF16, F32, F32, dict(prenorm=True)),
    ("add_rms_norm-residual_in_fp32-bf16", "add_rms_norm", BF16, BF16, BF16, dict(prenorm=True, residual_in_fp32=True)),
    ("layer_norm-fp32-params-bf16", "layer_norm", BF16, None, F32, {}),
    ("rms_norm-bf16", "rms_norm", BF16, None, BF16, {}),
    ("add_layer_norm-prenorm-fp16", "add_layer_norm", F16, F16, F16, dict(prenorm=True)),  # control: fp16
]
ROWS, COLS = 16, 256
# The share of a 16-bit output that may differ (each by one ulp): elements whose float32 value is within the
# row statistics' last bit of a rounding boundary; ~2^-16 of them are, so ~0.1 of 4096 (one observed).
# Truncation makes ~43% differ.
MAX_BOUNDARY_FLIPS = 1e-3


def _run(backend: str, device: str, function: str, x_dtype, r_dtype, p_dtype, keywords: dict) -> dict:
    gen = torch.Generator().manual_seed(0)

    def rows(dtype):
        return (torch.randn(ROWS, COLS, generator=gen) + 3 * torch.randn(ROWS, 1, generator=gen)).to(dtype)

    x = rows(x_dtype)
    r = rows(r_dtype) if r_dtype is not None else None
    w = (1 + 0.2 * torch.randn(COLS, generator=gen)).to(p_dtype)
    b = (0.2 * torch.randn(COLS, generator=gen)).to(p_dtype)
    dy, dh = (torch.randn(ROWS, COLS, generator=gen).to(x_dtype) for _ in range(2))
    keywords = dict(keywords)
    scale = None
    if keywords.get("residual_scale") == "vector":
        scale = (1 + 0.3 * torch.randn(COLS, generator=gen)).to(p_dtype).to(device).requires_grad_()
        keywords["residual_scale"] = scale
    leaves = {k: t.to(device).requires_grad_() for k, t in dict(x=x, residual=r, weight=w, bias=b).items()
              if t is not None}
    if function.endswith("layer_norm"):
        args = [leaves["x"], leaves["residual"]] if function.startswith("add_") else [leaves["x"]]
        out = getattr(fusednorm, function)(*args, leaves["weight"], leaves["bias"], **keywords, backend=backend)
    else:
        del leaves["bias"]
        args = [leaves["x"], leaves["residual"]] if function.startswith("add_") else [leaves["x"]]
        out = getattr(fusednorm, function)(*args, leaves["weight"], **keywords, backend=backend)
    y, h = out if keywords.get("prenorm") else (out, None)
    torch.autograd.backward([y] + ([h] if h is not None else []),
                            [dy.to(device)] + ([dh.to(h.dtype).to(device)] if h is not None else []))
    result = {"y": y, "h": h, "dscale": scale.grad if scale is not None else None}
    result |= {"d" + k: t.grad for k, t in leaves.items()}
    return {k: v.detach().cpu() for k, v in result.items() if v is not None}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_bits_as_the_torch_backend(target, case):
    backend, device = target
    _, function, x_dtype, r_dtype, p_dtype, keywords = case
    with cpu_path.disabled():
        want = _run("torch", "cpu", function, x_dtype, r_dtype, p_dtype, keywords)
    got = _run(backend, device, function, x_dtype, r_dtype, p_dtype, keywords)
    assert got.keys() == want.keys()
    for name in want:
        g, w = got[name], want[name]
        assert g.dtype == w.dtype, name
        eps = torch.finfo(w.dtype).eps
        if name in ("dweight", "dbias", "dscale"):  # column sums over another partition of the rows
            torch.testing.assert_close(g, w, rtol=4 * eps, atol=4 * eps * float(w.abs().max()), msg=name)
        elif name == "h":  # no statistic enters h: the same float32 value, rounded the same way
            assert torch.equal(g, w), f"h: {(g == w).float().mean():.1%} bit-identical"
        elif w.dtype == F32:  # float32 results of the row statistics: their last bits may differ
            torch.testing.assert_close(g, w, msg=name)
        else:  # 16-bit results of the row statistics: the same bits but at rounding boundaries
            differ = g != w
            bias = (g.double() - w.double()).mean()
            assert differ.float().mean() <= MAX_BOUNDARY_FLIPS, \
                f"{name}: {1 - differ.float().mean():.1%} bit-identical, mean difference {bias:.2e}"
            assert ((g.float() - w.float()).abs() <= eps * torch.maximum(g.float().abs(), w.float().abs())).all(), name
