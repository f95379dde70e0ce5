// Host side of the "cuda" backend: argument checks, allocation, and the registration of
//
//   torch.ops.fusednorm.cuda_fwd(x, residual, weight, bias, residual_scale, scale_value, eps, dropout_p,
//                                keep_threshold, seed, is_rms, store_h, h_dtype) -> (y, h, mean, rstd)
//   torch.ops.fusednorm.cuda_bwd(dy, dh_in, x, residual, h, weight, bias_dtype, residual_scale, scale_value,
//                                mean, rstd, dropout_p, keep_threshold, seed, is_rms, x_dtype, residual_dtype,
//                                store_dresidual) -> (dx, dresidual, dweight, dbias, dscale)
//   torch.ops.fusednorm.cuda_launch_config(rows, cols, elem_bytes, num_sms, blocks_per_sm, backward) -> int[]
//   torch.ops.fusednorm.cuda_philox_r0(seed, index) -> int64 words (CPU; the kernels' Philox, for tests)
//
// into the `fusednorm` namespace that fusednorm/ops.py also defines its ops in (a FRAGMENT: the
// namespace has several owners). The arguments are those of the backend contract (fusednorm/ops.py)
// plus what Python decides once for every backend: keep_threshold (fusednorm.dropout.keep_threshold)
// and store_dresidual (not backends.common.dresidual_is_dx). The checks run before the device check,
// so CPU-only CI can test them; CPU tensors then get a ValueError instead of a dispatcher failure.
#include <Python.h>

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "fusednorm.h"
#include "philox.h"

namespace fusednorm {
namespace {

using at::ScalarType;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool is_supported(ScalarType t) {
  return t == ScalarType::Half || t == ScalarType::BFloat16 || t == ScalarType::Float || t == ScalarType::Double;
}

ScalarType compute_type(ScalarType x) { return x == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

int elem_bytes(ScalarType t) { return static_cast<int>(c10::elementSize(t)); }

// A tensor allowed in x's dtype or in float32 (mixed precision: params and residual stream).
void check_x_or_f32(const char* op, const char* name, const Tensor& t, ScalarType x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x || t.scalar_type() == ScalarType::Float, "fusednorm::", op, ": ", name,
                   " must have x's dtype ", x, " or float32, got ", t.scalar_type());
}

void check_same_device(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "fusednorm::", op, ": ", name, " must be on ", ref.device(),
                    ", got ", t.device());
}

// (M, N) with unit stride along N (rows may be strided).
void check_matrix(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.sizes() == ref.sizes(), "fusednorm::", op, ": ", name, " must have shape ",
                    ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) <= (int64_t(1) << 30), "fusednorm::", op, ": ", name,
                    " has more than 2^30 columns, got ", t.size(1));
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, "fusednorm::", op, ": ", name,
                    " must have unit stride along its last dimension, got strides ", t.strides());
  check_same_device(op, name, t, ref);
}

void check_vector(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == ref.size(1), "fusednorm::", op, ": ", name, " must have shape (",
                    ref.size(1), ",), got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "fusednorm::", op, ": ", name, " must be contiguous");
  check_same_device(op, name, t, ref);
}

void check_scale(const char* op, const OptTensor& scale, const Tensor& ref, ScalarType x) {
  if (!scale) return;
  TORCH_CHECK_VALUE(scale->dim() == 0 || (scale->dim() == 1 && scale->size(0) == ref.size(1)), "fusednorm::", op,
                    ": residual_scale must be 0-d or have shape (", ref.size(1), ",), got ", scale->sizes());
  TORCH_CHECK_VALUE(scale->is_contiguous(), "fusednorm::", op, ": residual_scale must be contiguous");
  check_same_device(op, "residual_scale", *scale, ref);
  check_x_or_f32(op, "residual_scale", *scale, x);
}

