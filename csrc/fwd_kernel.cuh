// The forward kernel family (DESIGN section 1):
//
//   x' = dropout(x);  h = residual * s + x';  if store_h: h = round(h)   (statistics of the stored h)
//   LayerNorm: mean = sum(h) / N;  rstd = 1 / sqrt(sum((h - mean)^2) / N + eps)   (two passes over
//              registers: never E[h^2] - E[h]^2, which cancels when |mean| >> std)
//   RMSNorm:   rstd = 1 / sqrt(sum(h^2) / N + eps)
//   y = (h - mean) * rstd * (weight + weight_offset) + bias
//
// One row group (blockDim.x threads, threadIdx.y selects the row) per row; each thread holds
// kFwdGroups 128-bit groups of the row. Rows wider than the registers (LaunchConfig::row_fits false)
// are processed chunk by chunk and h is recomputed from x and residual in each pass (L2 hits).
// StoreStats (kOn/kOff, a template parameter): also write the row statistics of row_stats.cuh.
#pragma once

#include "device_utils.cuh"
#include "row_stats.cuh"

namespace fusednorm {

template <typename V, int StoreStats>
__global__ void __launch_bounds__(kMaxThreads, 1) fwd_kernel(const FwdParams p) {
  using T = typename V::T;
  using C = typename V::C;
  constexpr int G = V::kGroup;
  constexpr int kGroups = V::kFwdGroups;
  FUSEDNORM_SHARED C scratch[32];

  const int cols = static_cast<int>(p.cols);  // < 2^31 (checked on the host)
  const int tpr = blockDim.x;
  const int chunk = tpr * kGroups * G;
  const bool fits = cols <= chunk;
  const bool store_h = V::store_h(p);
  const bool h_f32 = V::h_f32(p);
  const C scale_scalar = scalar_scale<V>(p);
  const C dropout_scale = static_cast<C>(p.dropout_scale);
  const uint64_t seed = V::kHasDropout ? static_cast<uint64_t>(*p.seed) : 0;
  const C eps = static_cast<C>(p.eps);
  const C weight_offset = static_cast<C>(p.weight_offset);
  const Operand<T> weight{p.weight, 0, V::weight_f32(p)};
  const Operand<T> bias{p.bias, 0, V::bias_f32(p)};
  const OutOperand<T> h_out{p.h, cols, h_f32};

  C h[kGroups][G];
  // Column of group g of this thread in the chunk starting at c0: consecutive threads take
  // consecutive groups, so every 128-bit access of a warp is coalesced.
  auto column = [&](int c0, int g) { return c0 + (g * tpr + static_cast<int>(threadIdx.x)) * G; };
  auto load_chunk = [&](int64_t row, bool active, int c0) {
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const int col = column(c0, g);
      if (active && col < cols) {
        pre_norm_sum<V>(p, row, col, seed, scale_scalar, dropout_scale, h[g]);
        if (store_h) {
#pragma unroll
          for (int i = 0; i < G; ++i) h[g][i] = round_through<T>(h[g][i], h_f32);
        }
      } else {
#pragma unroll
        for (int i = 0; i < G; ++i) h[g][i] = C(0);
      }
    }
  };
  // The first pass's loads: with StoreStats they also fold f, residual * s and h into row_stats.
  [[maybe_unused]] RowStats<C> row_stats;
  auto load_first = [&](int64_t row, bool active, int c0) {
    if constexpr (StoreStats == kOn) {
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int col = column(c0, g);
        if (active && col < cols) {
          C f[G], rs[G];
          pre_norm_parts<V>(p, row, col, seed, scale_scalar, dropout_scale, h[g], f, rs);
          if (store_h) {
#pragma unroll
            for (int i = 0; i < G; ++i) h[g][i] = round_through<T>(h[g][i], h_f32);
          }
          row_stats.template add<V::kHasResidual>(f, rs, h[g], cols - col < G ? cols - col : G);
        } else {
#pragma unroll
          for (int i = 0; i < G; ++i) h[g][i] = C(0);
        }
      }
    } else {
      load_chunk(row, active, c0);
    }
  };

  // Every thread runs the same number of iterations (row_allreduce synchronizes the block).
  const int64_t row_step = int64_t(gridDim.x) * blockDim.y;
  for (int64_t first_row = int64_t(blockIdx.x) * blockDim.y; first_row < p.rows; first_row += row_step) {
    const int64_t row = first_row + threadIdx.y;
    const bool active = row < p.rows;

    if constexpr (StoreStats == kOn) row_stats = RowStats<C>{};
    if (fits) load_first(row, active, 0);
    // Pass 1: sum(h) (LayerNorm) or sum(h^2) (RMSNorm). Out-of-row entries are 0.
    C acc[1] = {C(0)};
    for (int c0 = 0; c0 < cols; c0 += chunk) {
      if (!fits) load_first(row, active, c0);
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
#pragma unroll
        for (int i = 0; i < G; ++i) acc[0] += V::kIsRms ? h[g][i] * h[g][i] : h[g][i];
      }
    }
    row_allreduce(acc, scratch);
    if constexpr (StoreStats == kOn) store_row_stats(row_stats, row, active, p.cols, static_cast<float*>(p.stats));
    C mean = C(0), rstd;
    if constexpr (V::kIsRms) {
      rstd = C(1) / sqrt(acc[0] / static_cast<C>(cols) + eps);
    } else {
      mean = acc[0] / static_cast<C>(cols);
      // Pass 2: sum((h - mean)^2) over the row's own columns.
      acc[0] = C(0);
      for (int c0 = 0; c0 < cols; c0 += chunk) {
        if (!fits) load_chunk(row, active, c0);
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
          const int col = column(c0, g);
#pragma unroll
          for (int i = 0; i < G; ++i) {
            const C d = h[g][i] - mean;
            acc[0] += col + i < cols ? d * d : C(0);
          }
        }
      }
      row_allreduce(acc, scratch);
      rstd = C(1) / sqrt(acc[0] / static_cast<C>(cols) + eps);
    }
    if (active && threadIdx.x == 0) {
      if constexpr (!V::kIsRms) static_cast<C*>(p.mean)[row] = mean;
      static_cast<C*>(p.rstd)[row] = rstd;
    }

    // Pass 3: y (and the stored h, already rounded).
    for (int c0 = 0; c0 < cols; c0 += chunk) {
      if (!fits) load_chunk(row, active, c0);
      if (!active) continue;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int col = column(c0, g);
        if (col >= cols) continue;
        C y[G];
#pragma unroll
        for (int i = 0; i < G; ++i) y[i] = (h[g][i] - mean) * rstd;
        if (V::has_weight(p)) {
          C w[G];
          weight.template load<G>(0, col, cols, p.vectorized, w);
#pragma unroll
          for (int i = 0; i < G; ++i) y[i] *= w[i] + weight_offset;
        }
        if (V::has_bias(p)) {
          C b[G];
          bias.template load<G>(0, col, cols, p.vectorized, b);
#pragma unroll
          for (int i = 0; i < G; ++i) y[i] += b[i];
        }
        store_group<T, G>(static_cast<T*>(p.y) + row * cols, col, cols, p.vectorized, y);
        if (store_h) h_out.template store<G>(row, col, cols, p.vectorized, h[g]);
      }
    }
  }
}

