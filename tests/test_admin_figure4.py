"""Admin Figure 4 at small scale: what the measurements of benchmarks/admin/figure4.py support, as a CI test.

Measured (benchmarks/results/admin/figure4.md, 6 seeds, L = 2..32): under a small random weight perturbation
Post-LN's output change grows about linearly in L while Pre-LN's and Admin's grow like log L and stay close
to each other; after one small Adam step Post-LN's change is an order of magnitude above Pre-LN's and Admin's
at L = 16. The checks below compare L = 2 with L = 16 (3 fixed seeds, float32) with margins that the
correct omega passes and broken omegas fail: omega = 1 (plain Post-LN) and omega = ratio**2 (the running
variances summed without the square root). The broken ones are run here too, so the test shows that its
tolerances discriminate.
"""

from __future__ import annotations

import importlib.util
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


def median_change(variant: str, depth: int, kind: str, omega: str = "admin_init") -> float:
    """Median over SEEDS of figure4's output change; omega="squared": Admin's omegas squared after admin_init."""
    vals = []
    for seed in SEEDS:
        model, x, gen = figure4.build(variant, depth, seed)
        if variant == "admin" and omega != "admin_init":
            with torch.no_grad():
                for _, m in learned_scale_modules(model):
                    m.residual_scale.copy_(m.residual_scale.detach() ** 2)
        vals.append(figure4.output_change(model, x, gen, kind))
    return statistics.median(vals)


@pytest.fixture(scope="module")
def changes():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for kind in ("perturb", "adam_small"):
            for variant in ("post", "pre", "admin"):
                for depth in (SHALLOW, DEEP):
                    out[kind, variant, depth] = median_change(variant, depth, kind)
            # Admin with omega = 1 computes Post-LN exactly (tests/test_models.py checks it), on the very same
            # draws (figure4.build), so the Post-LN numbers serve as the omega = 1 control without a rerun.
            for depth in (SHALLOW, DEEP):
                out[kind, "one", depth] = out[kind, "post", depth]
            out[kind, "squared", DEEP] = median_change("admin", DEEP, kind, "squared")
            out[kind, "squared", SHALLOW] = float("nan")  # not needed: the squared omega fails at depth
        return out
    finally:
        torch.set_num_threads(threads)


def admin_like_checks(c: dict, kind: str, admin: str) -> list[str]:
    """The claims, for one Admin variant; returns the ones that fail."""
    failed = []
    deep = c[kind, admin, DEEP]
    pre, post = c[kind, "pre", DEEP], c[kind, "post", DEEP]
    if kind == "perturb":
        # O(log L) like Pre-LN, not O(L) like Post-LN: growth from L=2 to L=16 well below Post-LN's ...
        growth = deep / c[kind, admin, SHALLOW]
        post_growth = post / c[kind, "post", SHALLOW]
        if not growth < 0.6 * post_growth:
            failed.append(f"growth {growth:.2f} vs Post-LN {post_growth:.2f}")
        # ... and the deep change close to Pre-LN's.
        if not 0.6 * pre < deep < 1.6 * pre:
            failed.append(f"L={DEEP} change {deep:.3e} vs Pre-LN {pre:.3e}")
    else:
        if not deep < 0.25 * post:
            failed.append(f"L={DEEP} change {deep:.3e} vs Post-LN {post:.3e}")
        if not 0.4 * pre < deep < 2.5 * pre:
            failed.append(f"L={DEEP} change {deep:.3e} vs Pre-LN {pre:.3e}")
    return failed


@pytest.mark.parametrize("kind", ["perturb", "adam_small"])
def test_post_ln_output_change_grows_faster_than_pre_ln(changes, kind):
    post_growth = changes[kind, "post", DEEP] / changes[kind, "post", SHALLOW]
    pre_growth = changes[kind, "pre", DEEP] / changes[kind, "pre", SHALLOW]
    assert post_growth > 2.0 * pre_growth, (post_growth, pre_growth)


@pytest.mark.parametrize("kind", ["perturb", "adam_small"])
def test_admin_output_change_behaves_like_pre_ln(changes, kind):
    assert admin_like_checks(changes, kind, "admin") == []


@pytest.mark.parametrize("broken", ["one", "squared"])
def test_broken_omega_fails_the_same_checks(changes, broken):
    # Each broken init must fail at least one check of at least one kind (in practice: all of them).
    failures = admin_like_checks(changes, "perturb", broken) + admin_like_checks(changes, "adam_small", broken)
    assert failures, f"omega={broken} passed every check: the tolerances do not discriminate"
