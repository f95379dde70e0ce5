"""Tensor and sequence parallelism: fusednorm's custom ops on DTensors, and a SequenceParallel style.

Importing this module imports torch.distributed.tensor (about 2 s), so ``import fusednorm`` never
does: the functional layer calls ``register_sharding_rules`` the first time a DTensor reaches it.

Sharding rules (DTensor's op-strategy mechanism; ``register_sharding_rules``). The ops see (M, N)
rows: the functional layer flattens a (B, T, N) activation, and DTensor maps Shard(1) (the sequence
dimension) through that flatten to ``_StridedShard(0, split_factor=B)`` without communication (each
rank keeps its own rows); Shard(0) (the batch) stays Shard(0). Every row is normalized on its own,
so any placement of the rows works locally. Per mesh dimension:

- fusednorm::fwd: y, h, mean, rstd and the telemetry's row statistics take x's placement (Replicate, or
  a sharding of the rows); the residual must have x's placement, or be Replicate (then each rank takes
  its own rows: no communication); weight, bias and residual_scale are Replicate. An empty result (h
  that is not stored, mean of RMSNorm, stats when not asked for) is Replicate.
- fusednorm::bwd: dy, dh_in and the saved rows follow the forward's placement (read from rstd); dx
  and dresidual get it too; dweight, dbias and dscale are ``Partial("sum")`` on every mesh dimension
  where the rows are sharded (each rank summed its own rows), Replicate elsewhere.

The rules are one exact strategy per call, registered with DTensor's op-strategy mechanism (what
torch registers its own ops with). The experimental ``register_sharding`` expands one candidate list
over every mesh dimension and picks the cheapest: slicing a Replicate input is free, so it could shard
an output that x left replicated; one exact strategy keeps x's placement.

Rejected with a ValueError, rather than gathered behind the user's back: x sharded along the normalized
(last) dimension, a Partial x or residual (reduce it first, e.g. RowwiseParallel(output_layouts=
Shard(1))), a residual sharded unlike x, and dropout (each rank would draw the same mask for its own
rows). Parameters that are not Replicate are made Replicate by DTensor (an all-gather of N values).

Parameter gradients: DTensor leaves them Partial, as it does for torch.nn.LayerNorm. ``SequenceParallel``
below reduces them when they are accumulated, so that every rank holds the full-batch gradient. (FSDP2
redistributes a DTensor gradient to its parameter's placement itself; FSDP2 + TP is not tested here.)
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor._op_schema import OpSchema, OpSpec, OpStrategy, RuntimeSchemaInfo
from torch.distributed.tensor._ops.utils import generate_redistribute_costs
from torch.distributed.tensor.parallel import SequenceParallel as _TorchSequenceParallel
from torch.distributed.tensor.placement_types import _StridedShard

from .variant import Variant

# Argument positions in the op schemas (fusednorm/ops.py); the variant word and the scalars after it
# change the rule, so they are part of DTensor's sharding cache key (RuntimeSchemaInfo.static_argnum).
_FWD_VARIANT = 6
_BWD_VARIANT = 10


def _spec(arg) -> DTensorSpec | None:
    """The current spec of a DTensor argument (None for an absent optional tensor)."""
    return arg.strategies[0].output_spec if isinstance(arg, OpStrategy) else None


def _like(spec: DTensorSpec, tensor_meta=None) -> DTensorSpec:
    """A spec with ``spec``'s mesh and placements (and shard order): the row placement, for another
    tensor of rows ((M, N) or (M,): the placements only ever shard dimension 0)."""
    strided = spec.use_strided_shard_as_shard_order
    return DTensorSpec(spec.mesh, spec.placements, tensor_meta=tensor_meta,
                       shard_order=None if strided else spec.shard_order,
                       use_strided_shard_as_shard_order=strided)


def _replicate(mesh, tensor_meta=None) -> DTensorSpec:
    return DTensorSpec(mesh, (Replicate(),) * mesh.ndim, tensor_meta=tensor_meta)


def _shards_rows(p) -> bool:
    return isinstance(p, (Shard, _StridedShard)) and p.dim == 0


def _check_rows(name: str, spec: DTensorSpec) -> None:
    """Only Replicate or a sharding of the rows (dimension 0 of the (M, N) view) can run locally."""
    for mesh_dim, p in enumerate(spec.placements):
        if isinstance(p, Partial):
            raise ValueError(
                f"fusednorm: {name} is Partial on mesh dimension {mesh_dim} ({spec.placements}); a norm needs "
                f"the reduced values: reduce it first (e.g. RowwiseParallel(output_layouts=Shard(1)), or "
                f"{name}.redistribute(placements=[Shard(1)]))")
        if not (isinstance(p, Replicate) or _shards_rows(p)):
            raise ValueError(
                f"fusednorm: {name} is sharded along the normalized (last) dimension on mesh dimension {mesh_dim} "
                f"({spec.placements} of the (rows, N) view); every row must be whole on one rank: shard a "
                f"leading dimension instead (e.g. Shard(1), the sequence) or redistribute explicitly")


def _input_spec(name: str, spec: DTensorSpec, rows: DTensorSpec) -> DTensorSpec:
    """The spec a row input must have: the rows' placement. A Replicate mesh dimension is narrowed to
    the rank's own rows locally; any other difference would need communication, so it is refused."""
    if spec.placements == rows.placements:
        return spec
    for mesh_dim, (p, want) in enumerate(zip(spec.placements, rows.placements, strict=True)):
        if p != want and not isinstance(p, Replicate):
            raise ValueError(
                f"fusednorm: {name} has placements {spec.placements} but x has {rows.placements} (mesh dimension "
                f"{mesh_dim}); give {name} x's placements (or Replicate): they must shard the same rows")
    return _like(rows, spec.tensor_meta)


