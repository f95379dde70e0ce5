"""The correctness method of DESIGN section 6, shared by the tests and ``python -m fusednorm.check``.

The oracle here is written from the math of DESIGN sections 1 and 2 with plain float64 torch ops
and autograd; it imports nothing from the backends (only the dropout mask's definition, which is
part of the spec). Each case is compared three ways on fresh random inputs:

    fused     : the public function on the backend under test
    reference : float64 autograd of the formulas, from the same inputs upcast
    torch_own : PyTorch's own computation in the input dtype (F.layer_norm / F.rms_norm)

and passes when  max|fused - reference| <= 2 * max|torch_own - reference| + atol  for y, h and
every gradient, and NaN/Inf appear in the fused result exactly where they appear in the reference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

import fusednorm  # the public API under test (fusednorm itself never imports this module)

from .dropout import draw_seed, dropout_keep_mask

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
RESIDUAL_KINDS = ("none", "plain", "float", "scalar", "vector")

# The "small atol" of DESIGN section 6, per dtype, relative to the reference's magnitude
# (max(1, max|ref|)): a few units of the dtype's epsilon.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of one op. ``param_dtype`` None means the parameters share x's dtype."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    param_dtype: torch.dtype | None = None
    residual_kind: str = "none"
    prenorm: bool = False
    residual_in_fp32: bool = False
    dropout_p: float = 0.0
    has_weight: bool = True
    has_bias: bool = True
    eps: float = 1e-5

    @property
    def is_rms(self) -> bool:
        return self.op.endswith("rms_norm")

    @property
    def has_residual(self) -> bool:
        return self.residual_kind != "none"

    def name(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        if self.param_dtype is not None:
            dt += "/" + str(self.param_dtype).replace("torch.", "") + " params"
        flags = [self.residual_kind if self.op.startswith("add") else "",
                 "prenorm" if self.prenorm else "", "res_fp32" if self.residual_in_fp32 else "",
                 f"p={self.dropout_p}" if self.dropout_p else "",
                 "" if self.has_weight else "no_weight", "" if self.has_bias or self.is_rms else "no_bias"]
        return f"{self.op}[{'x'.join(map(str, self.shape))} {dt} {' '.join(f for f in flags if f)}]".replace(" ]", "]")


@dataclasses.dataclass
class Comparison:
    """One compared output of one case."""

    case: Case
    output: str
    error: float
    torch_error: float
    atol: float
    nonfinite_match: bool

    @property
    def bound(self) -> float:
        return 2.0 * self.torch_error + self.atol

    @property
    def ok(self) -> bool:
        return self.nonfinite_match and self.error <= self.bound

    @property
    def ratio(self) -> float:
        return self.error / self.torch_error if self.torch_error > 0 else (0.0 if self.error == 0 else math.inf)


def make_inputs(case: Case, device="cpu", generator: torch.Generator | None = None) -> dict:
    """Fresh random inputs for ``case``: never zeros, rows offset so that their mean is not ~0."""
    *lead, n = case.shape
    pdt = case.param_dtype or case.dtype

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    def rows(dtype):
        return (rand(*case.shape) + 3.0 * rand(*lead, 1)).to(dtype)

    inputs = dict(x=rows(case.dtype))
    if case.has_residual:
        res_dtype = torch.float32 if case.residual_in_fp32 and case.dtype != torch.float64 else case.dtype
        inputs["residual"] = rows(res_dtype)
    if case.has_weight:
        inputs["weight"] = (1.0 + 0.2 * rand(n)).to(pdt)
    if case.has_bias and not case.is_rms:
        inputs["bias"] = (0.2 * rand(n)).to(pdt)
    if case.residual_kind == "float":
        inputs["residual_scale"] = 0.75
    elif case.residual_kind == "scalar":
        inputs["residual_scale"] = (1.0 + 0.3 * rand(())).abs().to(pdt)
    elif case.residual_kind == "vector":
        inputs["residual_scale"] = (1.0 + 0.3 * rand(n)).to(pdt)
    inputs["dy"] = rand(*case.shape)
    if case.prenorm:
        inputs["dh"] = rand(*case.shape)
    return inputs


def peek_dropout_mask(device, rows: int, cols: int, p: float) -> torch.Tensor:
    """The keep mask that the next fused call on ``device`` will use, without consuming the RNG."""
    device = torch.device(device)
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    seed = draw_seed(device)
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)
    return dropout_keep_mask(seed, rows, cols, p)


def _composed(case: Case, inputs: dict, mask: torch.Tensor | None, dtype: torch.dtype | None,
              magnitudes: dict | None = None):
    """Outputs and gradients by autograd of the plain formulas.

    dtype=torch.float64: the oracle, written out formula by formula.
    dtype=None: PyTorch's own computation in the input dtypes (F.layer_norm / F.rms_norm).
    """
    leaves = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and k not in ("dy", "dh"):
            t = v.detach().to(dtype if dtype is not None else v.dtype)
            if dtype is None and k in ("weight", "bias", "residual_scale"):
                t = t.to(case.dtype)  # torch's own: parameters in the input dtype
            leaves[k] = t.requires_grad_(True)
    x = leaves["x"]
    xd = x
    if mask is not None:
        xd = x * mask.view(x.shape).to(x.dtype) / (1.0 - case.dropout_p)
    h = xd
    if case.has_residual:
        s = leaves.get("residual_scale", inputs.get("residual_scale", 1.0))
        h = leaves["residual"] * s + xd
    n = case.shape[-1]
    w, b = leaves.get("weight"), leaves.get("bias")
    # eps=None: the epsilon of the dtype torch computes in (as torch.nn.RMSNorm does).
    eps = case.eps if case.eps is not None else torch.finfo(torch.promote_types(case.dtype, torch.float32)).eps
    if dtype is None:
        y = (F.rms_norm(h, (n,), w.to(h.dtype) if w is not None else None, eps) if case.is_rms
             else F.layer_norm(h, (n,), w.to(h.dtype) if w is not None else None,
                               b.to(h.dtype) if b is not None else None, eps))
        y = y.to(case.dtype)
    else:
        if case.is_rms:
            xhat = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)
        else:
            mu = h.mean(-1, keepdim=True)
            xhat = (h - mu) / torch.sqrt(((h - mu) ** 2).mean(-1, keepdim=True) + eps)
        y = xhat * w if w is not None else xhat
        y = y + b if b is not None else y
    loss = (y.double() * inputs["dy"].double()).sum()
    if case.prenorm:
        loss = loss + (h.double() * inputs["dh"].double()).sum()
    names = list(leaves)
    *grads, dh = torch.autograd.grad(loss, [leaves[k] for k in names] + [h], allow_unused=True)
    out = {"y": y.detach()}
    if case.prenorm:
        out["h"] = h.detach()
    if magnitudes is not None and dtype is not None:
        magnitudes.update(_sum_magnitudes(case, inputs, xhat.detach(), dh, leaves))
    for k, g in zip(names, grads, strict=True):
        out["d" + k] = g if g is not None else torch.zeros_like(leaves[k])
    return out


def _sum_magnitudes(case: Case, inputs: dict, xhat, dh, leaves) -> dict:
    """For the gradients that are sums over rows, the sum of the absolute values of the summed terms.

    A float32 sum of M terms is accurate relative to that magnitude, not to its (possibly cancelled)
    result: the atol of those outputs scales with it (a 0-d residual_scale's gradient sums M * N terms).
    """
    dy = inputs["dy"].double().abs().reshape(-1, case.shape[-1])
    magnitude = {"dweight": (dy * xhat.abs().reshape(dy.shape)).sum(0), "dbias": dy.sum(0)}
    if case.residual_kind in ("scalar", "vector"):
        terms = (dh.abs() * leaves["residual"].detach().abs()).reshape(dy.shape).sum(0)
        magnitude["dresidual_scale"] = terms if case.residual_kind == "vector" else terms.sum()
    return magnitude


def run_fused(case: Case, inputs: dict, backend: str | None):
    """Outputs and gradients of the public fusednorm function for ``case``."""
    import fusednorm

    leaves = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items() if k not in ("dy", "dh")}
    x, w = leaves["x"], leaves.get("weight")
    if case.op == "layer_norm":
        out = fusednorm.layer_norm(x, w, leaves.get("bias"), case.eps, backend=backend)
    elif case.op == "rms_norm":
        out = fusednorm.rms_norm(x, w, case.eps, backend=backend)
    else:
        kwargs = dict(residual_scale=leaves.get("residual_scale"), dropout_p=case.dropout_p, prenorm=case.prenorm,
                      residual_in_fp32=case.residual_in_fp32, backend=backend)
        if case.op == "add_layer_norm":
            out = fusednorm.add_layer_norm(x, leaves.get("residual"), w, leaves.get("bias"), case.eps, **kwargs)
        else:
            out = fusednorm.add_rms_norm(x, leaves.get("residual"), w, case.eps, **kwargs)
    y, h = out if case.prenorm else (out, None)
    loss = (y.double() * inputs["dy"].double()).sum()
    if h is not None:
        loss = loss + (h.double() * inputs["dh"].double()).sum()
    tensors = {k: v for k, v in leaves.items() if isinstance(v, torch.Tensor)}
    grads = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
    result = {"y": y.detach()}
    if h is not None:
        result["h"] = h.detach()
    for k, g in zip(tensors, grads, strict=True):
        result["d" + k] = g
    return result


def compare(case: Case, output: str, fused: torch.Tensor | None, reference: torch.Tensor,
            torch_own: torch.Tensor, extra_atol: float = 0.0, magnitude: torch.Tensor | None = None) -> Comparison:
    """The section-6 comparison of one output; a missing fused gradient fails.

    The atol is relative to max(1, max|reference|), or for sums over rows to the sum of the absolute
    values of their terms (``magnitude``), whichever is larger.
    """
    ref = reference.double()
    finite_ref = ref[torch.isfinite(ref)]
    scale = max(1.0, float(finite_ref.abs().max()) if finite_ref.numel() else 1.0)
    if magnitude is not None and magnitude.numel() and torch.isfinite(magnitude).any():
        scale = max(scale, float(magnitude[torch.isfinite(magnitude)].max()))
    atol = ATOL[case.dtype] * scale + extra_atol * scale
    if fused is None or fused.shape != reference.shape:
        return Comparison(case, output, math.inf, 0.0, atol, False)
    f = fused.detach().double()
    own = torch_own.detach().double()
    # NaN and +-Inf must sit exactly where the reference has them; elsewhere measure the error.
    finite = torch.isfinite(ref)
    nonfinite_match = bool(torch.equal(torch.isnan(f), torch.isnan(ref))
                           and torch.equal(f[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)])
                           and torch.isfinite(f[finite]).all())

    def maxerr(a):
        d = (a[finite] - ref[finite]).abs()
        d = torch.nan_to_num(d, nan=math.inf)
        return float(d.max()) if d.numel() else 0.0

    return Comparison(case, output, maxerr(f), maxerr(own), atol, nonfinite_match)


def check_case(case: Case, backend: str | None, device="cpu", seed: int = 0,
               extra_atol: float = 0.0) -> list[Comparison]:
    """Run ``case`` on ``backend`` with fresh inputs; one Comparison per output and gradient."""
    gen = torch.Generator().manual_seed(seed)
    inputs = make_inputs(case, device, gen)
    rows = math.prod(case.shape[:-1])
    mask = None
    torch.manual_seed(seed)
    if case.dropout_p > 0:
        mask = peek_dropout_mask(device, rows, case.shape[-1], case.dropout_p)
    fused = run_fused(case, inputs, backend)
    magnitude: dict = {}
    reference = _composed(case, inputs, mask, torch.float64, magnitude)
    own = _composed(case, inputs, mask, None)
    return [compare(case, k, fused.get(k), reference[k], own[k], extra_atol, magnitude.get(k)) for k in reference]


def standard_cases(dtypes=(torch.float32, torch.float16, torch.bfloat16), widths=(1, 7, 256, 1000),
                   lead=((4,),)) -> Iterator[Case]:
    """The matrix that ``python -m fusednorm.check`` runs: every op and variant, per dtype and width."""
    for dtype in dtypes:
        param_dtypes = (None,) if dtype == torch.float32 else (None, torch.float32)
        for n in widths:
            for lead_shape in lead:
                shape = (*lead_shape, n)
                for pdt in param_dtypes:
                    yield Case("layer_norm", shape, dtype, pdt)
                    yield Case("rms_norm", shape, dtype, pdt, eps=1e-6)
                    for op in ("add_layer_norm", "add_rms_norm"):
                        for kind in RESIDUAL_KINDS[1:]:
                            for prenorm, res32 in ((False, False), (True, False), (True, True)):
                                yield Case(op, shape, dtype, pdt, kind, prenorm, res32)
                        yield Case(op, shape, dtype, pdt, "vector", False, False, dropout_p=0.25)
                        yield Case(op, shape, dtype, pdt, "plain", True, False, dropout_p=0.25)


# float64 gradcheck cases shared by every backend's tests: each residual-scale kind, prenorm (so a
# gradient flows into h too) and dropout (the seed is re-drawn identically at every evaluation).
GRADCHECK_CASES = (
    ("layer_norm", {}),
    ("rms_norm", {}),
    ("add_layer_norm", {"residual_scale": None}),
    ("add_layer_norm", {"residual_scale": "vector", "prenorm": True, "dropout_p": 0.25}),
    ("add_layer_norm", {"residual_scale": "scalar"}),
    ("add_layer_norm", {"residual_scale": 0.6, "dropout_p": 0.25}),
    ("add_rms_norm", {"residual_scale": "vector"}),
    ("add_rms_norm", {"residual_scale": "scalar", "prenorm": True, "dropout_p": 0.25}),
    ("add_rms_norm", {"residual_scale": None, "prenorm": True, "residual_in_fp32": True}),
)


def gradcheck_op(op: str, options: dict, backend: str, shape: tuple[int, ...] = (3, 6), device="cpu",
                 fast_mode: bool = False) -> bool:
    """torch.autograd.gradcheck of a public function in float64, every tensor argument a leaf.

    options: the keyword options of the add_* functions, with residual_scale = None | float |
    "scalar" (a learned 0-d tensor) | "vector" (a learned (N,) tensor). fast_mode=True checks random
    projections instead of one finite difference per element (for slow backends: the interpreter).
    Inputs get a +1 offset so that the row mean is not ~0.
    """
    gen = torch.Generator().manual_seed(1)
    n = shape[-1]

    def leaf(*s):
        return (torch.randn(s, generator=gen, dtype=torch.float64) + 1.0).to(device).requires_grad_(True)

    x, residual, weight, bias = leaf(*shape), leaf(*shape), leaf(n), leaf(n)
    kind = options.get("residual_scale")
    scale = leaf(n) if kind == "vector" else leaf() if kind == "scalar" else None
    opts = {k: v for k, v in options.items() if k != "residual_scale"}

    def fn(x, residual, weight, bias, scale):
        torch.manual_seed(0)  # the same dropout mask at every evaluation
        if op == "layer_norm":
            return fusednorm.layer_norm(x, weight, bias, backend=backend)
        if op == "rms_norm":
            return fusednorm.rms_norm(x, weight, backend=backend)
        s = scale if scale is not None else kind
        if op == "add_layer_norm":
            return fusednorm.add_layer_norm(x, residual, weight, bias, residual_scale=s, backend=backend, **opts)
        return fusednorm.add_rms_norm(x, residual, weight, residual_scale=s, backend=backend, **opts)

    return torch.autograd.gradcheck(fn, (x, residual, weight, bias, scale), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    nondet_tol=0.0, fast_mode=fast_mode)
