// Host side of the "cuda" backend: allocation, launches, and the registration of
//
//   torch.ops.fusednorm.cuda_fwd(x, residual, weight, bias, residual_scale, seed, variant, eps, scale_value,
//                                dropout_p, weight_offset) -> (y, h, mean, rstd, stats)
//   torch.ops.fusednorm.cuda_bwd(dy, dh_in, x, residual, h, weight, residual_scale, mean, rstd, seed, variant,
//                                scale_value, dropout_p, weight_offset, bias_dtype)
//                                -> (dx, dresidual, dweight, dbias, dscale)
//   torch.ops.fusednorm.cuda_launch_config(rows, cols, elem_bytes, num_sms, blocks_per_sm, backward,
//                                          partial_slots) -> int[]          (the heuristic, any machine)
//   torch.ops.fusednorm.cuda_variant_facts(variant, x_dtype) -> int[]        (fusednorm.h's facts, any machine)
//   torch.ops.fusednorm.cuda_keep_threshold(dropout_p) -> int                (any machine)
//   torch.ops.fusednorm.cuda_philox_r0(seed, index) -> Tensor                (CPU: the kernels' Philox)
//
// into the `fusednorm` namespace that fusednorm/ops.py also defines its ops in (a FRAGMENT: the
// namespace has several owners). cuda_fwd / cuda_bwd take the arguments of the op layer's fwd / bwd
// minus `backend`; `variant` is the flag word of fusednorm.variant.Variant (fusednorm.h decodes it),
// and the results have the shapes of backends/contract.py. The argument checks are torch_host.h's;
// host.h turns the checked tensors into the kernels' parameters. The checks run before the device
// check, so CPU-only CI can test them; CPU tensors then get a ValueError instead of a dispatcher failure.
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

#include "host.h"
#include "philox.h"
#include "torch_host.h"

