"""Build script. The optional C extension ``fusednorm._philox_cpu`` (csrc/cpu/, the CPU dropout mask; skipped
when it cannot be compiled) always; the CUDA extension ``fusednorm._C`` (csrc/) is added only when
FUSEDNORM_BUILD_CUDA=1, or (FUSEDNORM_BUILD_CUDA unset) when a CUDA build of torch and a CUDA toolkit are
found. Building it needs ``pip install --no-build-isolation`` (pip's isolated build environment has no
torch), e.g. on a CPU-only CI machine with the CUDA torch wheel and the toolkit:

    CUDA_HOME=/usr/local/cuda-13.0 FUSEDNORM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \\
        pip install --no-build-isolation -e .

Environment: FUSEDNORM_BUILD_CUDA = 1 (build, or fail saying why) | 0 (never) | unset (auto);
TORCH_CUDA_ARCH_LIST (default "8.0;9.0"); CUDA_HOME (the toolkit root, with bin/nvcc and
include/cuda_runtime.h: not the directory of an nvcc wrapper script); FUSEDNORM_PTXAS_VERBOSE=1 adds
``-Xptxas -v`` (registers/spills per kernel, see .ci/build_cuda.sh); MAX_JOBS (parallel compiles).
"""

import glob
import importlib.util
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvidia_include_dirs() -> list:
    """Headers of the pip-installed CUDA 13 libraries (nvidia/cu13/include): torch's headers include
    some (e.g. cusparse/cublas) that a minimal toolkit does not ship."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        for sub in ("cu13", "cu12"):
            path = os.path.join(base, sub, "include")
            if os.path.isdir(path):
                dirs.append(path)
    return dirs[:1]


def _why_not_buildable():
    """None if the CUDA extension can be built here, else the reason (in words)."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        return f"torch is not importable ({error}); with pip, use --no-build-isolation"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME to the toolkit root)"
    for needed in ("bin/nvcc", "include/cuda_runtime.h"):
        if not os.path.exists(os.path.join(cuda_home, needed)):
            return (f"CUDA_HOME={cuda_home} has no {needed}: point CUDA_HOME at the real toolkit root "
                    "(not the directory of an nvcc wrapper script)")
    return None


def cuda_extensions():
    """(ext_modules, cmdclass) for the CUDA backend, or ([], {}) when it is not to be built here."""
    mode = os.environ.get("FUSEDNORM_BUILD_CUDA", "auto")
    if mode == "0":
        return [], {}
    reason = _why_not_buildable()
    if reason is not None:
        if mode == "1":
            raise RuntimeError(f"FUSEDNORM_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    csrc = os.path.join(ROOT, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "*.cu")))
    sources = [os.path.relpath(path, ROOT) for path in sources]
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if os.environ.get("FUSEDNORM_PTXAS_VERBOSE", "0") == "1":
        nvcc_flags.append("-Xptxas=-v")
    extension = CUDAExtension(
        name="fusednorm._C",
        sources=sources,
        include_dirs=[csrc] + _nvidia_include_dirs(),
        extra_compile_args={"cxx": ["-O3", "-DPy_LIMITED_API=0x030A0000"], "nvcc": nvcc_flags},
        py_limited_api=True,
    )
    return [extension], {"build_ext": BuildExtension}


def cpu_extensions():
    """The dropout mask in compiled code for the CPU (csrc/cpu/philox.c: plain C, no torch headers).
    Optional: without a C compiler the build goes on, and fusednorm/dropout.py uses its torch definition
    (same bits, slower). ``-std=c11`` also keeps torch's BuildExtension (the CUDA build) from adding a C++
    standard flag to this C file."""
    from setuptools import Extension

    # -ffp-contract=off: products and sums rounded one by one, as the torch backend computes h (no fma).
    flags = ["-O3", "-std=c11", "-ffp-contract=off"]
    sources = ["csrc/cpu/philox.c", "csrc/cpu/module.c"]
    return [Extension("fusednorm._philox_cpu", sources=sources, extra_compile_args=flags,
                      define_macros=[("Py_LIMITED_API", "0x030A0000")], py_limited_api=True, optional=True)]


ext_modules, cmdclass = cuda_extensions()
ext_modules = ext_modules + cpu_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, options={"bdist_wheel": {"py_limited_api": "cp310"}})
