"""README's skip-step recipe, executed as written: a NaN in one batch is caught by the monitor at the first
norm that sees it and that step's update is skipped on the device, without a host sync."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def recipe() -> str:
    """The python block of README's skip-step subsection."""
    section = README.read_text().split("### Skipping a step whose activations were not finite", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def run(code: str) -> tuple[dict, str]:
    namespace: dict = {"__name__": "readme_recipe"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)
    return namespace, out.getvalue()


def test_readme_skip_step_recipe_skips_the_poisoned_step():
    ns, printed = run(recipe())
    assert int(ns["skipped"]) == 1
    assert printed.strip() == "skipped 1 of 6 steps; step 3: first seen by 1.layers.0.attn_norm"
    params = list(ns["model"].parameters())
    assert all(torch.isfinite(p).all() for p in params)
    assert {int(ns["optimizer"].state[p]["step"]) for p in params} == {5}  # 6 steps, one skipped
    records = ns["mon"].records()
    assert [r.step for r in records if r.nonfinite_rows] == [3] * 8  # every norm of step 3, none after


def test_without_the_skip_the_nan_reaches_the_parameters():
    """The control: the same code with found_inf forced to 0 ends with NaN parameters."""
    code = recipe()
    assert "optimizer.found_inf = bad.float()" in code
    ns, _ = run(code.replace("optimizer.found_inf = bad.float()", "optimizer.found_inf = torch.zeros(())"))
    assert not all(torch.isfinite(p).all() for p in ns["model"].parameters())