namespace fusednorm {
namespace {

int num_sms(const Tensor& t) { return at::cuda::getDeviceProperties(t.device().index())->multiProcessorCount; }

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

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cuda_fwd(const Tensor& x, const OptTensor& residual,
                                                            const OptTensor& weight, const OptTensor& bias,
                                                            const OptTensor& residual_scale, const OptTensor& seed,
                                                            int64_t variant, double eps, double scale_value,
                                                            double dropout_p, double weight_offset) {
  constexpr const char* op = "cuda_fwd";
  check_rows(op, "x", x);
  const VariantFlags v = check_variant(op, variant);
  const ScalarType xt = x.scalar_type();
  check_given(op, variant, "residual", residual.has_value(), v.has_residual);
  if (residual) {
    check_matrix(op, "residual", *residual, x);
    check_dtype(op, "residual", *residual, scalar_type_of(v.residual_dtype(dtype_of(xt))));
  }
  check_given(op, variant, "bias", bias.has_value(), v.has_bias);
  check_param(op, "bias", bias, x);
  check_common(op, variant, v, x, weight, residual_scale, seed, dropout_p);
  TORCH_CHECK_VALUE(eps >= 0.0, "fusednorm::cuda_fwd: eps must be >= 0, got ", eps);
  require_cuda(op, x, "x");

  // backends/contract.py: allocate_forward.
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto stats = x.options().dtype(scalar_type_of(compute_dtype(dtype_of(xt))));
  const auto h_options = x.options().dtype(scalar_type_of(v.h_dtype(dtype_of(xt))));
  Tensor y = at::empty({rows, cols}, x.options());
  Tensor h = v.store_h() ? at::empty({rows, cols}, h_options) : at::empty({0}, h_options);
  Tensor mean = at::empty({v.is_rms ? 0 : rows}, stats);
  Tensor rstd = at::empty({rows}, stats);
  const auto f32 = x.options().dtype(ScalarType::Float);
  Tensor row_stats = v.store_stats ? at::empty({rows, kStatsWidth}, f32) : at::empty({0}, f32);
  if (rows == 0 || cols == 0) return {y, h, mean, rstd, row_stats};

  const ForwardTensors tensors{view_of(x), view_of(residual), view_of(weight), view_of(bias),
                               view_of(residual_scale), view_of(seed), view_of(y), view_of(h),
                               view_of(mean), view_of(rstd), view_of(row_stats)};
  FwdParams p = forward_params(v, tensors, ForwardScalars{eps, scale_value, dropout_p, weight_offset});
  p.num_sms = num_sms(x);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(dispatch_x(xt, [&](auto tag) { return launch_fwd<decltype(tag)>(p, stream); }));
  return {y, h, mean, rstd, row_stats};
}

// out (a gradient, (N,) or 0-d, or a compute-dtype scratch row) = fixed-order column sums of partial,
// whose dtype is `compute` (float64 for float64 x, else float32).
void column_sum(const void* partial, DType compute, int64_t rows, int64_t cols, const TensorView& out,
                cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  if (compute == kFloat64) {
    const auto* src = static_cast<const double*>(partial);
    if (out.dtype == kFloat64) err = launch_column_sum(src, rows, cols, static_cast<double*>(out.data), stream);
    if (out.dtype == kFloat32) err = launch_column_sum(src, rows, cols, static_cast<float*>(out.data), stream);
  } else {
    const auto* src = static_cast<const float*>(partial);
    if (out.dtype == kFloat32) err = launch_column_sum(src, rows, cols, static_cast<float*>(out.data), stream);
    if (out.dtype == kFloat16) err = launch_column_sum(src, rows, cols, static_cast<__half*>(out.data), stream);
    if (out.dtype == kBFloat16) err = launch_column_sum(src, rows, cols, static_cast<__nv_bfloat16*>(out.data), stream);
  }
  C10_CUDA_CHECK(err);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cuda_bwd(
    const Tensor& dy, const OptTensor& dh_in, const OptTensor& x, const OptTensor& residual, const OptTensor& h,
    const OptTensor& weight, const OptTensor& residual_scale, const Tensor& mean, const Tensor& rstd,
    const OptTensor& seed, int64_t variant, double scale_value, double dropout_p, double weight_offset,
    std::optional<ScalarType> bias_dtype) {
  constexpr const char* op = "cuda_bwd";
  check_rows(op, "dy", dy);  // dy has x's dtype
  const VariantFlags v = check_variant(op, variant);
  const ScalarType xt = dy.scalar_type();
  const DType x_dtype = dtype_of(xt);
  // The forward stored h (read it), or the backward rebuilds it from x and the residual; a learned
  // scale reads the residual for dscale either way.
  if (v.store_h()) {
    check_given(op, variant, "h (stored by the forward)", h.has_value(), true);
    check_matrix(op, "h", *h, dy);
    check_dtype(op, "h", *h, scalar_type_of(v.h_dtype(x_dtype)));
  } else {
    check_given(op, variant, "x (h is rebuilt from it)", x.has_value(), true);
    check_matrix(op, "x", *x, dy);
    check_dtype(op, "x", *x, xt);
  }
  if ((v.has_residual && !v.store_h()) || v.learned_scale()) {
    check_given(op, variant, "residual", residual.has_value(), true);
    check_matrix(op, "residual", *residual, dy);
    check_dtype(op, "residual", *residual, scalar_type_of(v.residual_dtype(x_dtype)));
  }
  if (dh_in) {
    check_matrix(op, "dh_in", *dh_in, dy);
    check_x_or_f32(op, "dh_in", *dh_in, xt);
  }
  check_common(op, variant, v, dy, weight, residual_scale, seed, dropout_p);
  if (bias_dtype) {
    TORCH_CHECK_TYPE(*bias_dtype == xt || *bias_dtype == ScalarType::Float,
                     "fusednorm::cuda_bwd: bias_dtype must be x's dtype or torch.float32, got ",
                     dtype_name(*bias_dtype));
  }
  const ScalarType ct = scalar_type_of(compute_dtype(x_dtype));
  const int64_t rows = dy.size(0), cols = dy.size(1);
  TORCH_CHECK_VALUE(rstd.dim() == 1 && rstd.size(0) == rows && rstd.scalar_type() == ct && rstd.is_contiguous(),
                    "fusednorm::cuda_bwd: rstd must be a contiguous (", rows, ",) ", dtype_name(ct), " tensor");
  check_same_device(op, "rstd", rstd, dy);
  if (!v.is_rms) {
    TORCH_CHECK_VALUE(mean.dim() == 1 && mean.size(0) == rows && mean.scalar_type() == ct && mean.is_contiguous(),
                      "fusednorm::cuda_bwd: mean must be a contiguous (", rows, ",) ", dtype_name(ct), " tensor");
    check_same_device(op, "mean", mean, dy);
  }
  require_cuda(op, dy, "dy");

  // backends/contract.py: allocate_backward.
  const c10::cuda::CUDAGuard guard(dy.device());
  const auto like = dy.options();
  Tensor dx = at::empty({rows, cols}, like);
  Tensor dresidual = v.store_dresidual()
                         ? at::empty({rows, cols}, like.dtype(scalar_type_of(v.residual_dtype(x_dtype))))
                         : at::empty({0}, like);
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

  // BackwardArgs' tensors, then the Gradients (host.h picks the ones the variant reads and writes).
  const BackwardTensors tensors{view_of(dy), view_of(dh_in), view_of(x), view_of(residual), view_of(h),
                                view_of(weight), view_of(residual_scale), view_of(mean), view_of(rstd),
                                view_of(seed), view_of(dx), view_of(dresidual), view_of(dweight),
                                view_of(dbias), view_of(dscale)};
  BwdParams p = backward_params(v, tensors, BackwardScalars{scale_value, dropout_p, weight_offset});
  p.num_sms = num_sms(dy);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](BwdParams& q, bool configure_only) {
    C10_CUDA_CHECK(dispatch_x(xt, [&](auto tag) { return launch_bwd<decltype(tag)>(q, stream, configure_only); }));
  };
  launch(p, /*configure_only=*/true);  // the grid, hence the number of partial rows
  std::vector<Tensor> partials;        // alive until the column sums are enqueued (stream-ordered reuse after)
  run_backward(
      p, tensors,
      [&](int64_t r, int64_t c) {
        partials.push_back(at::empty({r, c}, like.dtype(ct)));
        return partials.back().data_ptr();
      },
      [&](BwdParams& q) { launch(q, /*configure_only=*/false); },
      [&](const void* partial, int64_t r, int64_t c, const TensorView& out) {
        column_sum(partial, compute_dtype(x_dtype), r, c, out, stream);
      });
  return {dx, dresidual, dweight, dbias, dscale};
}

// The launch heuristic, callable without a GPU (tests): [threads_per_row, rows_per_block,
// groups_per_thread, chunk_cols, row_fits, grid, smem_bytes] (cuda_impl.LaunchConfig).
std::vector<int64_t> cuda_launch_config(int64_t rows, int64_t cols, int64_t elem_bytes, int64_t sms,
                                        int64_t blocks_per_sm, bool backward, int64_t partial_slots) {
  TORCH_CHECK_VALUE(elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8,
                    "fusednorm::cuda_launch_config: elem_bytes must be 2, 4 or 8, got ", elem_bytes);
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 1, "fusednorm::cuda_launch_config: need rows >= 0 and cols >= 1");
  TORCH_CHECK_VALUE(partial_slots >= 0 && partial_slots <= 3, "fusednorm::cuda_launch_config: partial_slots in 0..3");
  const LaunchConfig c = choose_launch(rows, cols, static_cast<int>(elem_bytes), static_cast<int>(sms),
                                       static_cast<int>(blocks_per_sm), backward, static_cast<int>(partial_slots));
  return {c.threads_per_row, c.rows_per_block, c.groups_per_thread, c.chunk_cols, c.row_fits ? 1 : 0, c.grid,
          c.smem_bytes};
}

// fusednorm.h's decoding of the flag word, callable without a GPU: host.h's variant_facts for x of
// dtype x_dtype (tests compare it with fusednorm.variant.Variant for every word).
std::vector<int64_t> cuda_variant_facts(int64_t variant, ScalarType x_dtype) {
  TORCH_CHECK_TYPE(is_supported(x_dtype), "fusednorm::cuda_variant_facts: unsupported x_dtype ",
                   dtype_name(x_dtype));
  const auto facts = variant_facts(check_variant("cuda_variant_facts", variant), dtype_of(x_dtype));
  return {facts.begin(), facts.end()};
}

int64_t cuda_keep_threshold(double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "fusednorm::cuda_keep_threshold: dropout_p must be in ",
                    "[0, 1), got ", dropout_p);
  return keep_threshold(dropout_p);
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
  m.def("cuda_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor? residual_scale, Tensor? seed, "
        "int variant, float eps, float scale_value, float dropout_p, float weight_offset) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_bwd(Tensor dy, Tensor? dh_in, Tensor? x, Tensor? residual, Tensor? h, Tensor? weight, "
        "Tensor? residual_scale, Tensor mean, Tensor rstd, Tensor? seed, int variant, float scale_value, "
        "float dropout_p, float weight_offset, ScalarType? bias_dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // No tensor arguments: catch-all kernels, callable on any machine.
  m.def("cuda_launch_config(int rows, int cols, int elem_bytes, int num_sms, int blocks_per_sm, bool backward, "
        "int partial_slots=0) -> int[]",
        &cuda_launch_config);
  m.def("cuda_variant_facts(int variant, ScalarType x_dtype) -> int[]", &cuda_variant_facts);
  m.def("cuda_keep_threshold(float dropout_p) -> int", &cuda_keep_threshold);
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
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "fusednorm CUDA kernels (registered as torch.ops.fusednorm.cuda_*)", -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