def _strategy(op_schema: OpSchema, inputs: list[tuple[DTensorSpec, DTensorSpec]], outputs: tuple) -> OpStrategy:
    """One OpSpec; ``inputs`` pairs every DTensor argument's current spec with the spec it needs."""
    costs = [generate_redistribute_costs(strategy, want)
             for strategy, (_, want) in zip(op_schema.args_strategy, inputs, strict=True)]
    return OpStrategy([OpSpec(output_specs=outputs, input_specs=[want for _, want in inputs],
                              redistribute_cost=costs)])


def _parameter_input(spec: DTensorSpec) -> DTensorSpec:
    if all(isinstance(p, Replicate) for p in spec.placements):
        return spec
    return _replicate(spec.mesh, spec.tensor_meta)


def _column_sum(rows: DTensorSpec) -> DTensorSpec:
    """A (N,) or 0-d sum over the rows: Partial where the rows are sharded."""
    return DTensorSpec(rows.mesh, tuple(Partial("sum") if _shards_rows(p) else Replicate() for p in rows.placements))


def _forward_strategy(op_schema: OpSchema) -> OpStrategy:
    args = op_schema.args_schema
    variant = Variant.from_flags(args[_FWD_VARIANT])
    if variant.has_dropout:
        raise ValueError("fusednorm: dropout_p > 0 is not supported on DTensors: every rank would draw the same "
                         "dropout mask for its own rows; use dropout_p=0.0 (or local tensors)")
    x, residual = _spec(args[0]), _spec(args[1])
    _check_rows("x", x)
    inputs = [(x, x)]
    if residual is not None:
        _check_rows("residual", residual)
        inputs.append((residual, _input_spec("residual", residual, x)))
    for param in args[2:6]:  # weight, bias, residual_scale, seed
        if (spec := _spec(param)) is not None:
            inputs.append((spec, _parameter_input(spec)))
    rows, empty = _like(x), _replicate(x.mesh)
    outputs = (rows, rows if variant.store_h else empty, empty if variant.is_rms else rows, rows,
               rows if variant.store_stats else empty)
    return _strategy(op_schema, inputs, outputs)


