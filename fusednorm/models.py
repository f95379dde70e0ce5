"""A small, readable Transformer encoder on fusednorm's modules: Post-LN, Pre-LN, Admin and DeepNorm.

A reference for users (and the model of the Admin demos and tests), not a framework. Every residual
add + norm is one fused ``AddLayerNorm`` (or ``AddRMSNorm``) call:

- ``"post"``     x = Norm(x + f(x))                    (original Transformer, BERT)
- ``"admin"``    x = Norm(x * omega + f(x))            omega: learned vector, set by ``fusednorm.admin_init``
- ``"deepnorm"`` x = Norm(x * alpha + f(x))            alpha constant; branch weights with init gain beta
- ``"pre"``      h = h + f(Norm(h)); final Norm(h)     (GPT-2 style), fused as ``(y, h) = AddNorm(f, h)``

Shapes: activations are (B, T, d_model) in the parameters' dtype.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .admin import deepnorm_constants
from .modules import AddLayerNorm, AddRMSNorm

__all__ = ["VARIANTS", "Encoder", "EncoderLayer", "FeedForward", "SelfAttention", "deepnorm_init_"]

VARIANTS = ("post", "pre", "admin", "deepnorm")


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (DeepNorm scales v and out only)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, T, d); attn_mask: bool (T, T) or (B, 1, T, T), True = attend. Returns (B, T, d)."""
        b, t, d = x.shape
        heads = lambda z: z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """Linear(d, d_ff) -> ReLU -> dropout -> Linear(d_ff, d)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class EncoderLayer(nn.Module):
    """One encoder layer: self-attention and feed-forward sublayers, each closed by a fused add + norm.

    Args:
        d_model, n_heads, d_ff: sizes.
        variant: "post", "pre", "admin" or "deepnorm" (see the module docstring).
        alpha: DeepNorm's constant residual scale (required for "deepnorm", ignored otherwise).
        dropout: dropout of the branch outputs (applied inside the fused add + norm) and of the FFN hidden.
        attn_dropout: dropout of the attention probabilities.
        norm: "layer" (AddLayerNorm) or "rms" (AddRMSNorm).

    forward: Post-LN style variants take and return x (B, T, d). "pre" takes (branch, residual) and returns
    the new (branch, residual): the pending branch output is added to the stream by the *next* fused call
    (``residual=None`` for the first layer), and the stack's final norm closes it.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, variant: str = "post", *, alpha: float | None = None,
                 dropout: float = 0.0, attn_dropout: float = 0.0, norm: str = "layer"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "deepnorm" and alpha is None:
            raise ValueError("variant='deepnorm' needs alpha (see fusednorm.admin.deepnorm_constants)")
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
        self.variant = variant
        scale = {"post": None, "pre": None, "admin": "vector", "deepnorm": alpha}[variant]

        def add_norm():
            kw = dict(residual_scale=scale, dropout_p=dropout, prenorm=variant == "pre")
            return AddLayerNorm(d_model, **kw) if norm == "layer" else AddRMSNorm(d_model, **kw)

        self.attn = SelfAttention(d_model, n_heads, attn_dropout)
        self.attn_norm = add_norm()
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.ffn_norm = add_norm()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projections and zero biases (fairseq's Transformer init, as in the Admin paper)."""
        for lin in (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj, self.attn.out_proj,
                    self.ffn.fc1, self.ffn.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def deepnorm_branch_linears(self) -> list[tuple[str, nn.Linear]]:
        """The projections DeepNorm initialises with gain beta: value, attention output, both FFN layers."""
        return [("attn.v_proj", self.attn.v_proj), ("attn.out_proj", self.attn.out_proj),
                ("ffn.fc1", self.ffn.fc1), ("ffn.fc2", self.ffn.fc2)]

    def deepnorm_other_linears(self) -> list[tuple[str, nn.Linear]]:
        """The projections DeepNorm leaves at gain 1: queries and keys."""
        return [("attn.q_proj", self.attn.q_proj), ("attn.k_proj", self.attn.k_proj)]

    def forward(self, x: Tensor, residual: Tensor | None = None, attn_mask: Tensor | None = None):
        if self.variant == "pre":
            # x: the previous sublayer's output, not yet added to the stream `residual`.
            y, residual = self.attn_norm(x, residual)
            y, residual = self.ffn_norm(self.attn(y, attn_mask), residual)
            return self.ffn(y), residual
        # The fused module computes Norm(residual * s + x): x is the branch, residual the stream.
        x = self.attn_norm(self.attn(x, attn_mask), x)
        return self.ffn_norm(self.ffn(x), x)


def deepnorm_init_(model: nn.Module, beta: float) -> list[str]:
    """Re-initialise the branch weights of every EncoderLayer in ``model`` with Xavier-normal gain beta.

    Branch weights are those each layer lists in ``deepnorm_branch_linears()`` (FFN in/out, attention value
    and output projections); the query/key projections (``deepnorm_other_linears()``) get gain 1, as in the
    DeepNet paper. Biases are zeroed. beta: see :func:`fusednorm.deepnorm_constants`.
    Returns the qualified names of the weights set to gain beta.
    """
    names: list[str] = []
    with torch.no_grad():
        for lname, layer in model.named_modules():
            if not isinstance(layer, EncoderLayer):
                continue
            for pname, lin in layer.deepnorm_branch_linears():
                nn.init.xavier_normal_(lin.weight, gain=beta)
                if lin.bias is not None:
                    lin.bias.zero_()
                names.append(f"{lname}.{pname}.weight" if lname else f"{pname}.weight")
            for _, lin in layer.deepnorm_other_linears():
                nn.init.xavier_normal_(lin.weight, gain=1.0)
                if lin.bias is not None:
                    lin.bias.zero_()
    if not names:
        warnings.warn(f"deepnorm_init_ found no fusednorm.models EncoderLayer in {type(model).__name__}: nothing "
                      "was initialised", stacklevel=2)
    return names


class Encoder(nn.Module):
    """A stack of ``num_layers`` EncoderLayers; (B, T, d_model) -> (B, T, d_model).

    "pre" ends with a final fused add + norm (the stream's last branch is added, then normalised);
    the other variants end with their last layer's norm. "deepnorm" takes alpha and beta from
    :func:`fusednorm.admin.deepnorm_constants` for an encoder-only stack of ``num_layers`` layers unless
    ``alpha`` is given, and initialises the branch weights with gain beta. "admin" starts at omega = 1
    (plain Post-LN) until :func:`fusednorm.admin_init` is called.
    """

    def __init__(self, num_layers: int, d_model: int, n_heads: int, d_ff: int, variant: str = "post", *,
                 alpha: float | None = None, beta: float | None = None, dropout: float = 0.0,
                 attn_dropout: float = 0.0, norm: str = "layer"):
        super().__init__()
        self.variant = variant
        if variant == "deepnorm":
            default_alpha, default_beta = deepnorm_constants(encoder_layers=num_layers)["encoder"]
            alpha = default_alpha if alpha is None else alpha
            beta = default_beta if beta is None else beta
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, d_ff, variant, alpha=alpha, dropout=dropout, attn_dropout=attn_dropout,
                         norm=norm)
            for _ in range(num_layers))
        self.final_norm = None
        if variant == "pre":
            self.final_norm = AddLayerNorm(d_model) if norm == "layer" else AddRMSNorm(d_model)
        if variant == "deepnorm":
            deepnorm_init_(self, beta)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, T, d_model) -> (B, T, d_model); attn_mask: optional bool mask, True = attend."""
        if self.variant == "pre":
            residual = None
            for layer in self.layers:
                x, residual = layer(x, residual, attn_mask)
            return self.final_norm(x, residual)
        for layer in self.layers:
            x = layer(x, attn_mask=attn_mask)
        return x

