"""fuse_model on LLaMA-family decoders: every residual add becomes one add_*_norm(prenorm=True) call.

Tiny random-init models (2 layers, width 64; nothing downloaded). Per family: logits and every parameter
gradient within the DESIGN section-6 bound against a float64 copy (HF's float32-only RMSNorm classes
replaced by the formula in float64), float32 logits within 1e-4 (relative) of the unpatched model, and the
residual adds on (B, T, hidden) tensors counted by a TorchDispatchMode drop by 2 per layer. Then what the
model must keep doing: generate() with a KV cache, gradient checkpointing (non-reentrant and reentrant),
torch.compile (tests/test_integrations_hf.py compiles the fused LLaMA with fullgraph=True),
save_pretrained / from_pretrained, meta-device models; and the hand-off's fall-backs.

``python tests/test_hf_decoders.py`` writes the per-family errors to benchmarks/results/hf_families.md.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch

import fusednorm
from fusednorm import testing
from fusednorm.integrations.handoff import take
from fusednorm.integrations.huggingface import PatchReport, fuse_model

pytest.importorskip("transformers")
from _hf import FAMILIES, float64_reference, tiny_causal_lm, token_ids  # noqa: E402
from test_integrations import OpCounter, assert_model_matches, outputs_and_grads  # noqa: E402

# The op layer and the Function path of backend "torch" (on the CPU, eager calls otherwise take
# fusednorm.cpu_path, ATen's ops: tests/test_cpu_path.py).
pytestmark = pytest.mark.usefixtures("torch_function_path")

FUSED = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "mixtral", "starcoder2"]
LAYERS, BATCH, SEQ, WIDTH = 2, 2, 7, 64


def logits(output) -> torch.Tensor:
    return output.logits


def fused_copy(model, report: PatchReport | None = None):
    fused = copy.deepcopy(model)
    fuse_model(fused, report=report)
    return fused


def measure(family: str, dtype: torch.dtype = torch.float32) -> dict:
    """Everything the family test checks, as numbers (also written to benchmarks/results/hf_families.md)."""
    original = tiny_causal_lm(family).to(dtype)
    report = PatchReport()
    fused = fused_copy(original, report)
    ids = token_ids(BATCH, SEQ)
    counts = []
    for model in (original, fused):
        with torch.no_grad(), OpCounter(add_shape=(BATCH, SEQ, WIDTH)) as counter:
            model(ids)
        counts.append(counter)
    got = outputs_and_grads(fused, ids, out=logits)
    own = outputs_and_grads(original, ids, out=logits)
    ref = outputs_and_grads(float64_reference(original), ids, out=logits)
    case = testing.Case("rms_norm", (1,), dtype)
    section6 = {k: testing.compare(case, k, got[k], ref[k], own[k]) for k in ref}
    rel = {k: float((got[k] - own[k]).abs().max() / own[k].abs().max().clamp_min(1e-30)) for k in own}
    return dict(report=report, counts=counts, section6=section6, rel_logits=rel["out"],
                rel_grad=max(v for k, v in rel.items() if k != "out"), keys=(list(original.state_dict()),
                                                                            list(fused.state_dict())),
                results=(got, ref, own))


@pytest.mark.parametrize("family", FUSED)
def test_fused_decoder_matches_the_original(family):
    m = measure(family)
    report = m["report"]
    assert [r.name for r in report.fused] == [f"model.layers.{i}" for i in range(LAYERS)]
    assert all("MLP add + model." in r.detail for r in report.fused), report
    assert "MLP add + model.norm" in report.fused[-1].detail
    assert m["keys"][0] == m["keys"][1]  # state_dict keys unchanged
    before, after = m["counts"]
    assert before.adds - after.adds == 2 * LAYERS and after.adds == 0
    # one fusednorm call per norm module (layer 0's input norm alone, each other one fused with its add)
    assert after.norm_calls == len(report.swapped)
    assert_model_matches(*m["results"])
    assert m["rel_logits"] <= 1e-4, m["rel_logits"]


def test_olmo2_norms_after_the_branch_are_swapped_and_its_adds_left():
    """OLMo-2 computes residual + norm(branch): no add is followed by a norm, so nothing fuses; the report
    says why, and the swapped norms keep the outputs."""
    m = measure("olmo2")
    report = m["report"]
    assert not report.fused and len(report.swapped) == 4 * LAYERS + 1
    assert [r.name for r in report.left] == [f"model.layers.{i}" for i in range(LAYERS)]
    assert all("norm after the branch" in r.detail for r in report.left)
    assert_model_matches(*m["results"])


def test_a_decoder_whose_forward_differs_is_left_by_the_probe():
    """Granite's layer has LLaMA's children but scales each branch by residual_multiplier: the stub probe
    sees another output and leaves it (with 1.0 it computes exactly LLaMA's layer and is fused)."""
    pytest.importorskip("transformers.models.granite")
    FAMILIES.setdefault("granite", ("GraniteConfig", "GraniteForCausalLM", {}))
    report = PatchReport()
    fuse_model(tiny_causal_lm("granite", residual_multiplier=0.5), report=report)
    assert not report.fused and all("forward differs" in r.detail for r in report.left if "layers" in r.name)
    report = PatchReport()
    fuse_model(tiny_causal_lm("granite", residual_multiplier=1.0), report=report)
    assert len(report.fused) == LAYERS


def test_a_layer_called_with_the_deprecated_past_key_values_updates_the_cache():
    """transformers 5 renames a layer's ``past_key_values`` argument to ``cache`` (deprecate_kwarg on the
    forward); the fused forward does the same, so the attention still writes the KV cache."""
    from transformers import DynamicCache

    original = tiny_causal_lm("llama")
    fused = fused_copy(original)
    h = torch.randn(1, 4, WIDTH, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(4)[None]
    outputs = []
    for model in (original, fused):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            y = model.model.layers[0](h, position_embeddings=model.model.rotary_emb(h, positions),
                                      position_ids=positions, past_key_values=cache, use_cache=True)
        outputs.append((y, cache.get_seq_length()))
    assert outputs[0][1] == outputs[1][1] == 4
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-6, atol=1e-6)


def test_a_user_subclass_of_a_decoder_layer_is_left():
    from transformers.models.llama import modeling_llama

    class MyDecoderLayer(modeling_llama.LlamaDecoderLayer):
        pass

    model = tiny_causal_lm("llama")
    model.model.layers[1].__class__ = MyDecoderLayer
    report = PatchReport()
    fuse_model(model, report=report)
    assert [r.name for r in report.fused] == ["model.layers.0"]
    assert "MLP add left" in report.fused[0].detail  # layer 1 is not fused, so layer 0 is not linked to it
    assert [(r.name, "of your own" in r.detail) for r in report.left] == [("model.layers.1", True)]


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_bfloat16_models_within_section6(family):
    """A bf16 model (weights and activations): the fused model's logits and gradients are within the
    section-6 bound of HF's bf16 model against float64 -- Gemma's norm rounds once after (1 + w) in float32,
    LLaMA's multiplies by the weight in bf16, and the fused adds round h to bf16 where HF's add does."""
    original = tiny_causal_lm(family).to(torch.bfloat16)
    fused = fused_copy(original)
    ids = token_ids()
    got, own = outputs_and_grads(fused, ids, out=logits), outputs_and_grads(original, ids, out=logits)
    ref = outputs_and_grads(float64_reference(original), ids, out=logits)
    case = testing.Case("rms_norm", (1,), torch.bfloat16)
    for k in ref:
        c = testing.compare(case, k, got[k], ref[k], own[k])
        assert c.ok, f"{k}: error {c.error:.3g} > bound {c.bound:.3g} (torch's own {c.torch_error:.3g})"


def test_autocast_keeps_hf_dtypes_and_values():
    """Under CPU bf16 autocast the stream stays float32 and the linears run in bf16 (logits too): the fused
    adds upcast the branch as HF's add does, so every dtype (logits, hidden states) and value matches HF's."""
    original = tiny_causal_lm("llama")
    fused = fused_copy(original)
    ids = token_ids()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(ids, output_hidden_states=True)
        expected = original(ids, output_hidden_states=True)
    assert all(h.dtype == torch.float32 for h in got.hidden_states)  # the stream, as HF's
    for ours, theirs in zip((got.logits, *got.hidden_states), (expected.logits, *expected.hidden_states),
                            strict=True):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def test_fusing_twice_copying_and_pickling_keep_the_model():
    original = tiny_causal_lm("llama")
    fused = fused_copy(original)
    report = PatchReport()
    fuse_model(fused, report=report)  # a second time: the same layers, linked again, nothing swapped
    assert len(report.fused) == LAYERS and not report.swapped and not report.left
    copied = copy.deepcopy(fused)
    assert copied.model.layers[0]._fusednorm_plan.next_norm is copied.model.layers[1].input_layernorm
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ids = token_ids()
    with torch.no_grad(), OpCounter() as counter:
        outputs = [m(ids).logits for m in (fused, copied, loaded)]
        expected = original(ids).logits
    assert counter.norm_calls == 3 * (2 * LAYERS + 1)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    torch.testing.assert_close(outputs[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_with_a_kv_cache_gives_the_same_tokens(family):
    original = tiny_causal_lm(family)
    fused = fused_copy(original)
    ids = token_ids(2, 5)
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(fused.generate(ids, **kwargs), original.generate(ids, **kwargs))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    """Non-reentrant (HF's default) recomputes a layer with the very input tensor and takes the same offer;
    reentrant recomputes from a detached copy (no offer: the norm runs) -- both give the plain gradients."""
    original = tiny_causal_lm("llama").train()
    plain = fused_copy(original)
    checkpointed = fused_copy(original)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = token_ids()
    expected = outputs_and_grads(plain, ids, out=logits)
    with OpCounter() as counter:
        got = outputs_and_grads(checkpointed, ids, out=logits)
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)
    # Non-reentrant: the forward's 2L + 1 norm calls, and the same again when the backward recomputes the
    # layers (layer 1's input norm takes the offer again). Reentrant: the checkpointed forward runs without
    # grad, so the final norm (with grad) refuses the offer and runs: 2L + 2; the recomputation gets detached
    # inputs (no offers): every input norm runs, 3 calls per layer.
    expected_calls = 2 * (2 * LAYERS + 1) if not reentrant else (2 * LAYERS + 2) + 3 * LAYERS
    assert counter.norm_calls == expected_calls


def test_layer_by_layer_compile_takes_the_offers_across_graphs():
    """Regional compilation (each decoder layer and the final norm compiled on its own, fullgraph): the offer
    crosses graph boundaries on the hidden state (Dynamo replays the attribute on the graph's output and
    guards on it at the next graph's input: one graph without an offer, for layer 0, one with); the results
    equal eager bit for bit, forward and backward. (Dynamo's eager backend: the tracing is what is tested.)"""
    import torch._dynamo

    fused = fused_copy(tiny_causal_lm("llama"))
    compiled = copy.deepcopy(fused)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for module in (*compiled.model.layers, compiled.model.norm):
        module.compile(fullgraph=True, backend="eager")
    ids = token_ids()
    expected = outputs_and_grads(fused, ids, out=logits)
    got = outputs_and_grads(compiled, ids, out=logits)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # layer 0 (no offer at its input), layer 1 (an offer); the final norm takes its offer: an empty graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_save_pretrained_round_trip(tmp_path):
    original = tiny_causal_lm("gemma")
    fused = fused_copy(original)
    fused.save_pretrained(tmp_path)
    loaded = type(original).from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert list(loaded.state_dict()) == list(fused.state_dict()) == list(original.state_dict())
    ids = token_ids()
    with torch.no_grad():
        expected = fused(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(fuse_model(loaded)(ids).logits, expected)


def test_fuse_model_on_the_meta_device():
    """A model built on the meta device (before its weights exist) is fused by structure and stub probes;
    with the weights loaded it computes what the model built normally computes."""
    meta = tiny_causal_lm("gemma2", device="meta")
    report = PatchReport()
    fuse_model(meta, report=report)
    assert len(report.fused) == LAYERS and len(report.swapped) == 4 * LAYERS + 1 and not report.left
    built = tiny_causal_lm("gemma2")
    meta.to_empty(device="cpu")
    meta.load_state_dict(built.state_dict())
    with torch.no_grad():
        for name, buffer in built.named_buffers():  # non-persistent buffers (rotary frequencies, scales)
            meta.get_buffer(name).copy_(buffer)
        ids = token_ids()
        torch.testing.assert_close(meta(ids).logits, built(ids).logits, rtol=1e-5, atol=1e-6)


def test_fused_decoder_on_interpreted_triton():
    """The same model check with the Triton kernels (interpreted on the CPU), on the smallest shapes."""
    fusednorm.set_backend("triton")
    original = tiny_causal_lm("llama", hidden_size=32, intermediate_size=32, num_attention_heads=2,
                              num_key_value_heads=1)
    fused = fused_copy(original)
    ids = token_ids(1, 4)
    with OpCounter() as counter:
        got = outputs_and_grads(fused, ids, out=logits)
    assert counter.norm_calls == 2 * LAYERS + 1
    assert_model_matches(got, outputs_and_grads(float64_reference(original), ids, out=logits),
                         outputs_and_grads(original, ids, out=logits))


# ------------------------------------------------------------------------------------ hand-off fall-backs

def _scale_in_place(weight: torch.nn.Parameter) -> None:
    with torch.no_grad():  # as an optimizer step does (not through .data, which has its own version counter)
        weight.mul_(1.5)


def _with_hooks(model, hook_layer0, pre_hook_layer1=None):
    model.model.layers[0].register_forward_hook(hook_layer0)
    if pre_hook_layer1 is not None:
        model.model.layers[1].register_forward_pre_hook(pre_hook_layer1)
    return model


@pytest.mark.parametrize("case", ["in_place_output", "new_output", "weight_changed"])
def test_the_next_norm_computes_itself_when_the_offer_does_not_hold(case):
    """A hook that changes layer 0's output in place (version counter), one that returns a new tensor (no
    offer on it), or a change of the next norm's weight in place between the layers: the next norm computes
    from what it is given, as the unpatched model does; with no such hook the offer is taken."""
    hooks = {
        "in_place_output": (lambda m, a, out: out.add_(0.25), None),
        "new_output": (lambda m, a, out: out * 1.5, None),
        "weight_changed": (lambda m, a, out: None,
                           lambda m, a: _scale_in_place(m.input_layernorm.weight)),
    }[case]
    original = tiny_causal_lm("llama")
    fused, control = fused_copy(original), fused_copy(original)
    ids = token_ids()
    with torch.no_grad(), OpCounter() as counter:
        got = _with_hooks(fused, *hooks)(ids).logits
        expected = _with_hooks(original, *hooks)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert counter.norm_calls == 2 * LAYERS + 2  # one more than fused: layer 1's input norm ran
    with torch.no_grad(), OpCounter() as without_hooks:
        control(ids)
    assert without_hooks.norm_calls == 2 * LAYERS + 1


def test_offers_follow_grad_mode_and_the_norm_they_name():
    original = tiny_causal_lm("llama")
    fused = fused_copy(original)
    layer0, layer1 = fused.model.layers
    h = torch.randn(BATCH, SEQ, WIDTH)
    kwargs = dict(position_embeddings=fused.model.rotary_emb(h, torch.arange(SEQ)[None]))
    with torch.no_grad():
        out = layer0(h, **kwargs)
    assert take(fused.model.norm, out) is None  # offered to layer 1's input norm, not to the final norm
    assert take(layer1.input_layernorm, out) is None  # made without grad, taken with grad: refused
    with torch.no_grad():
        assert take(layer1.input_layernorm, out) is not None
        assert take(layer1.input_layernorm, out) is None  # taken once without grad, then dropped


def test_a_weight_that_is_not_a_parameter_is_not_used_by_another_layer():
    """FSDP swaps a layer's parameters for plain tensors while it runs; another layer must not compute with
    them (its gradient would arrive after FSDP reduced that layer's gradients): no offer is made."""
    original = tiny_causal_lm("llama")
    fused = fused_copy(original)
    norm = fused.model.norm
    weight = norm._parameters.pop("weight")
    norm.weight = weight.detach().clone()
    ids = token_ids()
    with torch.no_grad(), OpCounter(add_shape=(BATCH, SEQ, WIDTH)) as counter:
        got = fused(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(got, original(ids).logits, rtol=1e-5, atol=1e-6)
    assert counter.adds == 1  # layer 1's MLP add, unfused; the final norm ran on its own


def _fsdp2_worker(rank: int) -> list:
    """On each of 2 gloo ranks: fused LLaMA under FSDP2, (a) every decoder layer and the root sharded, (b) the
    root only; one step on half of the batch each; returns (offers made, worst gradient error) per case."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fusednorm.integrations import decoder

    original = tiny_causal_lm("llama")
    ids = token_ids(4, SEQ)
    g = torch.randn(4, SEQ, original.config.vocab_size, generator=torch.Generator().manual_seed(5))
    expected = fused_copy(original)
    (logits(expected(ids)) * g).sum().backward()
    offers: list = []
    offer = decoder.offer
    decoder.offer = lambda h, norm, y: (offers.append(1), offer(h, norm, y))[1]
    mesh = init_device_mesh("cpu", (2,))
    results = []
    for per_layer in (True, False):
        model = fused_copy(original)
        for layer in model.model.layers if per_layer else ():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        offers.clear()
        half = slice(2 * rank, 2 * rank + 2)
        (logits(model(ids[half])) * g[half]).sum().backward()
        errors = [float((p.grad.full_tensor() * 2 - q.grad).abs().max() / q.grad.abs().max())
                  for p, q in zip(model.parameters(), expected.parameters(), strict=True)]
        results.append((len(offers), max(errors)))
    return results


def test_fsdp2_gradients_equal_single_process_and_no_weight_crosses_layers(tmp_path):
    """FSDP2 with every decoder layer sharded (and the root), or the root only: a layer never computes with
    another module's FSDP-managed weight (a sharded DTensor before that module's pre-forward; its gradient
    would come after that unit's reduce-scatter), so no offer is made; each layer's attention add stays
    fused; the gradients equal single-process ones."""
    from _gloo import run_on_ranks

    for rank_results in run_on_ranks(_fsdp2_worker, (), tmp_path):
        for offers, error in rank_results:
            assert offers == 0 and error < 1e-5


# ------------------------------------------------------------------------------- the per-family table

def write_table(path: Path) -> None:
    """benchmarks/results/hf_families.md: what fuse_model does to each family and the errors it leaves."""
    lines = ["# fuse_model on tiny Hugging Face models: what is swapped and fused, and the errors", "",
             f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, CPU, torch backend; "
             f"{LAYERS} layers, width {WIDTH}, batch {BATCH} x {SEQ} tokens, random init with perturbed "
             "norm weights. Errors: max |fused - x| / max |x|; vs float64: max abs error of the fused model / of "
             "the unpatched model (same dtype) against the float64 reference (DESIGN section 6 bound: 2x the latter "
             "+ atol). Written by `python tests/test_hf_decoders.py`.", "",
             "| family | dtype | swapped | fused | adds on (B,T,H) before -> after | logits vs unpatched | "
             "worst grad vs unpatched | logits vs f64: fused / torch | worst grad vs f64: fused / torch | "
             "section 6 |", "|" + " --- |" * 10]
    runs = [(f, torch.float32) for f in FUSED + ["olmo2"]]
    runs += [(f, torch.bfloat16) for f in ("llama", "gemma", "gemma2")]
    for family, dtype in runs:
        m = measure(family, dtype)
        report, (before, after), s6 = m["report"], m["counts"], m["section6"]
        grads = [c for k, c in s6.items() if k != "out"]
        worst = max(grads, key=lambda c: c.error / max(c.torch_error, 1e-30))
        classes = sorted({r.cls for r in report.swapped})
        lines.append(
            f"| {family} | {str(dtype).removeprefix('torch.')} | {len(report.swapped)} ({', '.join(classes)}) "
            f"| {len(report.fused)} layers, "
            f"{2 * len(report.fused)} adds | {before.adds} -> {after.adds} | {m['rel_logits']:.1e} | "
            f"{m['rel_grad']:.1e} | {s6['out'].error:.1e} / {s6['out'].torch_error:.1e} | "
            f"{worst.error:.1e} / {worst.torch_error:.1e} | {'pass' if all(c.ok for c in s6.values()) else 'FAIL'} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":  # the script's folder (tests/) is on sys.path: _hf and test_integrations import
    write_table(Path(__file__).parents[1] / "benchmarks" / "results" / "hf_families.md")