def _backward_strategy(op_schema: OpSchema) -> OpStrategy:
    args = op_schema.args_schema
    variant = Variant.from_flags(args[_BWD_VARIANT])
    rows = _spec(args[8])  # rstd: (M,), the forward's row placement
    _check_rows("rstd", rows)
    inputs = []
    for index, name in enumerate(("dy", "dh_in", "x", "residual", "h", "weight", "residual_scale", "mean", "rstd",
                                  "seed")):
        spec = _spec(args[index])
        if spec is None:
            continue
        if name in ("weight", "residual_scale", "seed"):
            want = _parameter_input(spec)
        elif spec.tensor_meta is not None and spec.tensor_meta.shape.numel() == 0:
            want = spec  # RMSNorm's empty mean: nothing to move
        elif name in ("dy", "dh_in"):
            want = _like(rows, spec.tensor_meta)  # a gradient arrives in any placement: DTensor moves it here
        else:
            want = _input_spec(name, spec, rows)
        inputs.append((spec, want))
    empty, column_sum = _replicate(rows.mesh), _column_sum(rows)
    bias_dtype = args[_BWD_VARIANT + 4]
    outputs = (_like(rows), _like(rows) if variant.store_dresidual else empty,
               column_sum if variant.has_weight else empty, column_sum if bias_dtype is not None else empty,
               column_sum if variant.learned_scale else empty)
    return _strategy(op_schema, inputs, outputs)


@functools.cache
def register_sharding_rules() -> None:
    """Registers the rules for torch.ops.fusednorm.fwd / bwd with DTensor (once; idempotent).

    Called by the functional layer at the first DTensor call; call it yourself only to run
    torch.ops.fusednorm.* directly on DTensors.
    """
    from . import ops  # noqa: F401  (defines torch.ops.fusednorm.*)

    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.register_op_strategy(torch.ops.fusednorm.fwd.default, _forward_strategy,
                                    RuntimeSchemaInfo(static_argnum=_FWD_VARIANT))
    propagator.register_op_strategy(torch.ops.fusednorm.bwd.default, _backward_strategy,
                                    RuntimeSchemaInfo(static_argnum=_BWD_VARIANT))


def _reduce_partial_grad(param: Tensor) -> None:
    """Post-accumulate-grad hook: a Partial gradient (each rank's sum over its own rows) becomes the
    parameter's placement, so every rank holds the full-batch gradient before the optimizer runs."""
    grad = param.grad
    if isinstance(grad, DTensor) and grad.placements != param.placements:
        param.grad = grad.redistribute(param.device_mesh, param.placements)


class SequenceParallel(_TorchSequenceParallel):
    """torch's ``SequenceParallel`` for fusednorm's norms, also those with two inputs.

    torch's style converts only the first positional input (``forward(x)``); AddLayerNorm and
    AddRMSNorm take ``(x, residual)``. This style shards every tensor input on ``sequence_dim``: a
    DTensor input in another placement is redistributed to Shard(sequence_dim), a plain tensor is
    taken as this rank's shard, None (no residual) stays None; keyword tensor arguments
    (``residual=``) are treated alike. The output -- y, or (y, h) with prenorm -- is sharded on the
    sequence dimension (local tensors with ``use_local_output=True``). Parameters become Replicate
    DTensors and their gradients are all-reduced when accumulated (see ``_reduce_partial_grad``).
    Also right for LayerNorm / RMSNorm (and torch.nn's norms).

    Example: ``parallelize_module(block, tp_mesh, {"norm": fusednorm.distributed.SequenceParallel()})``.
    """

    def _replicate_module_fn(self, name: str, module: nn.Module, device_mesh) -> None:
        super()._replicate_module_fn(name, module, device_mesh)
        for param in module.parameters(recurse=False):
            param.register_post_accumulate_grad_hook(_reduce_partial_grad)

    def _shard(self, t, device_mesh):
        if isinstance(t, DTensor):
            if t.placements != self.sequence_sharding:
                return t.redistribute(placements=self.sequence_sharding)
            return t
        if isinstance(t, Tensor):
            return DTensor.from_local(t, device_mesh, self.sequence_sharding, run_check=False)
        return t

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        from torch.distributed.tensor import distribute_module

        distribute_module(module, device_mesh, self._replicate_module_fn)

        def shard_inputs(mod, args, kwargs):
            return (tuple(self._shard(a, device_mesh) for a in args),
                    {k: self._shard(v, device_mesh) for k, v in kwargs.items()})

        def local_outputs(mod, args, outputs):
            if not self.use_local_output:
                return outputs
            if isinstance(outputs, tuple):
                return tuple(o.to_local() if isinstance(o, DTensor) else o for o in outputs)
            return outputs.to_local() if isinstance(outputs, DTensor) else outputs

        module.register_forward_pre_hook(shard_inputs, with_kwargs=True)
        module.register_forward_hook(local_outputs)
        return module
