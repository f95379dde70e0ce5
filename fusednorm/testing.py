"""The correctness method of DESIGN section 6, shared by the tests and ``python -m fusednorm.check``.

A ``Case`` is one ``fusednorm.variant.Variant`` applied to inputs of one shape and dtype. The oracle
here is written from the math of DESIGN sections 1 and 2 with plain float64 torch ops and autograd; it
imports nothing from the backends (only the dropout mask's definition, which is part of the spec). Each
case is compared three ways on fresh random inputs:

    fused     : the public function on the backend under test
    reference : float64 autograd of the formulas, from the same inputs upcast
    torch_own : PyTorch's own computation in the input dtype (F.layer_norm / F.rms_norm)

and passes when  max|fused - reference| <= 2 * max|torch_own - reference| + atol  for y, h and
every gradient, and NaN/Inf appear in the fused result exactly where they appear in the reference
(``assert_section6``). Which cases each backend runs: ``fusednorm.case_matrix``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from functools import cache, lru_cache

import torch
import torch.nn.functional as F

import fusednorm  # the public API under test (fusednorm itself never imports this module)

from .dropout import draw_seed, dropout_keep_mask
from .variant import ScaleKind, Variant, all_variants

# The "small atol" of DESIGN section 6, per dtype, relative to the reference's magnitude
# (max(1, max|ref|)): a few units of the dtype's epsilon.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DROPOUT_P = 0.25  # the dropout probability of a case whose variant has dropout
CONSTANT_SCALE = 0.75  # the residual scale of a ScaleKind.CONSTANT case (DeepNorm's alpha)
_SHORT = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@lru_cache(maxsize=1)
def case_variants() -> tuple[Variant, ...]:
    """Every variant a public call can produce: ``all_variants()`` plus the Pre-LN calls without a residual
    (``add_*_norm(x, None, ..., prenorm=True[, residual_in_fp32=True])``), which it does not list."""
    extra = []
    for v in all_variants():
        if not v.has_residual:
            extra += [dataclasses.replace(v, prenorm=True), dataclasses.replace(v, prenorm=True, h_f32=True)]
    return tuple(all_variants()) + tuple(extra)


@cache
def variant(name: str) -> Variant:
    """The variant called ``name`` (``Variant.name``, e.g. "add_layer_norm[vector,prenorm]"; the defaults
    are those of a public call with its affine parameters: weight, and bias for LayerNorm)."""
    for v in case_variants():
        if v.name == name:
            return v
    raise ValueError(f"no variant is named {name!r}; e.g. {case_variants()[-1].name!r}")


@dataclasses.dataclass(frozen=True)
class Case:
    """One variant on inputs of one shape and dtype. ``variant``: a Variant or its name. ``param_dtype`` None
    means the parameters share x's dtype; ``dropout_p`` None means ``DROPOUT_P`` when the variant has
    dropout; ``weight_offset``: the affine weight is weight + weight_offset (keyword of every function)."""

    variant: Variant
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    param_dtype: torch.dtype | None = None
    eps: float | None = 1e-5
    dropout_p: float | None = None
    weight_offset: float = 0.0

    def __post_init__(self):
        if isinstance(self.variant, str):
            object.__setattr__(self, "variant", variant(self.variant))
        v = self.variant
        if self.dropout_p is None:
            object.__setattr__(self, "dropout_p", DROPOUT_P if v.has_dropout else 0.0)
        if (self.dropout_p > 0) != v.has_dropout:
            raise ValueError(f"dropout_p={self.dropout_p} does not fit {v.name}")
        if self.weight_offset and not v.has_weight:
            raise ValueError(f"weight_offset needs a weight: {v.name}")
        called = Variant.from_call(
            is_rms=v.is_rms, x_dtype=self.dtype, residual_dtype=v.residual_dtype(self.dtype), scale_kind=v.scale_kind,
            dropout_p=self.dropout_p, prenorm=v.prenorm, residual_in_fp32=self.residual_in_fp32,
            has_weight=v.has_weight, has_bias=v.has_bias)
        if called != v:
            raise ValueError(f"no call with {self.dtype} x is the variant {v.name} (it would be {called.name})")

    @property
    def function(self) -> str:
        """The public function the case calls: add_* whenever an option only add_* takes is set."""
        v = self.variant
        add = v.has_residual or v.prenorm or v.has_dropout or v.h_f32
        return ("add_" if add else "") + ("rms_norm" if v.is_rms else "layer_norm")

    @property
    def residual_in_fp32(self) -> bool:
        """The call's flag: asked for when h is float32 although the residual is not (a float32 residual
        gives a float32 h by itself)."""
        return self.variant.h_f32 and not self.variant.residual_f32

    @property
    def outputs(self) -> frozenset[str]:
        """Every output and gradient that the comparison must check."""
        v = self.variant
        present = {"y": True, "dx": True, "h": v.prenorm, "dresidual": v.has_residual, "dweight": v.has_weight,
                   "dbias": v.has_bias, "dresidual_scale": v.learned_scale}
        return frozenset(name for name, there in present.items() if there)

    def name(self) -> str:
        dt = _SHORT[self.dtype] + (f"/{_SHORT[self.param_dtype]}" if self.param_dtype else "")
        extra = f"-w{self.weight_offset:+g}" if self.weight_offset else ""
        return f"{self.variant.name}-{'x'.join(map(str, self.shape))}-{dt}{extra}"

    def call(self, tensors: dict, backend: str | None):
        """The public function of this case on ``tensors`` (x, residual, weight, bias, residual_scale;
        missing ones are None; a constant scale is ``CONSTANT_SCALE``). Returns y, or (y, h)."""
        t = tensors.get
        common = dict(weight_offset=self.weight_offset, backend=backend)
        if not self.function.startswith("add_"):
            if self.variant.is_rms:
                return fusednorm.rms_norm(t("x"), t("weight"), self.eps, **common)
            return fusednorm.layer_norm(t("x"), t("weight"), t("bias"), self.eps, **common)
        scale = CONSTANT_SCALE if self.variant.scale_kind == ScaleKind.CONSTANT else t("residual_scale")
        common.update(residual_scale=scale, dropout_p=self.dropout_p, prenorm=self.variant.prenorm,
                      residual_in_fp32=self.residual_in_fp32)
        if self.variant.is_rms:
            return fusednorm.add_rms_norm(t("x"), t("residual"), t("weight"), self.eps, **common)
        return fusednorm.add_layer_norm(t("x"), t("residual"), t("weight"), t("bias"), self.eps, **common)


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

    def describe(self) -> str:
        return (f"{self.case.name()} {self.output}: err {self.error:.3g} > bound {self.bound:.3g} "
                f"(torch {self.torch_error:.3g}){'' if self.nonfinite_match else ' NaN/Inf mismatch'}")


def assert_section6(results: Iterable[Comparison], complete: bool = True) -> None:
    """The one assertion of every correctness test: each comparison passes (NaN never does), and with
    ``complete`` the results cover exactly every output and gradient of their case."""
    results = list(results)
    failures = [r.describe() for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    assert results, "nothing was compared"
    if complete:
        case = results[0].case
        assert {r.output for r in results} == case.outputs, (case.name(), sorted(r.output for r in results))


def make_inputs(case: Case, device="cpu", generator: torch.Generator | None = None) -> dict:
    """Fresh random inputs for ``case``: never zeros, rows offset so that their mean is not ~0; the affine
    weight (weight + weight_offset) is ~1 + 0.2 * N(0, 1) whatever the offset (Gemma stores w ~ 0, offset 1)."""
    *lead, n = case.shape
    v = case.variant
    pdt = case.param_dtype or case.dtype

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    def rows(dtype):
        return (rand(*case.shape) + 3.0 * rand(*lead, 1)).to(dtype)

    inputs = dict(x=rows(case.dtype))
    if v.has_residual:
        inputs["residual"] = rows(v.residual_dtype(case.dtype))
    if v.has_weight:
        inputs["weight"] = (1.0 - case.weight_offset + 0.2 * rand(n)).to(pdt)
    if v.has_bias:
        inputs["bias"] = (0.2 * rand(n)).to(pdt)
    if v.scale_kind == ScaleKind.CONSTANT:
        inputs["residual_scale"] = CONSTANT_SCALE
    elif v.scale_kind == ScaleKind.SCALAR:
        inputs["residual_scale"] = (1.0 + 0.3 * rand(())).abs().to(pdt)
    elif v.scale_kind == ScaleKind.VECTOR:
        inputs["residual_scale"] = (1.0 + 0.3 * rand(n)).to(pdt)
    inputs["dy"] = rand(*case.shape)
    if v.prenorm:
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


def reference_outputs(case: Case, inputs: dict, mask: torch.Tensor | None, magnitudes: dict | None = None) -> dict:
    """The oracle: outputs and gradients by float64 autograd of the formulas, written out one by one.
    ``magnitudes``, when given, receives the sum magnitudes of the row-summed gradients."""
    return _composed(case, inputs, mask, torch.float64, magnitudes)


def torch_outputs(case: Case, inputs: dict, mask: torch.Tensor | None) -> dict:
    """PyTorch's own computation in the input dtypes (F.layer_norm / F.rms_norm, parameters in x's dtype)."""
    return _composed(case, inputs, mask, None)


def _composed(case: Case, inputs: dict, mask: torch.Tensor | None, dtype: torch.dtype | None,
              magnitudes: dict | None = None) -> dict:
    v = case.variant
    leaves = {}
    for k, value in inputs.items():
        if isinstance(value, torch.Tensor) and k not in ("dy", "dh"):
            t = value.detach().to(dtype if dtype is not None else value.dtype)
            if dtype is None and k in ("weight", "bias", "residual_scale"):
                t = t.to(case.dtype)  # torch's own: parameters in the input dtype
            leaves[k] = t.requires_grad_(True)
    x = leaves["x"]
    h = x if mask is None else x * mask.view(x.shape).to(x.dtype) / (1.0 - case.dropout_p)
    if v.has_residual:
        s = leaves.get("residual_scale", inputs.get("residual_scale", 1.0))
        h = leaves["residual"] * s + h
    n = case.shape[-1]
    w, b = leaves.get("weight"), leaves.get("bias")
    # eps=None: the epsilon of the dtype torch computes in (as torch.nn.RMSNorm does).
    eps = case.eps if case.eps is not None else torch.finfo(torch.promote_types(case.dtype, torch.float32)).eps
    if dtype is None:
        w = w.to(h.dtype) + case.weight_offset if w is not None else None
        b = b.to(h.dtype) if b is not None else None
        y = F.rms_norm(h, (n,), w, eps) if v.is_rms else F.layer_norm(h, (n,), w, b, eps)
        y = y.to(case.dtype)
    else:
        if v.is_rms:
            xhat = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)
        else:
            mu = h.mean(-1, keepdim=True)
            xhat = (h - mu) / torch.sqrt(((h - mu) ** 2).mean(-1, keepdim=True) + eps)
        y = xhat * (w + case.weight_offset) if w is not None else xhat
        y = y + b if b is not None else y
    loss = (y.double() * inputs["dy"].double()).sum()
    if v.prenorm:
        loss = loss + (h.double() * inputs["dh"].double()).sum()
    names = list(leaves)
    *grads, dh = torch.autograd.grad(loss, [leaves[k] for k in names] + [h], allow_unused=True)
    out = {"y": y.detach()}
    if v.prenorm:
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
    if case.variant.learned_scale:
        terms = (dh.abs() * leaves["residual"].detach().abs()).reshape(dy.shape).sum(0)
        magnitude["dresidual_scale"] = terms if case.variant.scale_kind == ScaleKind.VECTOR else terms.sum()
    return magnitude


def run_fused(case: Case, inputs: dict, backend: str | None) -> dict:
    """Outputs and gradients of the public fusednorm function for ``case``."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items() if k not in ("dy", "dh")}
    out = case.call(leaves, backend)
    y, h = out if case.variant.prenorm else (out, None)
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


