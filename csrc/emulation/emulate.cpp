// CPU emulation of the fusednorm CUDA kernels, for tests on machines without a GPU
// (tests/_cuda_emulation.py builds this file with g++ and calls it through ctypes).
//
// The kernel templates of ../fwd_kernel.cuh and ../bwd_kernel.cuh are compiled as host C++: every CUDA
// thread of a block is a std::thread, __syncthreads() is a block-wide std::barrier, __shfl_xor_sync is
// an exchange through a per-warp buffer between two warp-wide barriers, and blocks run one after the
// other (so function-local statics are the block's shared memory). This checks the kernels' indexing,
// chunking, reductions, column partials and dropout against the torch backend; it says nothing about
// performance, and the device compiler's own choices (FMA contraction) are not those of g++.
// The host side is the GPU's too: host.h fills the parameter structs from tensor descriptions and the
// flag word, and runs the backward's partial rows and column sums, exactly as ops.cpp does.
#include <barrier>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace emu {
struct Warp {
  std::barrier<> sync{32};
  double values[32];
};
thread_local std::barrier<>* block_barrier = nullptr;
thread_local Warp* warp = nullptr;
thread_local int lane = 0;
}  // namespace emu

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int offset) {
  emu::warp->values[emu::lane] = static_cast<double>(value);  // exact for float and double
  emu::warp->sync.arrive_and_wait();
  const T other = static_cast<T>(emu::warp->values[emu::lane ^ offset]);
  emu::warp->sync.arrive_and_wait();
  return other;
}

namespace fusednorm {
// The dynamic shared memory of the running block (bwd_kernel's `extern __shared__` array).
alignas(16) unsigned char partial_smem[1 << 20];
}  // namespace fusednorm

#include "../bwd_kernel.cuh"
#include "../fwd_kernel.cuh"
#include "../host.h"

namespace {

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, const Args&... args) {
  const int threads = static_cast<int>(block.x * block.y);
  for (unsigned b = 0; b < grid.x; ++b) {
    // Shared memory starts as NaN bytes: reading a cell before writing it shows up in the results.
    std::memset(fusednorm::partial_smem, 0xFF, sizeof(fusednorm::partial_smem));
    std::barrier<> block_sync(threads);
    std::vector<std::unique_ptr<emu::Warp>> warps;
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<emu::Warp>());
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t, b] {
        threadIdx = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x), 0};
        blockIdx = uint3{b, 0, 0};
        blockDim = block;
        gridDim = grid;
        emu::block_barrier = &block_sync;
        emu::warp = warps[t / 32].get();
        emu::lane = t % 32;
        kernel(args...);
      });
    }
    for (auto& thread : pool) thread.join();
  }
}

using namespace fusednorm;

template <typename T>
void run_fwd(const FwdParams& p) {
  FUSEDNORM_BOOL_SWITCH(p.is_rms, IS_RMS, [&] {
    FUSEDNORM_BOOL_SWITCH(p.has_residual, HAS_RESIDUAL, [&] {
      FUSEDNORM_BOOL_SWITCH(p.has_dropout, HAS_DROPOUT, [&] {
        FUSEDNORM_BOOL_SWITCH(p.store_stats, STORE_STATS, [&] {
          using V = Variant<T, IS_RMS, HAS_RESIDUAL, HAS_DROPOUT, kRuntime>;
          launch(&fwd_kernel<V, STORE_STATS>, dim3(static_cast<unsigned>(p.launch.grid)),
                 dim3(p.launch.threads_per_row, p.launch.rows_per_block), p);
        });
      });
    });
  });
}

template <typename T>
void run_bwd(const BwdParams& p) {
  FUSEDNORM_BOOL_SWITCH(p.is_rms, IS_RMS, [&] {
    FUSEDNORM_BOOL_SWITCH(p.has_residual, HAS_RESIDUAL, [&] {
      FUSEDNORM_BOOL_SWITCH(p.has_dropout, HAS_DROPOUT, [&] {
        FUSEDNORM_BOOL_SWITCH(p.store_h, STORE_H, [&] {
          using V = Variant<T, IS_RMS, HAS_RESIDUAL, HAS_DROPOUT, STORE_H>;
          launch(&bwd_kernel<V>, dim3(static_cast<unsigned>(p.launch.grid)),
                 dim3(p.launch.threads_per_row, p.launch.rows_per_block), p);
        });
      });
    });
  });
}

