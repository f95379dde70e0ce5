"""Shared test set-up.

Without a GPU the Triton kernels run in the Triton interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module imports fusednorm.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _restore_global_backend():
    """Tests that call fusednorm.set_backend must not leak their choice into other tests."""
    import fusednorm

    before = fusednorm.get_backend()
    yield
    fusednorm.backends._global_backend = before


@pytest.fixture
def torch_function_path(monkeypatch):
    """Backend "torch" through its autograd Function and the custom ops, not the CPU path (fusednorm.cpu_path):
    for tests of the op layer, the Function's saved tensors and bit-exact agreement with the compiled /
    exported programs, which run the backend itself."""
    from fusednorm import _plan, cpu_path

    monkeypatch.setattr(cpu_path, "_enabled", False)
    monkeypatch.setattr(_plan, "_PLANS", {})  # plans cached with the CPU path on; restored after the test
