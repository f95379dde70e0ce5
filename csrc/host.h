// Host code shared by the op layer (ops.cpp: torch tensors, real kernels) and the CPU emulation
// (emulation/emulate.cpp: tensors described from Python through ctypes), so that the emulated tests
// run the very code the GPU runs. From a light description of each tensor, the flag word and the
// scalars it fills FwdParams / BwdParams (pointers, row strides, flags, dtype flags, the 128-bit
// alignment test, dropout scale and threshold, the launch block) and runs the backward's host steps
// (partial-row buffers, kernel, fixed-order column sums). No torch and no CUDA runtime calls here;
// the argument checks are ops.cpp's (the emulation's callers pass what the contract promises).
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>

#include "fusednorm.h"

namespace fusednorm {

// One tensor as the host code needs it; absent (None, or a result that does not apply) when data is
// nullptr. (M, N) tensors: rows = M, cols = N, row_stride in elements; (N,) and 0-d tensors: rows = 1,
// row_stride = 0. Plain data: tests/_cuda_emulation.py passes arrays of it through ctypes.
struct TensorView {
  void* data = nullptr;
  DType dtype = kFloat32;
  int64_t rows = 0, cols = 0, row_stride = 0;

  bool present() const { return data != nullptr; }
};

// The tensors of one forward: ForwardArgs' inputs, then ForwardResult's outputs (backends/contract.py).
struct ForwardTensors {
  TensorView x, residual, weight, bias, residual_scale, seed;
  TensorView y, h, mean, rstd, stats;
};
struct ForwardScalars {
  double eps, scale_value, dropout_p, weight_offset;
};

// The tensors of one backward: BackwardArgs' inputs, then the Gradients. dbias is present when it is
// wanted (bias_dtype given); dresidual when the variant stores it.
struct BackwardTensors {
  TensorView dy, dh_in, x, residual, h, weight, residual_scale, mean, rstd, seed;
  TensorView dx, dresidual, dweight, dbias, dscale;
};
struct BackwardScalars {
  double scale_value, dropout_p, weight_offset;
};

// The facts of a variant for x of dtype x, in the order of torch.ops.fusednorm.cuda_variant_facts:
// the nine flags, learned_scale, store_h, dresidual_is_dx, store_dresidual, the residual's dtype (-1
// without a residual), h's dtype and store_stats. tests/test_cuda_host.py compares them with fusednorm.variant.
constexpr int kNumVariantFacts = 16;
inline std::array<int64_t, kNumVariantFacts> variant_facts(const VariantFlags& v, DType x) {
  return {v.is_rms, v.has_residual, v.scale_kind, v.has_dropout, v.prenorm, v.residual_f32, v.h_f32,
          v.has_weight, v.has_bias, v.learned_scale(), v.store_h(), v.dresidual_is_dx(), v.store_dresidual(),
          v.has_residual ? v.residual_dtype(x) : -1, v.h_dtype(x), v.store_stats};
}

inline TensorView if_used(bool used, const TensorView& t) { return used ? t : TensorView{}; }

// 128-bit groups of x (`group` elements) stay inside one aligned access of every operand: its base is
// aligned to `group` of its own elements and every row starts a multiple of `group` elements later.
inline bool group_aligned(std::initializer_list<TensorView> tensors, int group) {
  for (const TensorView& t : tensors) {
    if (!t.present()) continue;
    const auto bytes = static_cast<uintptr_t>(dtype_bytes(t.dtype)) * group;
    if (reinterpret_cast<uintptr_t>(t.data) % bytes != 0 || t.row_stride % group != 0) return false;
  }
  return true;
}

inline bool is_f32(const TensorView& t) { return t.present() && t.dtype == kFloat32; }

// The parameters of the forward kernel, launch block included (the grid is the launcher's).
inline FwdParams forward_params(const VariantFlags& v, const ForwardTensors& t, const ForwardScalars& s) {
  const TensorView residual = if_used(v.has_residual, t.residual), weight = if_used(v.has_weight, t.weight);
  const TensorView bias = if_used(v.has_bias, t.bias), scale = if_used(v.learned_scale(), t.residual_scale);
  const TensorView h = if_used(v.store_h(), t.h);
  FwdParams p;
  p.x = t.x.data;
  p.residual = residual.data;
  p.weight = weight.data;
  p.bias = bias.data;
  p.residual_scale = scale.data;
  p.seed = v.has_dropout ? static_cast<const int64_t*>(t.seed.data) : nullptr;
  p.y = t.y.data;
  p.h = h.data;
  p.mean = v.is_rms ? nullptr : t.mean.data;
  p.rstd = t.rstd.data;
  p.stats = v.store_stats ? t.stats.data : nullptr;
  p.rows = t.x.rows;
  p.cols = t.x.cols;
  p.x_row_stride = t.x.row_stride;
  p.residual_row_stride = residual.row_stride;
  p.eps = s.eps;
  p.scale_value = s.scale_value;
  p.weight_offset = s.weight_offset;
  p.dropout_scale = v.has_dropout ? 1.0 / (1.0 - s.dropout_p) : 1.0;
  p.keep_threshold = v.has_dropout ? keep_threshold(s.dropout_p) : 0;
  p.is_rms = v.is_rms;
  p.has_residual = v.has_residual;
  p.has_dropout = v.has_dropout;
  p.store_h = v.store_h();
  p.has_weight = v.has_weight;
  p.has_bias = v.has_bias;
  p.store_stats = v.store_stats;
  p.scale_kind = v.scale_kind;
  p.residual_f32 = v.residual_f32;
  p.h_f32 = v.h_f32;
  p.weight_f32 = is_f32(weight);
  p.bias_f32 = is_f32(bias);
  p.scale_f32 = is_f32(scale);
  const int x_bytes = dtype_bytes(t.x.dtype);
  // A 0-d scale is read once, element by element: its alignment does not matter.
  p.vectorized = group_aligned({t.x, residual, weight, bias, if_used(v.scale_kind == kScaleVector, scale), t.y, h},
                               group_elems(x_bytes));
  p.launch = choose_block(p.cols, x_bytes, /*backward=*/false);
  return p;
}

// The parameters of the backward kernel, launch block and shared memory included (the grid is the
// launcher's; the partial-row buffers are run_backward's).
inline BwdParams backward_params(const VariantFlags& v, const BackwardTensors& t, const BackwardScalars& s) {
  const bool store_h = v.store_h();
  const TensorView x = if_used(!store_h, t.x), h = if_used(store_h, t.h);
  // The residual rebuilds h (when it is not stored) and is read for dscale.
  const TensorView residual = if_used((v.has_residual && !store_h) || v.learned_scale(), t.residual);
  const TensorView weight = if_used(v.has_weight, t.weight), scale = if_used(v.learned_scale(), t.residual_scale);
  const TensorView dresidual = if_used(v.store_dresidual(), t.dresidual);
  BwdParams p;
  p.dy = t.dy.data;
  p.dh_in = t.dh_in.data;
  p.x = x.data;
  p.residual = residual.data;
  p.h = h.data;
  p.weight = weight.data;
  p.residual_scale = scale.data;
  p.mean = v.is_rms ? nullptr : t.mean.data;
  p.rstd = t.rstd.data;
  p.seed = v.has_dropout ? static_cast<const int64_t*>(t.seed.data) : nullptr;
  p.dx = t.dx.data;
  p.dresidual = dresidual.data;
  p.rows = t.dy.rows;
  p.cols = t.dy.cols;
  p.dy_row_stride = t.dy.row_stride;
  p.dh_in_row_stride = t.dh_in.row_stride;
  p.x_row_stride = x.row_stride;
  p.residual_row_stride = residual.row_stride;
  p.h_row_stride = h.row_stride;
  p.scale_value = s.scale_value;
  p.weight_offset = s.weight_offset;
  p.dropout_scale = v.has_dropout ? 1.0 / (1.0 - s.dropout_p) : 1.0;
  p.keep_threshold = v.has_dropout ? keep_threshold(s.dropout_p) : 0;
  p.is_rms = v.is_rms;
  p.has_residual = v.has_residual;
  p.has_dropout = v.has_dropout;
  p.store_h = store_h;
  p.has_weight = v.has_weight;
  p.has_bias = t.dbias.present();
  p.has_dh_in = t.dh_in.present();
  p.store_dresidual = v.store_dresidual();
  p.scale_kind = v.scale_kind;
  p.residual_f32 = v.residual_f32;
  p.h_f32 = v.h_f32;
  p.dh_in_f32 = is_f32(t.dh_in);
  p.weight_f32 = is_f32(weight);
  p.scale_f32 = is_f32(scale);
  const int x_bytes = dtype_bytes(t.dy.dtype);
  p.vectorized = group_aligned({t.dy, t.dh_in, x, h, residual, weight, if_used(v.scale_kind == kScaleVector, scale),
                                t.dx, dresidual},
                               group_elems(x_bytes));
  const int partial_slots = int(p.has_weight) + int(p.has_bias) + int(v.learned_scale());
  p.launch = choose_block(p.cols, x_bytes, /*backward=*/true, partial_slots);
  return p;
}

// The backward's host steps once p.launch.grid is set: a (partial_rows, N) compute-dtype buffer per
// column sum (dweight, dbias, dscale), the kernel, then the fixed-order column sums into the gradients
// (a 0-d dscale: the column sums, then their sum). The caller provides
//   partial_buffer(rows, cols) -> void*: a compute-dtype buffer that lives until the sums have run,
//   launch(BwdParams&): runs the kernel,
//   column_sum(const void* partial, int64_t rows, int64_t cols, const TensorView& out): out[c] = sum_r.
template <typename Buffer, typename Launch, typename ColumnSum>
void run_backward(BwdParams& p, const BackwardTensors& t, Buffer&& partial_buffer, Launch&& launch,
                  ColumnSum&& column_sum) {
  const int64_t rows = p.launch.grid * p.launch.rows_per_block;
  const bool learned_scale = p.scale_kind == kScaleScalar || p.scale_kind == kScaleVector;
  p.dweight_partial = p.has_weight ? partial_buffer(rows, p.cols) : nullptr;
  p.dbias_partial = p.has_bias ? partial_buffer(rows, p.cols) : nullptr;
  p.dscale_partial = learned_scale ? partial_buffer(rows, p.cols) : nullptr;
  launch(p);
  if (p.has_weight) column_sum(p.dweight_partial, rows, p.cols, t.dweight);
  if (p.has_bias) column_sum(p.dbias_partial, rows, p.cols, t.dbias);
  if (!learned_scale) return;
  if (p.scale_kind == kScaleVector) {
    column_sum(p.dscale_partial, rows, p.cols, t.dscale);
    return;
  }
  const TensorView per_column{partial_buffer(1, p.cols), compute_dtype(t.dy.dtype), 1, p.cols, 0};
  column_sum(p.dscale_partial, rows, p.cols, per_column);
  column_sum(per_column.data, p.cols, 1, t.dscale);
}

}  // namespace fusednorm
