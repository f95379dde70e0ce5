"""Hugging Face models: fusednorm.integrations.huggingface on BERT, replace_norms on HF's RMSNorm classes
(LLaMA's, OLMo-2's, T5's dtype rules; Gemma's (1 + w)), safety and reports, the kernels hub layers.
Decoder-layer fusion is tested in tests/test_hf_decoders.py.

Tiny random-init configs, no downloads (HF_HUB_OFFLINE=1). Skipped when transformers is not installed (it is in the
``test`` extra, so CI runs these). Correctness as in tests/test_integrations.py: outputs (eval) and
gradients (dropout off) within the DESIGN section-6 bound against a float64 copy of the original.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import fusednorm
from fusednorm.integrations.huggingface import FusedPostLNOutput, PatchReport, fuse_model, patch_post_ln
from fusednorm.integrations.norms import HFRMSNorm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from _hf import float64_reference  # noqa: E402
from test_integrations import assert_model_matches, assert_within_section6, count_calls, outputs_and_grads  # noqa: E402
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerNorm  # noqa: E402

VOCAB, SEQ = 64, 7


def token_ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(3))


def perturb_norms(model: nn.Module) -> nn.Module:
    """Non-trivial norm weights and biases (HF initialises them to 1 and 0), so wrong gradients show."""
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def tiny_bert(**overrides) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.0, **overrides)
    return perturb_norms(BertModel(config))


def tiny_llama(**overrides) -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=16, **overrides)
    return perturb_norms(LlamaModel(config))


def hidden(output) -> torch.Tensor:
    return output.last_hidden_state


# ----------------------------------------------------------------------------------------------- BERT

def test_bert_patched_blocks_keys_and_parameters():
    model = tiny_bert()
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    names = patch_post_ln(model)
    # BertSelfOutput and BertOutput of each of the 2 layers.
    assert sorted(names) == [f"encoder.layer.{i}.{part}" for i in range(2) for part in ("attention.output", "output")]
    for name in names:
        block = model.get_submodule(name)
        assert isinstance(block, FusedPostLNOutput) and isinstance(block.LayerNorm, fusednorm.AddLayerNorm)
        assert block.LayerNorm.dropout_p == 0.1 and block.LayerNorm.eps == model.config.layer_norm_eps
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    # The rest (the embeddings' LayerNorm) goes through replace_norms.
    fuse_model(model)
    assert isinstance(model.embeddings.LayerNorm, fusednorm.LayerNorm)
    assert list(model.state_dict()) == keys


def test_bert_patched_matches_original_outputs_and_gradients():
    original = tiny_bert().eval()  # eval: dropout off, for outputs and for gradients
    reference = float64_reference(original)
    patched = fuse_model(copy.deepcopy(original))
    calls = count_calls(patched, (fusednorm.AddLayerNorm, fusednorm.LayerNorm))
    ids = token_ids()
    with torch.no_grad():
        assert_within_section6("eval output", hidden(patched(ids)), hidden(reference(ids)), hidden(original(ids)))
    assert calls["n"] == 5  # 4 fused blocks + the embeddings' LayerNorm
    fused = outputs_and_grads(patched, ids, out=hidden)
    assert_model_matches(fused, outputs_and_grads(reference, ids, out=hidden),
                         outputs_and_grads(original, ids, out=hidden))


def test_bert_patched_dropout_follows_the_training_mode():
    model = fuse_model(tiny_bert())
    ids = token_ids()
    model.eval()
    with torch.no_grad():
        a, b = hidden(model(ids)), hidden(model(ids))
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        c = hidden(model(ids))
        torch.manual_seed(0)
        d = hidden(model(ids))
        e = hidden(model(ids))
    assert torch.equal(c, d) and not torch.equal(c, e) and not torch.equal(a, c)


def test_bert_patched_under_autocast_keeps_the_output_dtype():
    """Under bf16 autocast HF's LayerNorm returns float32; the fused block must too."""
    original = tiny_bert().eval()
    patched = fuse_model(copy.deepcopy(original))
    ids = token_ids()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = hidden(patched(ids)), hidden(original(ids))
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=0.05, rtol=0.05)


