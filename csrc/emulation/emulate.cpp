// CPU emulation of the fusednorm CUDA kernels, for tests on machines without a GPU
// (tests/test_cuda_emulated.py builds this file with g++ and calls it through ctypes).
//
// The kernel templates of ../fwd_kernel.cuh and ../bwd_kernel.cuh are compiled as host C++: every CUDA
// thread of a block is a std::thread, __syncthreads() is a block-wide std::barrier, __shfl_xor_sync is
// an exchange through a per-warp buffer between two warp-wide barriers, and blocks run one after the
// other (so function-local statics are the block's shared memory). This checks the kernels' indexing,
// chunking, reductions, column partials and dropout against the torch backend; it says nothing about
// performance, and the device compiler's own choices (FMA contraction) are not those of g++.
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
void run_fwd(FwdParams& p) {
  FUSEDNORM_BOOL_SWITCH(p.is_rms, IS_RMS, [&] {
    FUSEDNORM_BOOL_SWITCH(p.has_residual, HAS_RESIDUAL, [&] {
      FUSEDNORM_BOOL_SWITCH(p.has_dropout, HAS_DROPOUT, [&] {
        using V = Variant<T, IS_RMS, HAS_RESIDUAL, HAS_DROPOUT>;
        launch(&fwd_kernel<V>, dim3(static_cast<unsigned>(p.launch.grid)),
               dim3(p.launch.threads_per_row, p.launch.rows_per_block), p);
      });
    });
  });
}

template <typename T>
void run_bwd(BwdParams& p) {
  FUSEDNORM_BOOL_SWITCH(p.is_rms, IS_RMS, [&] {
    FUSEDNORM_BOOL_SWITCH(p.has_residual, HAS_RESIDUAL, [&] {
      FUSEDNORM_BOOL_SWITCH(p.has_dropout, HAS_DROPOUT, [&] {
        FUSEDNORM_BOOL_SWITCH(p.read_h, READ_H, [&] {
          using V = Variant<T, IS_RMS, HAS_RESIDUAL, HAS_DROPOUT, READ_H>;
          launch(&bwd_kernel<V>, dim3(static_cast<unsigned>(p.launch.grid)),
                 dim3(p.launch.threads_per_row, p.launch.rows_per_block), p);
        });
      });
    });
  });
}

template <typename F>
void by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(__half{}); break;
    case 1: f(__nv_bfloat16{}); break;
    case 2: f(float{}); break;
    default: f(double{}); break;
  }
}

}  // namespace

extern "C" {

// The launch configuration is chosen by the same heuristic as on the GPU, for a device of num_sms
// SMs with blocks_per_sm resident blocks.
int fusednorm_emu_fwd(int dtype, FwdParams* p, int num_sms, int blocks_per_sm) {
  const int elem = dtype <= 1 ? 2 : dtype == 2 ? 4 : 8;
  p->launch = choose_launch(p->rows, p->cols, elem, num_sms, blocks_per_sm, false);
  by_dtype(dtype, [&](auto tag) { run_fwd<decltype(tag)>(*p); });
  return 0;
}

// Fills p->launch (the caller then allocates launch.grid * launch.rows_per_block partial rows).
int fusednorm_emu_bwd_configure(int dtype, BwdParams* p, int num_sms, int blocks_per_sm, int partial_slots) {
  const int elem = dtype <= 1 ? 2 : dtype == 2 ? 4 : 8;
  p->launch = choose_launch(p->rows, p->cols, elem, num_sms, blocks_per_sm, true, partial_slots);
  return static_cast<int>(p->launch.grid * p->launch.rows_per_block);
}

int fusednorm_emu_bwd(int dtype, BwdParams* p) {
  by_dtype(dtype, [&](auto tag) { run_bwd<decltype(tag)>(*p); });
  return 0;
}

// out[c] = fixed-order sum of partial[:, c] (compute dtype: float, or double when is_double).
int fusednorm_emu_column_sum(int is_double, const void* partial, int64_t rows, int64_t cols, void* out) {
  const dim3 grid(static_cast<unsigned>((cols + 31) / 32)), block(32, 8);
  if (is_double) {
    launch(&column_sum_kernel<double, double>, grid, block, static_cast<const double*>(partial), rows, cols,
           static_cast<double*>(out));
  } else {
    launch(&column_sum_kernel<float, float>, grid, block, static_cast<const float*>(partial), rows, cols,
           static_cast<float*>(out));
  }
  return 0;
}

size_t fusednorm_emu_sizeof_fwd_params() { return sizeof(FwdParams); }
size_t fusednorm_emu_sizeof_bwd_params() { return sizeof(BwdParams); }

}  // extern "C"