void check_dropout(const char* op, double dropout_p, int64_t keep_threshold, const OptTensor& seed, const Tensor& ref) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "fusednorm::", op, ": dropout_p must be in [0, 1), got ",
                    dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK_VALUE(keep_threshold >= 0 && keep_threshold <= (int64_t(1) << 24), "fusednorm::", op,
                    ": keep_threshold must be in [0, 2^24], got ", keep_threshold);
  TORCH_CHECK_VALUE(seed.has_value(), "fusednorm::", op, ": dropout_p > 0 needs a seed tensor");
  TORCH_CHECK_VALUE(seed->scalar_type() == ScalarType::Long && seed->numel() == 1, "fusednorm::", op,
                    ": seed must be an int64 tensor of shape (1,), got ", seed->scalar_type(), " ", seed->sizes());
  check_same_device(op, "seed", *seed, ref);
}

// The last check: everything above also runs (and is tested) on CPU-only machines.
void require_cuda(const char* op, const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "fusednorm::", op, " is the cuda backend and needs CUDA tensors, got ", name,
                    " on ", t.device(), "; use backend=\"torch\" (or \"triton\") for CPU tensors");
}

const void* ptr_or_null(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

// 128-bit groups of x (G elements) stay inside one aligned access of every operand: its base is
// aligned to G of its own elements and every row starts G elements after an aligned one.
bool group_aligned(const void* ptr, int64_t row_stride, ScalarType t, int group) {
  if (ptr == nullptr) return true;
  const auto bytes = static_cast<uintptr_t>(elem_bytes(t)) * group;
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0 && row_stride % group == 0;
}

int num_sms(const Tensor& t) { return at::cuda::getDeviceProperties(t.device().index())->multiProcessorCount; }

int scale_kind_of(bool has_residual, const OptTensor& residual_scale, double scale_value) {
  if (!has_residual) return kScaleNone;
  if (residual_scale) return residual_scale->dim() == 0 ? kScaleScalar : kScaleVector;
  return scale_value != 1.0 ? kScaleConstant : kScaleNone;
}

template <typename F>
cudaError_t dispatch_x(ScalarType x, F&& f) {
  switch (x) {
    case ScalarType::Half: return f(__half{});
    case ScalarType::BFloat16: return f(__nv_bfloat16{});
    case ScalarType::Float: return f(float{});
    case ScalarType::Double: return f(double{});
    default: TORCH_CHECK_TYPE(false, "fusednorm: unsupported dtype ", x);
  }
  return cudaErrorInvalidValue;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cuda_fwd(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                                                    const OptTensor& bias, const OptTensor& residual_scale,
                                                    double scale_value, double eps, double dropout_p,
                                                    int64_t keep_threshold, const OptTensor& seed, bool is_rms,
                                                    bool store_h, ScalarType h_dtype) {
  constexpr const char* op = "cuda_fwd";
  TORCH_CHECK_VALUE(x.dim() == 2, "fusednorm::cuda_fwd: x must be 2-D (M, N), got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_supported(x.scalar_type()), "fusednorm::cuda_fwd: x must be float16, bfloat16, float32 or ",
                   "float64, got ", x.scalar_type());
  check_matrix(op, "x", x, x);
  const ScalarType xt = x.scalar_type();
  if (residual) {
    check_matrix(op, "residual", *residual, x);
    check_x_or_f32(op, "residual", *residual, xt);
  }
  if (weight) {
    check_vector(op, "weight", *weight, x);
    check_x_or_f32(op, "weight", *weight, xt);
  }
  if (bias) {
    check_vector(op, "bias", *bias, x);
    check_x_or_f32(op, "bias", *bias, xt);
  }
  check_scale(op, residual_scale, x, xt);
  TORCH_CHECK_VALUE(!residual_scale || residual, "fusednorm::cuda_fwd: residual_scale needs a residual");
  TORCH_CHECK_TYPE(h_dtype == xt || h_dtype == ScalarType::Float, "fusednorm::cuda_fwd: h_dtype must be x's dtype ",
                   xt, " or float32, got ", h_dtype);
  TORCH_CHECK_VALUE(eps >= 0.0, "fusednorm::cuda_fwd: eps must be >= 0, got ", eps);
  check_dropout(op, dropout_p, keep_threshold, seed, x);
  require_cuda(op, x, "x");

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto stats = x.options().dtype(compute_type(xt));
  Tensor y = at::empty({rows, cols}, x.options());
  Tensor h = store_h ? at::empty({rows, cols}, x.options().dtype(h_dtype)) : at::empty({0}, x.options().dtype(h_dtype));
  Tensor mean = at::empty({is_rms ? 0 : rows}, stats);
  Tensor rstd = at::empty({rows}, stats);
  if (rows == 0 || cols == 0) return {y, h, mean, rstd};

  FwdParams p;
  p.x = x.data_ptr();
  p.residual = ptr_or_null(residual);
  p.weight = ptr_or_null(weight);
  p.bias = ptr_or_null(bias);
  p.residual_scale = ptr_or_null(residual_scale);
  p.seed = dropout_p > 0.0 ? seed->data_ptr<int64_t>() : nullptr;
  p.y = y.data_ptr();
  p.h = store_h ? h.data_ptr() : nullptr;
  p.mean = is_rms ? nullptr : mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.x_row_stride = x.stride(0);
  p.residual_row_stride = residual ? residual->stride(0) : 0;
  p.eps = eps;
  p.scale_value = scale_value;
  p.dropout_scale = dropout_p > 0.0 ? 1.0 / (1.0 - dropout_p) : 1.0;
  p.keep_threshold = static_cast<uint32_t>(dropout_p > 0.0 ? keep_threshold : 0);
  p.is_rms = is_rms;
  p.has_residual = residual.has_value();
  p.has_dropout = dropout_p > 0.0;
  p.store_h = store_h;
  p.has_weight = weight.has_value();
  p.has_bias = bias.has_value();
  p.scale_kind = scale_kind_of(p.has_residual, residual_scale, scale_value);
  p.residual_f32 = residual && residual->scalar_type() == ScalarType::Float;
  p.h_f32 = h_dtype == ScalarType::Float;
  p.weight_f32 = weight && weight->scalar_type() == ScalarType::Float;
  p.bias_f32 = bias && bias->scalar_type() == ScalarType::Float;
  p.scale_f32 = residual_scale && residual_scale->scalar_type() == ScalarType::Float;
  const int group = group_elems(elem_bytes(xt));
  p.vectorized = group_aligned(p.x, p.x_row_stride, xt, group) &&
                 (!residual || group_aligned(p.residual, p.residual_row_stride, residual->scalar_type(), group)) &&
                 (!weight || group_aligned(p.weight, 0, weight->scalar_type(), group)) &&
                 (!bias || group_aligned(p.bias, 0, bias->scalar_type(), group)) &&
                 (p.scale_kind != kScaleVector || group_aligned(p.residual_scale, 0, residual_scale->scalar_type(), group)) &&
                 group_aligned(p.y, cols, xt, group) && (!store_h || group_aligned(p.h, cols, h_dtype, group));
  p.num_sms = num_sms(x);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(dispatch_x(xt, [&](auto tag) { return launch_fwd<decltype(tag)>(p, stream); }));
  return {y, h, mean, rstd};
}

// out (a gradient of dtype param/float32, shape (N,) or ()) = fixed-order column sums of partial.
void column_sums_into(const Tensor& partial, const Tensor& out, cudaStream_t stream) {
  const int64_t rows = partial.size(0), cols = partial.size(1);
  cudaError_t err = cudaSuccess;
  if (partial.scalar_type() == ScalarType::Double) {
    const double* src = partial.data_ptr<double>();
    if (out.scalar_type() == ScalarType::Double) {
      err = launch_column_sum<double, double>(src, rows, cols, out.data_ptr<double>(), stream);
    } else {
      err = launch_column_sum<double, float>(src, rows, cols, out.data_ptr<float>(), stream);
    }
  } else {
    const float* src = partial.data_ptr<float>();
    switch (out.scalar_type()) {
      case ScalarType::Float:
        err = launch_column_sum<float, float>(src, rows, cols, out.data_ptr<float>(), stream);
        break;
      case ScalarType::Half:
        err = launch_column_sum<float, __half>(src, rows, cols, static_cast<__half*>(out.data_ptr()), stream);
        break;
      case ScalarType::BFloat16:
        err = launch_column_sum<float, __nv_bfloat16>(src, rows, cols, static_cast<__nv_bfloat16*>(out.data_ptr()),
                                                     stream);
        break;
      default: TORCH_CHECK_TYPE(false, "fusednorm::cuda_bwd: unsupported gradient dtype ", out.scalar_type());
    }
  }
  C10_CUDA_CHECK(err);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cuda_bwd(
    const Tensor& dy, const OptTensor& dh_in, const OptTensor& x, const OptTensor& residual, const OptTensor& h,
    const OptTensor& weight, std::optional<ScalarType> bias_dtype, const OptTensor& residual_scale, double scale_value,
    const Tensor& mean, const Tensor& rstd, double dropout_p, int64_t keep_threshold, const OptTensor& seed,
    bool is_rms, ScalarType x_dtype, std::optional<ScalarType> residual_dtype, bool store_dresidual) {
  constexpr const char* op = "cuda_bwd";
  TORCH_CHECK_VALUE(dy.dim() == 2, "fusednorm::cuda_bwd: dy must be 2-D (M, N), got shape ", dy.sizes());
  TORCH_CHECK_TYPE(is_supported(x_dtype), "fusednorm::cuda_bwd: x_dtype must be float16, bfloat16, float32 or ",
                   "float64, got ", x_dtype);
  TORCH_CHECK_TYPE(dy.scalar_type() == x_dtype, "fusednorm::cuda_bwd: dy must have x's dtype ", x_dtype, ", got ",
                   dy.scalar_type());
  check_matrix(op, "dy", dy, dy);
  TORCH_CHECK_VALUE(h || x, "fusednorm::cuda_bwd: needs h (stored by the forward) or x to recompute it");
  const bool has_residual = residual_dtype.has_value();
  if (x) {
    check_matrix(op, "x", *x, dy);
    TORCH_CHECK_TYPE(x->scalar_type() == x_dtype, "fusednorm::cuda_bwd: x must have dtype ", x_dtype);
  }
  if (h) {
    check_matrix(op, "h", *h, dy);
    check_x_or_f32(op, "h", *h, x_dtype);
  }
  if (dh_in) {
    check_matrix(op, "dh_in", *dh_in, dy);
    check_x_or_f32(op, "dh_in", *dh_in, x_dtype);
  }
  if (has_residual) {
    TORCH_CHECK_TYPE(*residual_dtype == x_dtype || *residual_dtype == ScalarType::Float,
                     "fusednorm::cuda_bwd: residual_dtype must be x's dtype or float32, got ", *residual_dtype);
  }
  if (residual) {
    TORCH_CHECK_VALUE(has_residual, "fusednorm::cuda_bwd: residual given without residual_dtype");
    check_matrix(op, "residual", *residual, dy);
    TORCH_CHECK_TYPE(residual->scalar_type() == *residual_dtype, "fusednorm::cuda_bwd: residual must have dtype ",
                     *residual_dtype);
  }
  TORCH_CHECK_VALUE(h || !has_residual || residual, "fusednorm::cuda_bwd: recomputing h needs the residual");
  TORCH_CHECK_VALUE(!residual_scale || residual,
                    "fusednorm::cuda_bwd: a learned residual_scale needs the residual (for dscale)");
  TORCH_CHECK_VALUE(!store_dresidual || has_residual, "fusednorm::cuda_bwd: store_dresidual needs residual_dtype");
  if (weight) {
    check_vector(op, "weight", *weight, dy);
    check_x_or_f32(op, "weight", *weight, x_dtype);
  }
  if (bias_dtype) {
    TORCH_CHECK_TYPE(*bias_dtype == x_dtype || *bias_dtype == ScalarType::Float,
                     "fusednorm::cuda_bwd: bias_dtype must be x's dtype or float32, got ", *bias_dtype);
  }
  check_scale(op, residual_scale, dy, x_dtype);
  const ScalarType ct = compute_type(x_dtype);
  const int64_t rows = dy.size(0), cols = dy.size(1);
  TORCH_CHECK_VALUE(rstd.dim() == 1 && rstd.size(0) == rows && rstd.scalar_type() == ct && rstd.is_contiguous(),
                    "fusednorm::cuda_bwd: rstd must be a contiguous (", rows, ",) ", ct, " tensor");
  if (!is_rms) {
    TORCH_CHECK_VALUE(mean.dim() == 1 && mean.size(0) == rows && mean.scalar_type() == ct && mean.is_contiguous(),
                      "fusednorm::cuda_bwd: mean must be a contiguous (", rows, ",) ", ct, " tensor");
    check_same_device(op, "mean", mean, dy);
  }
  check_same_device(op, "rstd", rstd, dy);
  check_dropout(op, dropout_p, keep_threshold, seed, dy);
  require_cuda(op, dy, "dy");

  const c10::cuda::CUDAGuard guard(dy.device());
  const auto like = dy.options();
  Tensor dx = at::empty({rows, cols}, like.dtype(x_dtype));
  Tensor dresidual = store_dresidual ? at::empty({rows, cols}, like.dtype(*residual_dtype)) : at::empty({0}, like);
  Tensor dweight = weight ? at::empty({cols}, like.dtype(weight->scalar_type())) : at::empty({0}, like);
  Tensor dbias = bias_dtype ? at::empty({cols}, like.dtype(*bias_dtype)) : at::empty({0}, like);
  Tensor dscale = residual_scale ? at::empty(residual_scale->sizes(), like.dtype(residual_scale->scalar_type()))
                                 : at::empty({0}, like);
  if (rows == 0 || cols == 0) {
    // No rows: the column sums are empty sums.
    dweight.zero_();
    dbias.zero_();
    dscale.zero_();
    return {dx, dresidual, dweight, dbias, dscale};
  }

  BwdParams p;
  p.dy = dy.data_ptr();
  p.dh_in = ptr_or_null(dh_in);
  p.x = ptr_or_null(x);
  p.residual = ptr_or_null(residual);
  p.h = ptr_or_null(h);
  p.weight = ptr_or_null(weight);
  p.residual_scale = ptr_or_null(residual_scale);
  p.mean = is_rms ? nullptr : mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.seed = dropout_p > 0.0 ? seed->data_ptr<int64_t>() : nullptr;
  p.dx = dx.data_ptr();
  p.dresidual = store_dresidual ? dresidual.data_ptr() : nullptr;
  p.rows = rows;
  p.cols = cols;
  p.dy_row_stride = dy.stride(0);
  p.dh_in_row_stride = dh_in ? dh_in->stride(0) : 0;
  p.x_row_stride = x ? x->stride(0) : 0;
  p.residual_row_stride = residual ? residual->stride(0) : 0;
  p.h_row_stride = h ? h->stride(0) : 0;
  p.scale_value = scale_value;
  p.dropout_scale = dropout_p > 0.0 ? 1.0 / (1.0 - dropout_p) : 1.0;
  p.keep_threshold = static_cast<uint32_t>(dropout_p > 0.0 ? keep_threshold : 0);
  p.is_rms = is_rms;
  p.has_residual = has_residual;
  p.has_dropout = dropout_p > 0.0;
  p.read_h = h.has_value();
  p.has_weight = weight.has_value();
  p.has_bias = bias_dtype.has_value();
  p.has_dh_in = dh_in.has_value();
  p.store_dresidual = store_dresidual;
  p.scale_kind = scale_kind_of(has_residual, residual_scale, scale_value);
  p.residual_f32 = has_residual && *residual_dtype == ScalarType::Float;
  p.h_f32 = h && h->scalar_type() == ScalarType::Float;
  p.dh_in_f32 = dh_in && dh_in->scalar_type() == ScalarType::Float;
  p.weight_f32 = weight && weight->scalar_type() == ScalarType::Float;
  p.scale_f32 = residual_scale && residual_scale->scalar_type() == ScalarType::Float;
  const int group = group_elems(elem_bytes(x_dtype));
  p.vectorized = group_aligned(p.dy, p.dy_row_stride, x_dtype, group) &&
                 (!x || group_aligned(p.x, p.x_row_stride, x_dtype, group)) &&
                 (!h || group_aligned(p.h, p.h_row_stride, h->scalar_type(), group)) &&
                 (!dh_in || group_aligned(p.dh_in, p.dh_in_row_stride, dh_in->scalar_type(), group)) &&
                 (!residual || group_aligned(p.residual, p.residual_row_stride, residual->scalar_type(), group)) &&
                 (!weight || group_aligned(p.weight, 0, weight->scalar_type(), group)) &&
                 (p.scale_kind != kScaleVector || group_aligned(p.residual_scale, 0, residual_scale->scalar_type(), group)) &&
                 group_aligned(p.dx, cols, x_dtype, group) &&
                 (!store_dresidual || group_aligned(p.dresidual, cols, *residual_dtype, group));
  p.num_sms = num_sms(dy);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](bool configure_only) {
    C10_CUDA_CHECK(dispatch_x(x_dtype, [&](auto tag) { return launch_bwd<decltype(tag)>(p, stream, configure_only); }));
  };
  launch(/*configure_only=*/true);
  const int64_t partial_rows = p.launch.grid * p.launch.rows_per_block;
  const auto partial_options = like.dtype(ct);
  Tensor dweight_partial, dbias_partial, dscale_partial;
  if (weight) dweight_partial = at::empty({partial_rows, cols}, partial_options);
  if (bias_dtype) dbias_partial = at::empty({partial_rows, cols}, partial_options);
  const bool learned_scale = p.scale_kind == kScaleScalar || p.scale_kind == kScaleVector;
  if (learned_scale) dscale_partial = at::empty({partial_rows, cols}, partial_options);
  p.dweight_partial = weight ? dweight_partial.data_ptr() : nullptr;
  p.dbias_partial = bias_dtype ? dbias_partial.data_ptr() : nullptr;
  p.dscale_partial = learned_scale ? dscale_partial.data_ptr() : nullptr;
  launch(/*configure_only=*/false);

  if (weight) column_sums_into(dweight_partial, dweight, stream);
  if (bias_dtype) column_sums_into(dbias_partial, dbias, stream);
  if (learned_scale) {
    if (p.scale_kind == kScaleVector) {
      column_sums_into(dscale_partial, dscale, stream);
    } else {
      // 0-d scale: the column sums, then their sum, both in fixed order.
      const Tensor per_column = at::empty({cols}, partial_options);
      column_sums_into(dscale_partial, per_column, stream);
      column_sums_into(per_column.view({cols, 1}), dscale.view({1}), stream);
    }
  }
  return {dx, dresidual, dweight, dbias, dscale};
}

// The launch heuristic, callable without a GPU (tests): [threads_per_row, rows_per_block,
// groups_per_thread, chunk_cols, row_fits, grid, smem_bytes].
std::vector<int64_t> cuda_launch_config(int64_t rows, int64_t cols, int64_t elem_bytes_, int64_t sms,
                                        int64_t blocks_per_sm, bool backward, int64_t partial_slots) {
  TORCH_CHECK_VALUE(elem_bytes_ == 2 || elem_bytes_ == 4 || elem_bytes_ == 8,
                    "fusednorm::cuda_launch_config: elem_bytes must be 2, 4 or 8, got ", elem_bytes_);
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 1, "fusednorm::cuda_launch_config: need rows >= 0 and cols >= 1");
  TORCH_CHECK_VALUE(partial_slots >= 0 && partial_slots <= 3, "fusednorm::cuda_launch_config: partial_slots in 0..3");
  const LaunchConfig c = choose_launch(rows, cols, static_cast<int>(elem_bytes_), static_cast<int>(sms),
                                       static_cast<int>(blocks_per_sm), backward, static_cast<int>(partial_slots));
  return {c.threads_per_row, c.rows_per_block, c.groups_per_thread, c.chunk_cols, c.row_fits ? 1 : 0, c.grid,
          c.smem_bytes};
}

// The kernels' Philox word computed on the host by the very same philox.h code, so that CPU-only CI
// compares it bit for bit with fusednorm/dropout.py. seed: int64 (1,); index: int64 (any shape, >= 0).
// Returns int64 values in [0, 2^32), index's shape. CPU tensors.
Tensor cuda_philox_r0(const Tensor& seed, const Tensor& index) {
  TORCH_CHECK_VALUE(seed.scalar_type() == ScalarType::Long && seed.numel() == 1,
                    "fusednorm::cuda_philox_r0: seed must be an int64 tensor of shape (1,)");
  TORCH_CHECK_VALUE(index.scalar_type() == ScalarType::Long, "fusednorm::cuda_philox_r0: index must be int64");
  const auto seed_bits = static_cast<uint64_t>(seed.item<int64_t>());
  const Tensor flat = index.contiguous().view(-1);
  Tensor out = at::empty_like(flat);
  const int64_t* in = flat.data_ptr<int64_t>();
  int64_t* words = out.data_ptr<int64_t>();
  for (int64_t k = 0; k < flat.numel(); ++k) words[k] = philox_r0(seed_bits, static_cast<uint64_t>(in[k]));
  return out.view(index.sizes());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusednorm, m) {
  m.def("cuda_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor? residual_scale, "
        "float scale_value, float eps, float dropout_p, int keep_threshold, Tensor? seed, bool is_rms, "
        "bool store_h, ScalarType h_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_bwd(Tensor dy, Tensor? dh_in, Tensor? x, Tensor? residual, Tensor? h, Tensor? weight, "
        "ScalarType? bias_dtype, Tensor? residual_scale, float scale_value, Tensor mean, Tensor rstd, "
        "float dropout_p, int keep_threshold, Tensor? seed, bool is_rms, ScalarType x_dtype, "
        "ScalarType? residual_dtype, bool store_dresidual) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // No tensor arguments: a catch-all kernel, callable on any machine.
  m.def("cuda_launch_config(int rows, int cols, int elem_bytes, int num_sms, int blocks_per_sm, bool backward, "
        "int partial_slots=0) -> int[]",
        &cuda_launch_config);
  m.def("cuda_philox_r0(Tensor seed, Tensor index) -> Tensor");
}

// The CUDA kernels. CPU (and any other device) reaches the same functions, whose checks end in a
// ValueError naming the device, rather than the dispatcher's "could not run ... with CPU".
TORCH_LIBRARY_IMPL(fusednorm, CUDA, m) {
  m.impl("cuda_fwd", &cuda_fwd);
  m.impl("cuda_bwd", &cuda_bwd);
}

TORCH_LIBRARY_IMPL(fusednorm, CPU, m) {
  m.impl("cuda_fwd", &cuda_fwd);
  m.impl("cuda_bwd", &cuda_bwd);
  m.impl("cuda_philox_r0", &cuda_philox_r0);
}

}  // namespace fusednorm

// `import fusednorm._C` loads the library above (its static initializers register the ops); the
// module itself is empty. Limited API: one .abi3.so for every CPython >= 3.10.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fusednorm CUDA kernels (registered as torch.ops.fusednorm.cuda_*)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
