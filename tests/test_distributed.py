"""Distributed training and activation checkpointing with fusednorm modules, on every available backend.

- DDP and FSDP2 (torch.distributed.fsdp.fully_shard): two CPU processes (gloo) train a tiny model whose
  residual block is an AddLayerNorm with a learned (N,) residual scale, then an RMSNorm; at every step
  the gradients (gathered from the shards under FSDP2) must equal those of one process training on the
  same global batch, to float32 reduction-order tolerance.
- torch.utils.checkpoint (use_reentrant=False) around a fused layer with dropout: the recomputed forward
  must regenerate the very same dropout mask (checkpoint replays torch's RNG state, and the fused op
  draws its seed from torch's generator), so the gradients equal those without checkpointing, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from _gloo import run_on_ranks
from torch import nn

import fusednorm

BACKENDS = fusednorm.available_backends("cpu")
WORLD = 2
N = 16
STEPS = 3
# float32 gradients summed in another order (per-rank halves, then all-reduce): a few ulp apart.
RTOL, ATOL = 1e-5, 1e-6


class TinyModel(nn.Module):
    """Linear -> Post-LN residual block (AddLayerNorm, learned vector scale) -> RMSNorm -> Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, N)
        self.branch = nn.Sequential(nn.Linear(N, N), nn.GELU())
        self.add_norm = fusednorm.AddLayerNorm(N, residual_scale="vector")
        self.final_norm = fusednorm.RMSNorm(N)
        self.head = nn.Linear(N, 1)
        with torch.no_grad():  # away from the identity init, so every gradient is exercised
            self.add_norm.residual_scale.uniform_(0.5, 1.5)
            self.add_norm.weight.uniform_(0.5, 1.5)
            self.final_norm.weight.uniform_(0.5, 1.5)

    def forward(self, x, eager: bool = False):
        h = self.embed(x)
        if eager:  # the same math in plain torch, with the same parameters
            h = nn.functional.layer_norm(h * self.add_norm.residual_scale + self.branch(h), (N,), self.add_norm.weight,
                                         self.add_norm.bias, self.add_norm.eps)
            return self.head(nn.functional.rms_norm(h, (N,), self.final_norm.weight, self.final_norm.eps))
        h = self.add_norm(self.branch(h), h)
        return self.head(self.final_norm(h))


def _data(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 8, generator=gen) * 2 + 1, torch.randn(8, 1, generator=gen)


def _loss(model, x, y, eager=False):
    return nn.functional.mse_loss(model(x, eager) if eager else model(x), y)


def _reference_grads(eager: bool = False) -> list[dict[str, torch.Tensor]]:
    """One process, the whole global batch: the gradients of every step of SGD training."""
    torch.manual_seed(0)
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for step in range(STEPS):
        opt.zero_grad()
        _loss(model, *_data(step), eager=eager).backward()
        out.append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
    return out


def _check(step, grads, reference, label):
    assert grads.keys() == reference.keys(), label
    for k, g in grads.items():
        torch.testing.assert_close(g, reference[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{label} step {step} "
                                   f"{k}: {m}")


def _train_and_check(rank: int, backend: str) -> None:
    import torch.distributed as dist  # noqa: F401  (initialised by the caller)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    fusednorm.set_backend(backend)
    reference = _reference_grads()
    # The single-process reference is itself right: plain torch eager gives the same gradients.
    for step, eager in enumerate(_reference_grads(eager=True)):
        for k, g in eager.items():
            torch.testing.assert_close(reference[step][k], g, rtol=2e-5, atol=2e-6)
    half = slice(rank * 4, rank * 4 + 4)  # this rank's half of the global batch of 8

    torch.manual_seed(0)
    ddp = DistributedDataParallel(TinyModel())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        _loss(ddp, x[half], y[half]).backward()  # DDP averages the ranks' gradients
        _check(step, {k.removeprefix("module."): p.grad for k, p in ddp.named_parameters()}, reference[step],
               f"[{backend}] DDP rank {rank}")
        opt.step()

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = TinyModel()
    for module in (model.embed, model.branch, model.add_norm, model.final_norm, model.head):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        _loss(model, x[half], y[half]).backward()  # FSDP2 reduce-scatters the averaged gradients
        _check(step, {k: p.grad.full_tensor() for k, p in model.named_parameters()}, reference[step],
               f"[{backend}] FSDP2 rank {rank}")
        opt.step()


def _train_and_check_all(rank: int, backends: list[str]) -> None:
    """One start of the processes for all backends: starting them is the slow part."""
    for backend in backends:
        _train_and_check(rank, backend)


def test_ddp_and_fsdp2_gradients_equal_single_process(tmp_path):
    """Two gloo processes, DDP then FSDP2, three SGD steps each, on every available backend in turn (the
    failure message names it); a worker's failed assertion fails the test with its traceback (see _gloo.py
    for how gloo's own teardown aborts are told apart from failures)."""
    run_on_ranks(_train_and_check_all, (BACKENDS,), tmp_path, world=WORLD)


# ---- activation checkpointing -------------------------------------------------------------------------

def _block_grads(backend: str, checkpoint: bool, preserve_rng_state: bool = True):
    from torch.utils.checkpoint import checkpoint as ckpt

    fusednorm.set_backend(backend)
    torch.manual_seed(0)
    lin = nn.Linear(N, N)
    norm = fusednorm.AddLayerNorm(N, residual_scale="vector", dropout_p=0.5, prenorm=True)
    x = torch.randn(6, N, requires_grad=True)
    r = torch.randn(6, N, requires_grad=True)

    def block(x, r):
        y, h = norm(lin(x), r)
        return y * 2.0 + h

    torch.manual_seed(1)
    out = ckpt(block, x, r, use_reentrant=False, preserve_rng_state=preserve_rng_state) if checkpoint else block(x, r)
    torch.manual_seed(2)  # the RNG moves on before the backward, as it does in training
    torch.rand(100)
    out.square().sum().backward()
    return [out.detach(), x.grad, r.grad, lin.weight.grad, norm.weight.grad, norm.residual_scale.grad]


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_recomputes_the_same_dropout_mask(backend):
    plain = _block_grads(backend, checkpoint=False)
    checkpointed = _block_grads(backend, checkpoint=True)
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.equal(a, b)
    # The test can fail: without RNG replay the recompute draws another seed, hence another mask, and
    # the gradients silently differ (same shapes, so checkpoint's own metadata check does not notice).
    unreplayed = _block_grads(backend, checkpoint=True, preserve_rng_state=False)
    assert torch.equal(plain[0], unreplayed[0]) and not torch.equal(plain[1], unreplayed[1])
