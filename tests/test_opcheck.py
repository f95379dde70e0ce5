"""torch.library.opcheck on the op layer: fusednorm::fwd and fusednorm::bwd, every CPU backend.

opcheck runs each op for real and checks its schema (no hidden mutation or aliasing), its fake (meta)
function against the real outputs (shapes, dtypes, strides), its autograd registration, and that
AOTAutograd can trace it with dynamic shapes. fusednorm::fwd gets inputs that require grad, so
test_autograd_registration and test_aot_dispatch_dynamic run its own autograd formula (``ops``:
register_autograd, whose backward is fusednorm::bwd) forward and backward. The arguments are the very
ones the functional layer passes (recorded from a public call's forward and backward), so what the
forward stores decides what the backward receives (``Variant.saved``).

Which variants (opcheck takes ~0.2 s a pair on torch, ~1.5 s interpreted): on torch, the variants with the
default parameters and no dropout -- every residual scale kind and layout, and every float32 residual / h
flag (with the unscaled residual or none): what the fake results' shapes and dtypes follow -- plus the
residual-free variants with dropout or without weight or bias; on interpreted triton a covering subset of
those (every flag takes each of its values). The dtypes rotate over the variants.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fusednorm
from fusednorm import case_matrix, ops
from fusednorm.testing import Case, case_variants, make_inputs, run_fused
from fusednorm.variant import ScaleKind

# The op layer and the Function path of backend "torch" (on the CPU, eager calls otherwise take
# fusednorm.cpu_path, ATen's ops: tests/test_cpu_path.py).
pytestmark = pytest.mark.usefixtures("torch_function_path")

CPU_BACKENDS = fusednorm.available_backends("cpu")
FWD = torch.ops.fusednorm.fwd.default
BWD = torch.ops.fusednorm.bwd.default
BF16, F32 = torch.bfloat16, torch.float32


# x (and parameter) dtypes rotate over the variants: the fake results follow them (float64 statistics for
# float64 x; float32 h / dresidual beside a narrower x).
DTYPES = ((BF16, F32), (torch.float32, None), (torch.float16, None), (torch.float64, None))


def _selected() -> list:
    core = [v for v in case_variants() if case_matrix.default_affine(v) and not v.has_dropout
            and (v.scale_kind == ScaleKind.NONE or not case_matrix.float32_flags(v))]
    bare = [v for v in case_variants() if not v.has_residual and not v.prenorm
            and (v.has_dropout or not case_matrix.default_affine(v))]
    return core + bare


SELECTED = list(case_matrix.cases_of(_selected(), DTYPES, (12,), ((5,),), one_dtype=True))
_COVERING = case_matrix.covering(c.variant for c in SELECTED)
CASES = [(c, b) for b in CPU_BACKENDS for c in SELECTED
         if b == "torch" or torch.cuda.is_available() or c.variant in _COVERING]


def _flat(op, variant, args, backend: str) -> tuple:
    """The op's flat arguments, in its schema's order, from a parameter object."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    values |= {"variant": variant.flags, "backend": backend}
    return tuple(values[a.name].detach() if isinstance(values[a.name], torch.Tensor) else values[a.name]
                 for a in op._schema.arguments)


def _arguments(case: Case, backend: str, monkeypatch) -> tuple[tuple, tuple]:
    """fwd's and bwd's arguments as the functional layer builds them for a forward + backward of ``case``."""
    recorded = {}

    def recording(name, real):
        def record(variant, args, backend, *impl):  # forward's impl: the plan's backend module, if any
            recorded[name] = _flat(FWD if name == "fwd" else BWD, variant, args, backend)
            return real(variant, args, backend, *impl)
        return record

    with monkeypatch.context() as patch:  # undoes these two only (not the torch_function_path fixture)
        patch.setattr(ops, "forward", recording("fwd", ops.forward))
        patch.setattr(ops, "backward", recording("bwd", ops.backward))
        run_fused(case, make_inputs(case, generator=torch.Generator().manual_seed(0)), backend)
    return recorded["fwd"], recorded["bwd"]


def _requiring_grad(args: tuple) -> tuple:
    """fwd's arguments with every floating-point tensor a leaf that requires grad (the seed stays int64)."""
    return tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _assert_all_pass(result: dict) -> None:
    failures = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not failures, failures


@pytest.mark.parametrize(("case", "backend"), CASES, ids=[f"{c.name()}-{b}" for c, b in CASES])
def test_opcheck_fwd_and_bwd(case, backend, monkeypatch):
    fwd_args, bwd_args = _arguments(case, backend, monkeypatch)
    _assert_all_pass(torch.library.opcheck(FWD, _requiring_grad(fwd_args)))
    _assert_all_pass(torch.library.opcheck(BWD, bwd_args))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_empty_batch(backend, monkeypatch):
    """M = 0: empty outputs, (N,) zero parameter gradients; the fake functions must agree."""
    case = Case("add_layer_norm[vector,prenorm]", (0, 12))
    fwd_args, bwd_args = _arguments(case, backend, monkeypatch)
    assert fwd_args[0].shape == (0, 12)
    _assert_all_pass(torch.library.opcheck(FWD, _requiring_grad(fwd_args)))
    _assert_all_pass(torch.library.opcheck(BWD, bwd_args))


def test_fake_outputs_match_real_ones_exactly(monkeypatch):
    """Beyond opcheck's own comparison: every output's shape, dtype and stride, under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for case in SELECTED:
        for op, args in zip((FWD, BWD), _arguments(case, "torch", monkeypatch), strict=True):
            real = op(*args)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
            for r, f in zip(real, fake, strict=True):
                assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), (case.name(), op)
