"""Where and with what a benchmark ran: the device (and driver), the library versions, the git commit.
Every row of a result is tagged with them (report.py writes them into every table, plot and CSV row)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

import torch

PEERS_AND_US = ("triton", "liger-kernel", "flash-attn", "apex", "fusednorm")


def git_commit() -> str:
    """HEAD of the checkout the benchmarks run from, with "+dirty" when tracked files are modified."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def versions() -> dict:
    """python, torch, CUDA and the installed version of every compared library (None: not installed)."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in PEERS_AND_US:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine(device: torch.device) -> dict:
    """The device in words ("device"), and for a GPU its driver, SM count, L2 size, memory and capability."""
    if device.type != "cuda":
        return {"device": f"cpu ({platform.processor() or platform.machine()}; {os.cpu_count()} cores)"}
    props = torch.cuda.get_device_properties(device)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = None
    return {"device": torch.cuda.get_device_name(device), "driver": driver, "sm_count": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None), "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}"}
