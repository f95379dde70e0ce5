// The torch side of the cuda backend's host code (ops.cpp): dtype conversions, the TensorView of a
// torch tensor for host.h, and the argument checks of cuda_fwd / cuda_bwd against the flag word. The
// checks raise ValueError / TypeError (TORCH_CHECK_VALUE / _TYPE) naming the op and the argument.
#pragma once

#include <optional>
#include <string>

#include <ATen/ATen.h>

#include "host.h"

namespace fusednorm {

using at::ScalarType;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

// A dtype as Python users write it (torch.float32), for the error messages.
inline std::string dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return "torch.float16";
    case ScalarType::BFloat16: return "torch.bfloat16";
    case ScalarType::Float: return "torch.float32";
    case ScalarType::Double: return "torch.float64";
    case ScalarType::Long: return "torch.int64";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline bool is_supported(ScalarType t) {
  return t == ScalarType::Half || t == ScalarType::BFloat16 || t == ScalarType::Float || t == ScalarType::Double;
}

inline DType dtype_of(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return kFloat16;
    case ScalarType::BFloat16: return kBFloat16;
    case ScalarType::Float: return kFloat32;
    case ScalarType::Double: return kFloat64;
    case ScalarType::Long: return kInt64;
    default: TORCH_CHECK_TYPE(false, "fusednorm: unsupported dtype ", dtype_name(t));
  }
  return kFloat32;
}

inline ScalarType scalar_type_of(DType t) {
  constexpr ScalarType kTypes[] = {ScalarType::Half, ScalarType::BFloat16, ScalarType::Float, ScalarType::Double,
                                   ScalarType::Long};
  return kTypes[t];
}

// A tensor without elements is absent (the results that do not apply have shape (0,)).
inline TensorView view_of(const OptTensor& t) {
  if (!t || t->numel() == 0) return {};
  return {t->data_ptr(), dtype_of(t->scalar_type()), t->dim() == 2 ? t->size(0) : 1, t->dim() >= 1 ? t->size(-1) : 1,
          t->dim() == 2 ? t->stride(0) : 0};
}

inline VariantFlags check_variant(const char* op, int64_t word) {
  const char* reason = why_not_a_variant(word);
  TORCH_CHECK_VALUE(reason == nullptr, "fusednorm::", op, ": variant ", word,
                    " is not a fusednorm.variant.Variant flag word: ", reason);
  return VariantFlags::decode(word);
}

// The variant says which optional tensors a call has: a missing one would be read as garbage, an extra
// one silently ignored.
inline void check_given(const char* op, int64_t word, const char* name, bool given, bool wanted) {
  TORCH_CHECK_VALUE(given == wanted, "fusednorm::", op, ": variant ", word, wanted ? " needs " : " takes no ", name,
                    wanted ? ", got None" : ", got a tensor");
}

inline void check_dtype(const char* op, const char* name, const Tensor& t, ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, "fusednorm::", op, ": ", name, " must have dtype ",
                   dtype_name(expected), " (from x's dtype and the variant), got ", dtype_name(t.scalar_type()));
}

// A tensor allowed in x's dtype or in float32 (mixed precision: parameters, dh_in).
inline void check_x_or_f32(const char* op, const char* name, const Tensor& t, ScalarType x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x || t.scalar_type() == ScalarType::Float, "fusednorm::", op, ": ", name,
                   " must have x's dtype ", dtype_name(x), " or torch.float32, got ", dtype_name(t.scalar_type()));
}

inline void check_same_device(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "fusednorm::", op, ": ", name, " must be on ", ref.device(),
                    ", got ", t.device());
}

// (M, N) with unit stride along N (rows may be strided).
inline void check_matrix(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.sizes() == ref.sizes(), "fusednorm::", op, ": ", name, " must have shape ",
                    ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) <= (int64_t(1) << 30), "fusednorm::", op, ": ", name,
                    " has more than 2^30 columns, got ", t.size(1));
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, "fusednorm::", op, ": ", name,
                    " must have unit stride along its last dimension, got strides ", t.strides());
  check_same_device(op, name, t, ref);
}

// (N,) contiguous, in x's dtype or float32.
inline void check_param(const char* op, const char* name, const OptTensor& t, const Tensor& ref) {
  if (!t) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == ref.size(1), "fusednorm::", op, ": ", name, " must have shape (",
                    ref.size(1), ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->is_contiguous(), "fusednorm::", op, ": ", name, " must be contiguous");
  check_same_device(op, name, *t, ref);
  check_x_or_f32(op, name, *t, ref.scalar_type());
}

// The first (M, N) argument: x in the forward, dy in the backward (x's dtype either way).
inline void check_rows(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, "fusednorm::", op, ": ", name, " must be 2-D (M, N), got shape ", t.sizes());
  TORCH_CHECK_TYPE(is_supported(t.scalar_type()), "fusednorm::", op, ": ", name,
                   " must be float16, bfloat16, float32 or float64, got ", dtype_name(t.scalar_type()));
  check_matrix(op, name, t, t);
}

// residual_scale, residual, weight, bias, seed and dropout_p against the variant (both directions).
inline void check_common(const char* op, int64_t word, const VariantFlags& v, const Tensor& ref,
                         const OptTensor& weight, const OptTensor& residual_scale, const OptTensor& seed,
                         double dropout_p) {
  check_given(op, word, "weight", weight.has_value(), v.has_weight);
  check_param(op, "weight", weight, ref);
  check_given(op, word, "residual_scale (a learned scale)", residual_scale.has_value(), v.learned_scale());
  if (residual_scale) {
    const bool vector = v.scale_kind == kScaleVector;
    TORCH_CHECK_VALUE(vector ? residual_scale->dim() == 1 && residual_scale->size(0) == ref.size(1)
                             : residual_scale->dim() == 0,
                      "fusednorm::", op, ": variant ", word, " needs a ", vector ? "(N,)" : "0-d",
                      " residual_scale, got shape ", residual_scale->sizes());
    TORCH_CHECK_VALUE(residual_scale->is_contiguous(), "fusednorm::", op, ": residual_scale must be contiguous");
    check_same_device(op, "residual_scale", *residual_scale, ref);
    check_x_or_f32(op, "residual_scale", *residual_scale, ref.scalar_type());
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "fusednorm::", op, ": dropout_p must be in [0, 1), got ",
                    dropout_p);
  if (!v.has_dropout) {
    TORCH_CHECK_VALUE(dropout_p == 0.0, "fusednorm::", op, ": variant ", word, " has no dropout, got dropout_p ",
                      dropout_p);
    return;
  }
  TORCH_CHECK_VALUE(dropout_p > 0.0, "fusednorm::", op, ": variant ", word, " has dropout, got dropout_p 0");
  TORCH_CHECK_VALUE(seed.has_value(), "fusednorm::", op, ": dropout needs a seed tensor");
  TORCH_CHECK_VALUE(seed->scalar_type() == ScalarType::Long && seed->numel() == 1, "fusednorm::", op,
                    ": seed must be an int64 tensor of shape (1,), got ", dtype_name(seed->scalar_type()), " ",
                    seed->sizes());
  check_same_device(op, "seed", *seed, ref);
}

// The last check: everything above also runs (and is tested) on CPU-only machines.
inline void require_cuda(const char* op, const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "fusednorm::", op, " is the cuda backend and needs CUDA tensors, got ", name,
                    " on ", t.device(), "; use backend=\"torch\" (or \"triton\") for CPU tensors");
}

}  // namespace fusednorm
