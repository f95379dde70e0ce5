"""Tiny Hugging Face models for the tests (random init from configs, nothing downloaded) and their float64
reference: HF's RMSNorm classes compute in float32 even for float64 input, so the reference replaces them
by the same formula in the input's dtype (written here, independently of fusednorm)."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 128
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family: (config class, causal LM class, config overrides, what fuse_model does to it)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                           experts_implementation="eager")),  # float64 reference
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),
}


def perturb_norms(model: nn.Module, seed: int = 4) -> nn.Module:
    """Non-trivial norm weights and biases (HF initialises them to 1 / 0), so that wrong gradients show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def tiny_causal_lm(family: str, device: str | torch.device | None = None, **overrides) -> nn.Module:
    """A 2-layer, width-64 causal LM of ``family`` in eval mode, seeded, with perturbed norms."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = getattr(transformers, model_name)(config)
    return (perturb_norms(model) if device != "meta" else model).eval()


def token_ids(batch: int = 2, seq: int = 7, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


class ExactRMSNorm(nn.Module):
    """(weight + offset) * x * rsqrt(mean(x^2) + eps) in x's dtype (Gemma's norms: offset 1)."""

    def __init__(self, weight: nn.Parameter, eps: float, offset: float):
        super().__init__()
        self.weight, self.eps, self.offset = weight, eps, offset

    def forward(self, x):
        return (self.weight + self.offset) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _offset_of(norm: nn.Module) -> float:
    """Gemma's classes compute (1 + weight): told apart by the source of their forward, not by fusednorm."""
    import inspect

    return 1.0 if "1.0 + self.weight" in inspect.getsource(type(norm).forward) else 0.0


def float64_reference(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` whose HF RMSNorm modules compute in float64 (same Parameters' values)."""
    reference = copy.deepcopy(model).double()
    for parent in list(reference.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RMSNorm") and type(child).__module__.startswith("transformers"):
                eps = getattr(child, "variance_epsilon", getattr(child, "eps", None))
                setattr(parent, name, ExactRMSNorm(child.weight, eps, _offset_of(child)))
    return reference