template <typename F>
void by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case kFloat16: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    case kFloat32: f(float{}); break;
    default: f(double{}); break;
  }
}

// out[c] = fixed-order sum of partial[:, c] (compute dtype C), stored in out's dtype as on the GPU.
template <typename C>
void column_sum(const void* partial, int64_t rows, int64_t cols, const TensorView& out) {
  const dim3 grid(static_cast<unsigned>((cols + 31) / 32)), block(32, 8);
  by_dtype(out.dtype, [&](auto tag) {
    using Out = decltype(tag);
    launch(&column_sum_kernel<C, Out>, grid, block, static_cast<const C*>(partial), rows, cols,
           static_cast<Out*>(out.data));
  });
}

}  // namespace

extern "C" {

// The emulated device: num_sms SMs with blocks_per_sm resident blocks each (the GPU's launchers ask
// the occupancy calculator instead). The functions return 0, or -1 when `variant` is not a flag word.

// tensors: x, residual, weight, bias, residual_scale, seed, y, h, mean, rstd, stats (host.h: ForwardTensors).
int fusednorm_emu_forward(int64_t variant, const TensorView* t, double eps, double scale_value, double dropout_p,
                          double weight_offset, int num_sms, int blocks_per_sm) {
  if (why_not_a_variant(variant) != nullptr) return -1;
  const ForwardTensors tensors{t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10]};
  FwdParams p = forward_params(VariantFlags::decode(variant), tensors,
                               ForwardScalars{eps, scale_value, dropout_p, weight_offset});
  p.num_sms = num_sms;
  p.launch.grid = choose_grid(p.rows, p.launch.rows_per_block, num_sms, blocks_per_sm);
  by_dtype(tensors.x.dtype, [&](auto tag) { run_fwd<decltype(tag)>(p); });
  return 0;
}

// tensors: dy, dh_in, x, residual, h, weight, residual_scale, mean, rstd, seed, then dx, dresidual,
// dweight, dbias, dscale (host.h: BackwardTensors).
int fusednorm_emu_backward(int64_t variant, const TensorView* t, double scale_value, double dropout_p,
                           double weight_offset, int num_sms, int blocks_per_sm) {
  if (why_not_a_variant(variant) != nullptr) return -1;
  const BackwardTensors tensors{t[0], t[1], t[2],  t[3],  t[4],  t[5],  t[6], t[7],
                                t[8], t[9], t[10], t[11], t[12], t[13], t[14]};
  BwdParams p = backward_params(VariantFlags::decode(variant), tensors,
                                BackwardScalars{scale_value, dropout_p, weight_offset});
  p.num_sms = num_sms;
  p.launch.grid = backward_grid(p.rows, p.launch);  // a pure function of the problem: num_sms is not read
  std::vector<std::vector<unsigned char>> buffers;
  const int compute_bytes = dtype_bytes(compute_dtype(tensors.dy.dtype));
  auto partial_buffer = [&](int64_t rows, int64_t cols) -> void* {
    // NaN bytes: a partial cell the kernel forgets to write poisons the gradient.
    buffers.emplace_back(static_cast<size_t>(rows * cols * compute_bytes), 0xFF);
    return buffers.back().data();
  };
  by_dtype(tensors.dy.dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = typename ComputeOf<T>::type;
    run_backward(p, tensors, partial_buffer, [](BwdParams& q) { run_bwd<T>(q); }, column_sum<C>);
  });
  return 0;
}

// The facts of a variant for x of dtype x_dtype (host.h: variant_facts) into out[kNumVariantFacts];
// -1 when `variant` is not a flag word.
int fusednorm_emu_variant_facts(int64_t variant, int x_dtype, int64_t* out) {
  if (why_not_a_variant(variant) != nullptr) return -1;
  const auto facts = variant_facts(VariantFlags::decode(variant), static_cast<DType>(x_dtype));
  for (int i = 0; i < kNumVariantFacts; ++i) out[i] = facts[i];
  return 0;
}

int64_t fusednorm_emu_keep_threshold(double dropout_p) { return keep_threshold(dropout_p); }

}  // extern "C"
