"""Run a function on two (or more) CPU processes joined by a gloo process group, robustly.

torch's gloo teardown can abort a process ("terminate called without an active exception", SIGABRT)
after all its work is done: seen in CI about once in 30 runs, in both tests that use gloo, never locally.
That is torch's, not a wrong result, and must not be read as one; a real failure must still fail. So each
worker writes its verdict (its function's JSON result, or the traceback) to a file before teardown,
meets the other ranks at a barrier, destroys the group and leaves with os._exit (no interpreter
finalization, where gloo's threads abort). The parent judges the verdicts; a worker that died without
one (a signal from gloo itself), or a group that did not form, gets one retry on a fresh port; a second
such failure fails the test.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp


def _entry(rank: int, world: int, port: int, target: Callable[..., Any], args: tuple, verdict_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    verdict: dict[str, Any] = {"ok": False, "setup": True}
    try:
        # A short collective timeout: a rank whose partner failed must not wait gloo's default 30 min.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        verdict["setup"] = False
        verdict = {"ok": True, "result": target(rank, *args)}
    except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test with it)
        verdict["error"] = traceback.format_exc()
    Path(verdict_dir, f"rank{rank}.json").write_text(json.dumps(verdict))
    try:
        if verdict["ok"]:
            dist.barrier()  # no rank tears down the store while another still needs it
        dist.destroy_process_group()
    finally:
        os._exit(0)  # skip interpreter finalization, where gloo's threads can still abort the process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, target, args: tuple, verdict_dir: Path, timeout_s: float) -> list[int | None]:
    """Starts the workers and waits for them; returns their exit codes (None: still running at the deadline)."""
    ctx = mp.get_context("spawn")  # the workers inherit os.environ, hence TRITON_INTERPRET (conftest.py)
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(rank, world, port, target, args, str(verdict_dir)))
             for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def run_on_ranks(target: Callable[..., Any], args: tuple, tmp_path: Path, world: int = 2,
                 timeout_s: float = 240) -> list[Any]:
    """Calls target(rank, *args) on `world` gloo ranks; returns each rank's (JSON-serializable) result.

    target must be a module-level function (the workers are spawned). A rank's exception fails the
    calling test with that rank's traceback; a hang fails it after timeout_s instead of hanging CI.
    """
    codes: list[int | None] = []
    for attempt in range(2):
        verdict_dir = tmp_path / f"gloo_attempt{attempt}"
        verdict_dir.mkdir()
        codes = _launch(world, target, args, verdict_dir, timeout_s)
        files = [verdict_dir / f"rank{rank}.json" for rank in range(world)]
        verdicts = [json.loads(f.read_text()) if f.exists() else None for f in files]
        failed = {rank: v for rank, v in enumerate(verdicts) if v is not None and not v["ok"]}
        if failed and attempt == 0 and all(v["setup"] for v in failed.values()):
            continue  # the group did not form (say, another process took the port first): try a fresh one
        failed = {rank: v["error"] for rank, v in failed.items()}
        if failed:
            pytest.fail("\n".join(f"rank {rank} failed:\n{err}" for rank, err in failed.items()))
        if all(v is not None for v in verdicts):
            return [v["result"] for v in verdicts]  # every rank finished its work (a later abort is torch's)
        if any(code is None for code in codes):
            break  # hung: retrying would only hang again
    pytest.fail(f"gloo workers gave no verdict (exit codes {codes}: None = hung past {timeout_s:.0f} s)")