def test_bert_admin_residual_scale():
    """residual_scale="vector": a learned omega per fused block, initialised to 1 (same outputs as without),
    with a gradient, one new state_dict key per block, and admin_init sets it from a profiling pass."""
    plain = fuse_model(tiny_bert()).eval()
    admin = fuse_model(tiny_bert(), residual_scale="vector").eval()
    new_keys = set(admin.state_dict()) - set(plain.state_dict())
    assert new_keys == {f"encoder.layer.{i}.{part}.LayerNorm.residual_scale"
                        for i in range(2) for part in ("attention.output", "output")}
    ids = token_ids()
    assert torch.equal(hidden(admin(ids)), hidden(plain(ids)))  # omega = 1: r * 1 + x is r + x exactly
    hidden(admin(ids)).square().mean().backward()
    for key in new_keys:
        scale = admin.get_parameter(key)
        assert scale.shape == (32,) and scale.grad is not None and scale.grad.abs().sum() > 0
    records = fusednorm.admin_init(admin, lambda: admin(ids))
    assert [r.name for r in records] == sorted(k.rsplit(".", 1)[0] for k in new_keys)
    assert records[0].omega == 1.0 and records[-1].omega > 1.0  # the running ratio grows with depth
    for r in records:
        assert torch.all(admin.get_parameter(r.name + ".residual_scale") == r.omega)


def test_fuse_model_reports_and_logs_one_line(caplog):
    import logging

    report = PatchReport()
    with caplog.at_level(logging.INFO, logger="fusednorm"):
        fuse_model(tiny_bert(), report=report)
    (line,) = [r for r in caplog.records if r.name == "fusednorm"]
    assert line.levelno == logging.INFO
    assert line.getMessage() == ("fusednorm fuse_model(BertModel): swapped 1 (1 LayerNorm); "
                                 "fused 4 (2 BertOutput, 2 BertSelfOutput)")
    assert sorted(r.name for r in report.fused) == [f"encoder.layer.{i}.{part}" for i in range(2)
                                                    for part in ("attention.output", "output")]


def test_bert_on_the_meta_device_is_fused_and_loads_its_weights():
    """Blocks of a model built before its weights exist are probed on a CPU copy with random weights."""
    built = tiny_bert().eval()
    with torch.device("meta"):
        meta = BertModel(built.config)
    report = PatchReport()
    fuse_model(meta, report=report)
    assert len(report.fused) == 4 and [r.name for r in report.swapped] == ["embeddings.LayerNorm"]
    meta.to_empty(device="cpu")
    meta.load_state_dict(built.state_dict())
    with torch.no_grad():
        for name, buffer in built.named_buffers():  # non-persistent buffers (position ids)
            meta.get_buffer(name).copy_(buffer)
    meta.eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(hidden(meta(ids)), hidden(built(ids)), rtol=1e-5, atol=1e-5)


def test_bert_patch_leaves_other_blocks_alone():
    """A block with the same children but another computation (no residual add) is not patched."""

    class NotPostLN(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.dropout, self.LayerNorm = nn.Linear(8, 8), nn.Dropout(0.1), nn.LayerNorm(8)

        def forward(self, hidden_states, input_tensor):
            return self.LayerNorm(self.dropout(self.dense(hidden_states))) + input_tensor

    model = nn.Sequential(NotPostLN())
    assert patch_post_ln(model) == []
    assert isinstance(model[0], NotPostLN)


# ---------------------------------------------------------------------------------------------- LLaMA

def test_llama_rmsnorm_replaced_keeping_parameters_and_keys():
    model = tiny_llama()
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    fusednorm.replace_norms(model)
    norms = [m for m in model.modules() if isinstance(m, HFRMSNorm)]
    assert len(norms) == 5 and not any(isinstance(m, LlamaRMSNorm) for m in model.modules())
    assert all(n.variance_epsilon == model.config.rms_norm_eps and n.out_dtype_rule == "promote" for n in norms)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())


def test_llama_replaced_matches_original_outputs_and_gradients():
    original = tiny_llama().eval()
    reference = float64_reference(original)
    replaced = fusednorm.replace_norms(copy.deepcopy(original))
    calls = count_calls(replaced, HFRMSNorm)
    ids = token_ids()
    with torch.no_grad():
        assert_within_section6("eval output", hidden(replaced(ids)), hidden(reference(ids)), hidden(original(ids)))
    assert calls["n"] == 5
    fused = outputs_and_grads(replaced, ids, out=hidden)
    assert_model_matches(fused, outputs_and_grads(reference, ids, out=hidden),
                         outputs_and_grads(original, ids, out=hidden))


RULES = {LlamaRMSNorm: ("promote", 0.0), Olmo2RMSNorm: ("input", 0.0), T5LayerNorm: ("weight", 0.0),
         GemmaRMSNorm: ("input", 1.0)}


def hf_norm(cls, n: int = 48, w_dtype=torch.float32) -> nn.Module:
    norm = cls(n, eps=1e-6).to(w_dtype)
    with torch.no_grad():
        norm.weight.normal_(0.2 if cls is GemmaRMSNorm else 1.0, 0.3)
    return norm


