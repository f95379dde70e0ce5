"""Admin Figure 4 at small scale: what the measurements of benchmarks/admin/figure4.py support, as a CI test.

Measured (benchmarks/results/admin/figure4.md, 6 seeds, L = 2..32): under a small random weight perturbation
Post-LN's output change grows about linearly in L while Pre-LN's and Admin's grow like log L and stay close
to each other; after one small Adam step Post-LN's change is an order of magnitude above Pre-LN's and Admin's
at L = 16. The checks below compare L = 2 with L = 16 (3 fixed seeds, float32).

The checks must discriminate, so they run on broken omegas too, each measured on its own models (finite
numbers at both depths): omega = 1 (Post-LN computed through Admin's learned-scale modules), and Admin's
omegas halved and doubled (near misses on either side: too little weight on the residual stream behaves
like Post-LN, too much freezes the branches). Admin passes every check; each broken omega fails at least
one; and every check (each bound of each window on its own) is failed by at least one broken omega, so a
check loosened until it no longer separates them fails the test.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

import pytest
import torch

from fusednorm.admin import learned_scale_modules

_SPEC = importlib.util.spec_from_file_location(
    "admin_figure4", Path(__file__).resolve().parents[1] / "benchmarks" / "admin" / "figure4.py")
figure4 = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(figure4)

SEEDS = (0, 1, 2)
SHALLOW, DEEP = 2, 16
KINDS = ("perturb", "adam_small")
# Broken omegas: how each one is made from a model that admin_init has set (None: omega = 1 everywhere).
BROKEN = {"one": None, "half": 0.5, "double": 2.0}


def median_change(variant: str, depth: int, kind: str, broken: str | None = None) -> float:
    """Median over SEEDS of figure4's output change; ``broken``: an Admin model with a broken omega."""
    vals = []
    for seed in SEEDS:
        factor = BROKEN.get(broken)
        model, x, gen = figure4.build(variant, depth, seed, omega_override=1.0 if broken == "one" else None)
        if factor is not None:
            with torch.no_grad():
                for _, m in learned_scale_modules(model):
                    m.residual_scale.mul_(factor)
        vals.append(figure4.output_change(model, x, gen, kind))
    return statistics.median(vals)


@pytest.fixture(scope="module")
def changes():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for kind in KINDS:
            for depth in (SHALLOW, DEEP):
                for variant in ("post", "pre", "admin"):
                    out[kind, variant, depth] = median_change(variant, depth, kind)
                for broken in BROKEN:
                    out[kind, broken, depth] = median_change("admin", depth, kind, broken)
        return out
    finally:
        torch.set_num_threads(threads)


def _growth(c: dict, kind: str, model: str) -> float:
    return c[kind, model, DEEP] / c[kind, model, SHALLOW]


def _value(c: dict, kind: str, quantity: str, model: str) -> float:
    return _growth(c, kind, model) if quantity == "growth" else c[kind, model, DEEP]


# The claims, one bound each: (kind, quantity, "<" or ">", factor, reference) reads "the model's quantity is
# below (above) factor times the reference's". Under a perturbation Admin's growth from L=2 to L=16 is well
# below Post-LN's (O(log L), not O(L)) and its deep change close to Pre-LN's; after one small Adam step its
# deep change is far below Post-LN's and close to Pre-LN's.
CHECKS = (
    ("perturb", "growth", "<", 0.6, "post"),
    ("perturb", "deep change", ">", 0.6, "pre"),
    ("perturb", "deep change", "<", 1.6, "pre"),
    ("adam_small", "deep change", "<", 0.25, "post"),
    ("adam_small", "deep change", ">", 0.4, "pre"),
    ("adam_small", "deep change", "<", 2.5, "pre"),
)


def _name(check: tuple) -> str:
    kind, quantity, relation, factor, reference = check
    return f"{kind}: {quantity} {relation} {factor}x {reference}"


def failed_checks(c: dict, model: str, kinds=KINDS) -> list[str]:
    """The checks that the numbers of ``model`` fail, e.g. ["perturb: growth < 0.6x post"]."""
    failed = []
    for check in CHECKS:
        kind, quantity, relation, factor, reference = check
        if kind not in kinds:
            continue
        value, bound = _value(c, kind, quantity, model), factor * _value(c, kind, quantity, reference)
        if not (value < bound if relation == "<" else value > bound):
            failed.append(f"{_name(check)} ({value:.3g} vs {bound:.3g})")
    return failed


@pytest.mark.parametrize("kind", KINDS)
def test_post_ln_output_change_grows_faster_than_pre_ln(changes, kind):
    post_growth = _growth(changes, kind, "post")
    pre_growth = _growth(changes, kind, "pre")
    assert post_growth > 2.0 * pre_growth, (post_growth, pre_growth)


@pytest.mark.parametrize("kind", KINDS)
def test_admin_output_change_behaves_like_pre_ln(changes, kind):
    assert failed_checks(changes, "admin", (kind,)) == []


@pytest.mark.parametrize("broken", BROKEN)
def test_broken_omega_fails_the_same_checks(changes, broken):
    values = {k: v for k, v in changes.items() if k[1] == broken}
    assert len(values) == 2 * len(KINDS) and all(math.isfinite(v) and v > 0 for v in values.values()), values
    assert failed_checks(changes, broken), f"omega={broken} passed every check: the tolerances do not discriminate"


def test_every_check_rejects_a_broken_omega(changes):
    """A check that no broken omega fails would pass anything: each one must reject at least one of them."""
    rejecting = {_name(check): [b for b in BROKEN if any(f.startswith(_name(check)) for f in failed_checks(changes, b))]
                 for check in CHECKS}
    assert all(rejecting.values()), rejecting
