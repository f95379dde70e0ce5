"""Hugging Face transformers models with fusednorm's fused residual-add + norm.

Two-line usage (``pip install fusednorm[hf]``)::

    from fusednorm.integrations.huggingface import fuse_model
    fuse_model(model)                       # or fuse_model(model, residual_scale="vector") for Admin

What is changed, in place, keeping every Parameter object and state_dict key (``report=PatchReport()``
lists it, and a one-line summary is logged on the "fusednorm" logger):

- BERT-style Post-LN blocks (BertSelfOutput, BertOutput and their copies in RoBERTa, ELECTRA, ...)
  compute ``LayerNorm(dropout(dense(h)) + input)``. Each becomes a :class:`FusedPostLNOutput` that
  computes ``dense(h)`` and then one fused ``add_layer_norm(dense(h), input, dropout_p=p)`` call
  (p: the block's dropout probability in training, 0 in eval). Its ``LayerNorm`` child is an
  :class:`fusednorm.AddLayerNorm` holding the original weight and bias, so the keys stay
  ``...output.dense.weight``, ``...output.LayerNorm.weight``, ... With ``residual_scale="vector"``
  (or "scalar", or a float) the block computes ``LayerNorm(input * omega + dropout(dense(h)))`` with a
  learned Parameter ``LayerNorm.residual_scale`` initialised to 1 (a new state_dict key), ready for
  :func:`fusednorm.admin_init` (Admin, DESIGN section 3).
- Every other norm goes through :func:`fusednorm.replace_norms`: torch.nn.LayerNorm / RMSNorm and
  Hugging Face's RMSNorm classes (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, GemmaRMSNorm's (1 + w), ...).
- LLaMA-family decoder layers (LLaMA, Mistral, Qwen2/3, Phi-3, Gemma, Gemma2/3, Mixtral, Starcoder2, ...)
  get both residual adds fused: the attention add with the post-attention norm, the MLP add with the next
  layer's input norm (the final norm after the last layer), see ``fusednorm.integrations.decoder``.

Blocks and norms are recognised by structure and checked by behaviour on a probe input, not by
class name, so the module does not import transformers and works with any version of it.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from ..modules import AddLayerNorm
from .decoder import fuse_decoders
from .norms import forward_arity, private_copy, swap_norms
from .report import FUSED, PatchReport, log_summary

__all__ = ["FusedPostLNOutput", "PatchReport", "fuse_model", "patch_post_ln"]


class FusedPostLNOutput(nn.Module):
    """``LayerNorm(input * s + dropout(dense(hidden_states)))`` as one fused add_layer_norm call.

    hidden_states: (..., dense.in_features); input_tensor: (..., N). Returns (..., N) in the dtype of
    ``dense(h) + input`` (float32 under autocast when the stream is float32, as HF's block).
    Children: ``dense`` (the original nn.Linear) and ``LayerNorm`` (an AddLayerNorm with the original
    weight/bias, the block's dropout probability and the residual scale).
    """

    def __init__(self, dense: nn.Module, norm: AddLayerNorm):
        super().__init__()
        self.dense = dense
        self.LayerNorm = norm

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        x = self.dense(hidden_states)
        if x.dtype != input_tensor.dtype:
            # Under autocast dense() gives bf16 while the stream is float32: HF's LayerNorm(x + input)
            # then returns float32, and so must we (the kernel takes one dtype for x and y).
            x = x.to(torch.promote_types(x.dtype, input_tensor.dtype))
        # Positional (x, residual): admin_init's profiling hook reads them in this order.
        return self.LayerNorm(x, input_tensor)


def _is_post_ln_block(module: nn.Module) -> bool:
    """True for a block whose forward(h, input) is LayerNorm(dropout(dense(h)) + input).

    Structure: exactly the children ``dense`` (nn.Linear), ``dropout`` (nn.Dropout) and ``LayerNorm``
    (nn.LayerNorm over one dimension equal to dense.out_features), no parameters of its own, and a
    forward with two arguments. Behaviour: in eval mode, on a probe input, its output equals
    LayerNorm(dense(h) + input) (this rejects blocks that add elsewhere or normalise something else); a
    block on the meta device is probed on a CPU copy with random weights.
    """
    children = dict(module.named_children())
    if set(children) != {"dense", "dropout", "LayerNorm"} or module._parameters or module._buffers:
        return False
    dense, dropout, norm = children["dense"], children["dropout"], children["LayerNorm"]
    if not (isinstance(dense, nn.Linear) and type(dropout) is nn.Dropout and isinstance(norm, nn.LayerNorm)):
        return False
    if tuple(norm.normalized_shape) != (dense.out_features,):
        return False
    if forward_arity(module) != 2:
        return False
    gen = torch.Generator().manual_seed(0)
    # A model on the meta device is probed on a CPU copy with random weights; otherwise in place (no copy
    # of a large dense layer), restoring the training flags after.
    meta = any(p.is_meta for p in module.parameters())
    probe = private_copy(module) if meta else module
    flags = {m: m.training for m in probe.modules()}
    try:
        probe.eval()
        with torch.no_grad():
            if meta:
                for p in probe.parameters():
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen) + (1.0 if p.dim() == 1 else 0.0))
            dense, norm = probe.dense, probe.LayerNorm
            w = dense.weight
            h = torch.randn(2, dense.in_features, generator=gen).to(device=w.device, dtype=w.dtype)
            residual = torch.randn(2, dense.out_features, generator=gen).to(device=w.device, dtype=w.dtype)
            out = probe.forward(h, residual)
            ref = torch.nn.functional.layer_norm(
                (dense(h) + residual).double(), norm.normalized_shape,
                norm.weight.double() if norm.weight is not None else None,
                norm.bias.double() if norm.bias is not None else None, norm.eps)
            tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 5e-2
            scale = max(1.0, float(ref.abs().max()))
            return (isinstance(out, Tensor) and out.shape == ref.shape
                    and float((out.double() - ref).abs().max()) <= tol * scale)
    except Exception:  # a block that cannot run the probe is not a match
        return False
    finally:
        for m, flag in flags.items():
            m.training = flag


def patch_post_ln(model: nn.Module, *, residual_scale: str | float | None = None,
                  report: PatchReport | None = None) -> list[str]:
    """Replace every BERT-style Post-LN block of ``model`` by a :class:`FusedPostLNOutput`, in place.

    residual_scale: None (plain residual add, the original computation), a Python float (constant,
    DeepNorm's alpha), "scalar" or "vector" (a learned Parameter ``LayerNorm.residual_scale`` of shape
    () or (N,), initialised to 1: Admin's omega; set it with :func:`fusednorm.admin_init`).
    Keeps the dense and LayerNorm Parameter objects (device, dtype, state_dict keys), the training mode
    and the dropout probability. Returns the qualified names of the patched blocks; ``report`` (a
    :class:`PatchReport`) gets one record per block, and a one-line summary is logged.
    """
    _check_residual_scale(residual_scale)
    report = report if report is not None else PatchReport()
    start = len(report.records)
    patched = _patch_post_ln(model, residual_scale, report)
    log_summary(f"patch_post_ln({type(model).__name__})", report, start)
    return patched


def _check_residual_scale(residual_scale) -> None:
    if not (residual_scale is None or residual_scale in ("scalar", "vector")
            or (isinstance(residual_scale, numbers.Real) and not isinstance(residual_scale, bool))):
        raise ValueError(f"residual_scale must be None, a float, 'scalar' or 'vector', got {residual_scale!r}")


def _patch_post_ln(model: nn.Module, residual_scale, report: PatchReport) -> list[str]:
    patched: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            if child is None or not _is_post_ln_block(child):
                continue
            norm = child.LayerNorm
            weight = norm.weight
            fused = AddLayerNorm(norm.normalized_shape[0], norm.eps, norm.elementwise_affine,
                                 bias=norm.bias is not None, device=weight.device if weight is not None else None,
                                 dtype=weight.dtype if weight is not None else None,
                                 residual_scale=residual_scale, dropout_p=child.dropout.p)
            # The very Parameter objects: an optimizer built before still holds them.
            if norm.weight is not None:
                fused.weight = norm.weight
            if norm.bias is not None:
                fused.bias = norm.bias
            block = FusedPostLNOutput(child.dense, fused)
            block.train(child.training)
            parent._modules[name] = block
            patched.append(f"{parent_name}.{name}" if parent_name else name)
            report.add(patched[-1], child, FUSED, f"Post-LN residual add + LayerNorm -> {type(block).__name__}")
    return patched


def fuse_model(model: nn.Module, *, residual_scale: str | float | None = None,
               report: PatchReport | None = None) -> nn.Module:
    """Fuse what fusednorm can fuse in a Hugging Face model, in place, and swap every other norm.

    In order: the BERT-style Post-LN blocks (:func:`patch_post_ln`, with ``residual_scale``; the decoders'
    Pre-LN adds take no scale), every norm (:func:`fusednorm.replace_norms`), then the LLaMA-family decoder
    layers (``fusednorm.integrations.decoder``). Works on a model on the meta device too (nothing runs on
    its weights). report: a :class:`PatchReport` to fill with every swapped, fused and left module (and why);
    a one-line summary is logged on the "fusednorm" logger either way. Returns ``model``.
    """
    report = report if report is not None else PatchReport()
    start = len(report.records)
    _check_residual_scale(residual_scale)
    _patch_post_ln(model, residual_scale, report)
    model = swap_norms(model, report)
    fuse_decoders(model, report)
    log_summary(f"fuse_model({type(model).__name__})", report, start)
    return model
