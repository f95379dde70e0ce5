"""fusednorm.models: each variant against the same network written with unfused torch ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusednorm.models import Encoder, EncoderLayer

D = 32


def ln(h, norm):
    return F.layer_norm(h, (D,), norm.weight, norm.bias, norm.eps)


def rms(h, norm):
    return F.rms_norm(h, (D,), norm.weight, norm.eps)


def unfused_encoder(model: Encoder, x, attn_mask=None, norm=ln):
    """The textbook formulas: Post-LN x = Norm(s * x + f(x)); Pre-LN h = h + f(Norm(h)), final Norm(h)."""
    if model.variant == "pre":
        h = x
        for layer in model.layers:
            h = h + layer.attn(norm(h, layer.attn_norm), attn_mask)
            h = h + layer.ffn(norm(h, layer.ffn_norm))
        return norm(h, model.final_norm)
    for layer in model.layers:
        for branch, add_norm in ((lambda z, la=layer: la.attn(z, attn_mask), layer.attn_norm),
                                 (layer.ffn, layer.ffn_norm)):
            s = add_norm.residual_scale if add_norm.residual_scale is not None else add_norm.scale_constant
            s = 1.0 if s is None else s
            x = norm(x * s + branch(x), add_norm)
    return x


@pytest.mark.parametrize("variant", ["post", "pre", "admin", "deepnorm"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_encoder_matches_unfused(variant, norm):
    torch.manual_seed(0)
    model = Encoder(3, D, 4, 2 * D, variant, norm=norm)
    if variant == "admin":  # a non-trivial learned omega, different per feature
        with torch.no_grad():
            for layer in model.layers:
                layer.attn_norm.residual_scale.uniform_(1.0, 3.0)
                layer.ffn_norm.residual_scale.uniform_(1.0, 3.0)
    x = torch.randn(2, 5, D) + 0.3
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    out = model(x, attn_mask=causal)
    want = unfused_encoder(model, x, causal, ln if norm == "layer" else rms)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # Gradients reach every parameter, the learned omega included, and match the unfused graph's.
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(model.parameters()), g)
    want_grads = torch.autograd.grad(want, list(model.parameters()), g)
    for (name, _), a, b in zip(model.named_parameters(), grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_admin_with_omega_one_is_post_ln():
    torch.manual_seed(0)
    post = Encoder(2, D, 4, 2 * D, "post")
    admin = Encoder(2, D, 4, 2 * D, "admin")
    missing = admin.load_state_dict(post.state_dict(), strict=False)
    assert all(k.endswith("residual_scale") for k in missing.missing_keys) and not missing.unexpected_keys
    x = torch.randn(2, 4, D)
    torch.testing.assert_close(admin(x), post(x))
    assert admin.layers[0].attn_norm.residual_scale.shape == (D,)


def test_layer_arguments_are_checked():
    with pytest.raises(ValueError, match="variant"):
        EncoderLayer(D, 4, D, "sandwich")
    with pytest.raises(ValueError, match="alpha"):
        EncoderLayer(D, 4, D, "deepnorm")
    with pytest.raises(ValueError, match="norm"):
        EncoderLayer(D, 4, D, "post", norm="batch")
    with pytest.raises(ValueError, match="divisible"):
        EncoderLayer(D, 5, D, "post")


def test_deepnorm_alpha_override():
    model = Encoder(2, D, 4, D, "deepnorm", alpha=3.0, beta=0.5)
    assert model.layers[1].ffn_norm.scale_constant == 3.0