#ifdef __CUDACC__  // the launchers (the CPU emulation launches the kernels itself)
// Runtime -> template dispatch of the static flags (IS_RMS, HAS_RESIDUAL, HAS_DROPOUT, and the
// telemetry's STORE_STATS, a kernel of its own so that the kernels without it are unchanged): 4 x dtype
// * 16 forward kernels. STORE_H (kRuntime here), SCALE_KIND, HAS_WEIGHT, HAS_BIAS and the
// residual/h/parameter dtypes are read from the params: each costs one uniform branch per 128-bit
// group in a memory-bound loop, while making them static would multiply the instantiations by
// 2 * 4 * 2 * 2 * 8 (compile time).
template <typename V, int StoreStats>
cudaError_t run_fwd(FwdParams& p, cudaStream_t stream) {
  const auto kernel = fwd_kernel<V, StoreStats>;
  LaunchConfig cfg = p.launch;  // the block shape (host.h); the grid depends on the occupancy
  int blocks_per_sm = 1;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks_per_sm, kernel, cfg.threads_per_row * cfg.rows_per_block, 0);
  if (err != cudaSuccess) return err;
  cfg.grid = choose_grid(p.rows, cfg.rows_per_block, p.num_sms, blocks_per_sm);
  p.launch = cfg;
  kernel<<<dim3(static_cast<unsigned>(cfg.grid)), dim3(cfg.threads_per_row, cfg.rows_per_block), 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd(FwdParams& p, cudaStream_t stream) {
  return FUSEDNORM_BOOL_SWITCH(p.is_rms, IS_RMS, [&] {
    return FUSEDNORM_BOOL_SWITCH(p.has_residual, HAS_RESIDUAL, [&] {
      return FUSEDNORM_BOOL_SWITCH(p.has_dropout, HAS_DROPOUT, [&] {
        return FUSEDNORM_BOOL_SWITCH(p.store_stats, STORE_STATS, [&] {
          return run_fwd<Variant<T, IS_RMS, HAS_RESIDUAL, HAS_DROPOUT, kRuntime>, STORE_STATS>(p, stream);
        });
      });
    });
  });
}

#endif  // __CUDACC__

}  // namespace fusednorm