@pytest.mark.parametrize("cls", list(RULES), ids=lambda c: c.__name__)
@pytest.mark.parametrize(("x_dtype", "w_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                  (torch.float16, torch.float32)])
def test_hf_rmsnorm_classes_swapped_with_their_dtype_rule_and_offset(cls, x_dtype, w_dtype):
    """LLaMA's ``weight * h.to(input_dtype)`` (promote_types(x, w)), OLMo-2's ``(weight * h).to(input_dtype)``,
    T5's ``h.to(weight.dtype)`` and Gemma's ``(h * (1 + w.float())).type_as(x)`` (offset 1, summed in float32,
    rounded once): the drop-in returns HF's dtype, values and input gradient within the section-6 bound of
    HF's own result against float64."""
    norm = hf_norm(cls, w_dtype=w_dtype)
    twin = fusednorm.replace_norms(copy.deepcopy(norm))
    assert isinstance(twin, HFRMSNorm) and (twin.out_dtype_rule, twin.weight_offset) == RULES[cls]
    x = (torch.randn(6, 48, generator=torch.Generator().manual_seed(0)) * 2 + 1).to(x_dtype).requires_grad_(True)
    ours, theirs = twin(x), norm(x)
    assert ours.dtype == theirs.dtype
    x64, w64 = x.detach().double().requires_grad_(True), norm.weight.detach().double() + RULES[cls][1]
    reference = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert_within_section6("y", ours, reference.detach(), theirs, dtype=theirs.dtype)
    g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = [torch.autograd.grad((out.double() * g).sum(), inp)[0] for out, inp in
             ((ours, x), (theirs, x), (reference, x64))]
    assert_within_section6("dx", grads[0], grads[2], grads[1], dtype=x_dtype)


def test_rmsnorm_lookalikes_are_left_alone_with_a_reason():
    """Matched by behaviour: a gated norm, a bias-free LayerNorm and a norm that ignores its weight are not
    RMSNorms (transformers' own classes, subclassed here as transformers would define them)."""

    class GatedRMSNorm(LlamaRMSNorm):
        def forward(self, x, gate=None):
            return super().forward(x if gate is None else x * gate)

    class MeanSubtractedRMSNorm(LlamaRMSNorm):
        def forward(self, x):
            return super().forward(x - x.mean(-1, keepdim=True))

    class UnweightedRMSNorm(LlamaRMSNorm):
        def forward(self, x):
            return super().forward(x) / self.weight

    for cls in (GatedRMSNorm, MeanSubtractedRMSNorm, UnweightedRMSNorm):
        cls.__module__ = LlamaRMSNorm.__module__  # as if transformers had defined them
    model = nn.Sequential(GatedRMSNorm(16), MeanSubtractedRMSNorm(16), UnweightedRMSNorm(16), LlamaRMSNorm(16))
    report = PatchReport()
    fusednorm.replace_norms(model, report=report)
    assert [type(m).__name__ for m in model] == ["GatedRMSNorm", "MeanSubtractedRMSNorm", "UnweightedRMSNorm",
                                                 "HFRMSNorm"]
    reasons = [r.detail for r in report.left]
    assert "gated" in reasons[0] and all("output differs" in r for r in reasons[1:])


def test_a_user_copy_of_llama_rmsnorm_is_not_swapped():
    """The README's promise: a class of the user's own is never swapped, even one that computes exactly
    LlamaRMSNorm's formula and is named like it."""

    class MyRMSNorm(LlamaRMSNorm):
        pass

    model = nn.Sequential(MyRMSNorm(16))
    fusednorm.replace_norms(model)
    assert type(model[0]) is MyRMSNorm


def test_hf_norms_on_the_meta_device_are_swapped():
    """Recognised by a probe on a CPU copy: the meta model is swapped, and once its weights are loaded it
    gives the outputs of the model built normally."""
    with torch.device("meta"):
        model = nn.Sequential(LlamaRMSNorm(16), GemmaRMSNorm(16), T5LayerNorm(16))
    report = PatchReport()
    fusednorm.replace_norms(model, report=report)
    assert [type(m) for m in model] == [HFRMSNorm] * 3 and len(report.swapped) == 3
    assert [(m.out_dtype_rule, m.weight_offset) for m in model] == [("promote", 0.0), ("input", 1.0), ("weight", 0.0)]
    built = nn.Sequential(hf_norm(LlamaRMSNorm, 16), hf_norm(GemmaRMSNorm, 16), hf_norm(T5LayerNorm, 16))
    model.load_state_dict(built.state_dict(), assign=True)
    x = torch.randn(3, 16) + 1
    torch.testing.assert_close(model(x), built(x), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- compile

def _recording(graphs: list):
    """A torch.compile backend: keep Dynamo's FX graph, then run AOTAutograd's eager backend."""
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


def _hidden_adds_and_norms(gm, hidden_shape) -> tuple[int, int]:
    """(adds producing a (B, T, hidden) tensor, fusednorm forward ops) in a Dynamo graph and the subgraphs
    of its autograd.Function calls."""
    import operator

    adds = norms = 0
    for module in gm.modules():
        for node in module.graph.nodes if isinstance(module, torch.fx.GraphModule) else ():
            value = node.meta.get("example_value")
            if node.target in (operator.add, torch.add) and getattr(value, "shape", None) == hidden_shape:
                adds += 1
            norms += node.target is torch.ops.fusednorm.fwd.default
    return adds, norms


@pytest.mark.usefixtures("torch_function_path")  # the Function path (see tests/conftest.py)
def test_compiled_patched_models_run_and_match_eager():
    """torch.compile(fullgraph=True) of a patched BERT (Admin scale, dropout on) and a fused LLaMA (every
    residual add fused, the hand-off between layers included): one graph, no graph break, forward and
    backward; the LLaMA graph holds no residual add on (B, T, hidden) tensors and 2L + 1 fused norm calls.
    AOTAutograd's eager backend keeps the CI time small (Inductor's C++ code generation for a whole model
    takes minutes on 2 cores) and runs the same kernels, so the results equal eager bit for bit, dropout
    included (same seeds)."""
    ids = token_ids()
    bert = fuse_model(tiny_bert(), residual_scale="vector").train()
    llama = fuse_model(tiny_llama()).train()
    for model in (bert, llama):
        graphs: list = []
        compiled = torch.compile(model, fullgraph=True, backend=_recording(graphs))
        torch.manual_seed(0)
        eager = outputs_and_grads(model, ids, out=hidden)
        torch.manual_seed(0)
        got = outputs_and_grads(compiled, ids, out=hidden)
        got = {k.replace("d_orig_mod.", "d"): v for k, v in got.items()}
        # The compiled graph also differentiates outputs that the loss ignores (BERT's pooler): zeros.
        assert set(eager) <= set(got) and all(not got[k].any() for k in set(got) - set(eager))
        for k, v in eager.items():
            assert torch.equal(got[k], v), k
        assert len(graphs) == 1
    layers = llama.config.num_hidden_layers
    assert _hidden_adds_and_norms(graphs[0], (*ids.shape, llama.config.hidden_size)) == (0, 2 * layers + 1)


# --------------------------------------------------------------------------- the kernels hub convention

@pytest.mark.usefixtures("torch_function_path")  # the Function path (see tests/conftest.py)
@pytest.mark.parametrize("local_repository", [True, False], ids=["LocalLayerRepository", "in_process"])
def test_kernelize_maps_transformers_norms_to_fusednorm(tmp_path, local_repository):
    """kernels.kernelize with fusednorm's mapping (a local kernel repository written to tmp_path, or the
    in-process one; nothing downloaded) replaces the forward of transformers' "RMSNorm" classes (LLaMA's),
    its "RMSNormZeroCentered" ones (Qwen3.5's (1 + w)) and of a LayerNorm marked "LayerNorm": fusednorm's
    kernels run (one call per norm), outputs and gradients match, Parameters and keys stay."""
    pytest.importorskip("kernels")
    from kernels import Mode, kernelize, replace_kernel_forward_from_hub, use_kernel_mapping
    from test_integrations import OpCounter
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

    from fusednorm.integrations.hub import kernel_mapping

    class MarkedLayerNorm(nn.LayerNorm):  # marked here, not torch.nn.LayerNorm itself (global state)
        pass

    replace_kernel_forward_from_hub(MarkedLayerNorm, "LayerNorm")
    original = nn.ModuleDict(dict(llama=tiny_llama(), gated=Qwen3_5RMSNorm(32), ln=MarkedLayerNorm(32)))
    perturb_norms(original)
    with torch.no_grad():
        original["gated"].weight.normal_(0.0, 0.3)
    model = copy.deepcopy(original)
    keys = list(model.state_dict())
    mapping = kernel_mapping(tmp_path / "fusednorm-kernel" if local_repository else None, devices=("cpu",))
    with use_kernel_mapping(mapping, inherit_mapping=False):
        kernelize(model, mode=Mode.TRAINING | Mode.TORCH_COMPILE, device="cpu")
    kernelized = [m for m in model.modules() if "_kernel_repo" in m.__dict__]
    assert len(kernelized) == 5 + 2 and list(model.state_dict()) == keys
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) + 1
    ids = token_ids()
    with OpCounter() as counter:
        got = [hidden(model["llama"](ids)), model["gated"](x), model["ln"](x)]
    assert counter.norm_calls == 5 + 2
    expected = [hidden(original["llama"](ids)), original["gated"](x), original["ln"](x)]
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    sum(y.square().sum() for y in got).backward()
    sum(y.square().sum() for y in expected).backward()
    for (name, p), q in zip(model.named_parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
