"""fusednorm.variant: the flag word round-trips, a call's arguments map to the right variant, and the
derived facts are DESIGN's (sections 2 and 5). The C++ mirror is checked in tests/test_cuda_host.py."""

import dataclasses

import pytest
import torch

from fusednorm.variant import FLAG_BITS, ScaleKind, Variant, all_variants

VARIANTS = list(all_variants())


def test_flag_word_round_trips_for_every_variant():
    words = {v.flags for v in VARIANTS}
    assert len(words) == len(VARIANTS) == len(set(VARIANTS))  # distinct variants, distinct words
    for v in VARIANTS:
        assert Variant.from_flags(v.flags) == v


def test_flag_bits_do_not_overlap():
    used = [bit for name, bit in FLAG_BITS.items() if name != "scale_kind"] + [FLAG_BITS["scale_kind"],
                                                                                FLAG_BITS["scale_kind"] + 1]
    assert len(used) == len(set(used))


@pytest.mark.parametrize("word", [-1, 1 << 20, 1 << 11])  # bit 10 is store_stats
def test_unknown_flag_words_are_rejected(word):
    with pytest.raises(ValueError, match="flag word"):
        Variant.from_flags(word)


@pytest.mark.parametrize("fields", [dict(scale_kind=ScaleKind.VECTOR), dict(residual_f32=True),
                                    dict(is_rms=True, has_bias=True),
                                    dict(has_residual=True, scale_kind=ScaleKind.VECTOR, h_f32=True),
                                    dict(has_residual=True, residual_f32=True)])
def test_impossible_variants_are_rejected(fields):
    with pytest.raises(ValueError):
        Variant(**fields)


def _call(**overrides):
    args = dict(is_rms=False, x_dtype=torch.bfloat16, residual_dtype=torch.bfloat16, scale_kind=ScaleKind.NONE,
                dropout_p=0.0, prenorm=False, residual_in_fp32=False, has_weight=True, has_bias=True)
    args.update(overrides)
    return Variant.from_call(**args)


def test_from_call_dtype_flags():
    assert _call().h_dtype(torch.bfloat16) == torch.bfloat16 and not _call().residual_f32
    assert _call(residual_in_fp32=True).h_dtype(torch.bfloat16) == torch.float32
    # A float32 residual stream keeps h in float32; with float32 x nothing is "float32 beside x".
    assert _call(residual_dtype=torch.float32).h_f32 and _call(residual_dtype=torch.float32).residual_f32
    assert not _call(x_dtype=torch.float32, residual_dtype=torch.float32, residual_in_fp32=True).h_f32
    # float64 x stays float64 with residual_in_fp32.
    assert _call(x_dtype=torch.float64, residual_dtype=torch.float64, residual_in_fp32=True).h_dtype(
        torch.float64) == torch.float64
    # h is not stored for a learned scale in the Post-LN layout: its dtype flag is off.
    assert not _call(scale_kind=ScaleKind.VECTOR, residual_in_fp32=True).h_f32
    assert not _call(is_rms=True).has_bias


# DESIGN section 5, 16-bit tensors: (variant, forward bytes, backward bytes).
DESIGN_TABLE = [
    (Variant(), 4, 6),
    (Variant(is_rms=True), 4, 6),
    (Variant(has_residual=True), 8, 6),  # Post-LN, no scale: h saved (the "+ h" of 6-8 B)
    (Variant(has_residual=True, scale_kind=ScaleKind.VECTOR), 6, 10),
    (Variant(has_residual=True, scale_kind=ScaleKind.SCALAR, is_rms=True), 6, 10),
    (Variant(has_residual=True, prenorm=True), 8, 8),
    # A learned scale in the Pre-LN layout adds one read of the residual, and dresidual is written.
    (Variant(has_residual=True, prenorm=True, scale_kind=ScaleKind.VECTOR), 8, 12),
    # Dropout adds nothing but a distinct dresidual (no mask is stored or read).
    (Variant(has_residual=True, has_dropout=True), 8, 8),
]


@pytest.mark.parametrize("variant,fwd,bwd", DESIGN_TABLE, ids=[v.name for v, _, _ in DESIGN_TABLE])
def test_bytes_per_element_are_designs(variant, fwd, bwd):
    assert variant.bytes_per_element("fwd") == fwd
    assert variant.bytes_per_element("bwd") == bwd
    assert variant.bytes_per_element("fwdbwd") == fwd + bwd
    assert variant.bytes_per_element("fwd", torch.float32) == 2 * fwd


def test_saved_tensors_are_what_the_backward_reads():
    for v in VARIANTS:
        reads, _ = v.row_tensors("bwd")
        saved = set(v.saved)
        assert {r for r in reads if r not in ("dy", "dh_in")} <= saved, v.name
        assert "mask" not in saved and ("seed" in saved) == v.has_dropout
        assert ("mean" in saved) == (not v.is_rms) and "rstd" in saved
        assert ("h" in saved) == v.store_h and ("x" in saved) == (not v.store_h)


def test_store_h_and_dresidual_rules():
    post = Variant(has_residual=True)
    assert post.store_h and post.dresidual_is_dx and not post.store_dresidual
    admin = dataclasses.replace(post, scale_kind=ScaleKind.VECTOR)
    assert not admin.store_h and admin.store_dresidual
    assert dataclasses.replace(post, scale_kind=ScaleKind.CONSTANT).store_dresidual
    assert dataclasses.replace(post, residual_f32=True, h_f32=True).store_dresidual
    assert not Variant().store_h and not Variant().store_dresidual


def test_names_are_unique_and_readable():
    names = [v.name for v in VARIANTS]
    assert len(set(names)) == len(names)
    assert Variant(has_residual=True, scale_kind=ScaleKind.VECTOR, prenorm=True).name == \
        "add_layer_norm[vector,prenorm,no_bias]"