def check_case(case: Case, backend: str | None, device="cpu", seed: int = 0, extra_atol: float = 0.0,
               row_sums: str = "terms") -> list[Comparison]:
    """Run ``case`` on ``backend`` with fresh inputs; one Comparison per output and gradient.

    row_sums: the atol of the gradients summed over rows (dweight, dbias, dresidual_scale). "terms": relative
    to the sum of |terms| (``compare``), and at N <= 3 8 ATOL more for ds: a row whose h nearly cancels has
    dh = rstd * g * (1 - xhat^2) ~ noise (N = 1), summed by ds, ours and torch's alike. "dot_product" (the
    random shapes and seeds of tests/test_reliability.py): relative to max(1, |ref|), and a 0-d scale's ds,
    which cancels (|ds| ~1e-3 of sum |dh * residual|: the 2x ratio of two random walks fails 3-13 % of
    float32 seeds), gets 4 u sum |dh * residual| (u: the compute dtype's unit roundoff).
    """
    inputs = make_inputs(case, device, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    mask = None
    if case.dropout_p > 0:
        mask = peek_dropout_mask(device, math.prod(case.shape[:-1]), case.shape[-1], case.dropout_p)
    fused = run_fused(case, inputs, backend)
    magnitude: dict = {}
    reference = reference_outputs(case, inputs, mask, magnitude)
    own = torch_outputs(case, inputs, mask)
    results = []
    for k in reference:
        extra = extra_atol
        if k == "dresidual_scale" and row_sums == "terms" and case.shape[-1] <= 3:
            extra += 8 * ATOL[case.dtype]
        if k == "dresidual_scale" and row_sums == "dot_product" and case.variant.scale_kind == ScaleKind.SCALAR:
            u = torch.finfo(torch.float64 if case.dtype == torch.float64 else torch.float32).eps / 2
            terms = (reference["dresidual"].double() * inputs["residual"].double()).abs().sum()
            terms /= abs(float(inputs["residual_scale"]))
            extra += 4 * u * float(terms) / max(1.0, float(reference[k].abs()))  # compare() scales atol by that
        sums = magnitude.get(k) if row_sums == "terms" else None
        results.append(compare(case, k, fused.get(k), reference[k], own[k], extra, sums))
    return results


def interpreter_allowance(backend: str, case: Case, device) -> float:
    """The extra atol (relative, like ATOL) of interpreted Triton: the interpreter truncates float32 ->
    bfloat16 instead of rounding, one more bf16 ulp. Nothing else is loosened."""
    if backend == "triton" and torch.device(device).type == "cpu" and case.dtype == torch.bfloat16:
        return 2.0**-7
    return 0.0


def gradcheck_case(case: Case, backend: str, device="cpu", fast_mode: bool = False) -> bool:
    """torch.autograd.gradcheck of the case's public function in float64 (``case.dtype`` must be float64),
    every tensor argument a leaf. fast_mode=True checks random projections instead of one finite difference
    per element (for slow backends: the interpreter). The dropout mask is the same at every evaluation."""
    assert case.dtype == torch.float64, case.name()
    inputs = make_inputs(case, device, torch.Generator().manual_seed(1))
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and k not in ("dy", "dh")]
    constants = {k: v for k, v in inputs.items() if k not in names}

    def fn(*tensors):
        torch.manual_seed(0)
        return case.call(dict(zip(names, tensors, strict=True)) | constants, backend)

    leaves = tuple(inputs[k].detach().requires_grad_(True) for k in names)
    return torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=0.0, fast_mode=fast_mode)
