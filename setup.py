"""Build script. Pure Python by default; the CUDA extension (csrc/) is added by a later issue via
torch.utils.cpp_extension, only when FUSEDNORM_BUILD_CUDA=1 or when a CUDA torch and nvcc are present
(which needs `pip install --no-build-isolation`, so that setup.py can import the installed torch)."""

import os

from setuptools import setup


def cuda_extensions():
    """(ext_modules, cmdclass) for the CUDA backend, or ([], {}) on a machine that cannot build it."""
    if os.environ.get("FUSEDNORM_BUILD_CUDA", "auto") == "0":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension  # noqa: F401
    except ImportError:
        return [], {}
    # csrc/ gains its sources in the CUDA backend issue; until then there is nothing to build.
    return [], {}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
