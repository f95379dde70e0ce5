// The backward kernel family (DESIGN section 2), with g = dy * (weight + weight_offset) and the
// forward's mean/rstd:
//
//   xhat = (h - mean) * rstd        (RMSNorm: h * rstd)
//   LayerNorm: dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh_in
//   RMSNorm:   dh = rstd * (g - xhat * mean(g * xhat)) + dh_in
//   dx = dh * mask / (1 - p);   dresidual = dh * s
//   dweight = sum_rows dy * xhat;   dbias = sum_rows dy;   dscale = sum_rows dh * residual
//
// h is read (STORE_H: the forward stored it, and took its statistics of the stored rounded values)
// or recomputed from x and residual exactly as the forward did (same pre_norm_sum, same mask).
// Column sums: each (block, row group) accumulates its rows in dynamic shared memory (one slot per
// column sum, each thread its own cells: see partial_smem below) and writes ONE partial row (compute
// dtype) of a (partial_rows, N) buffer; column_sum_kernel then adds the partial rows in a fixed order.
// No atomics, and the grid is a pure function of the problem (backward_grid, fusednorm.h), so the same
// inputs give bit-identical gradients every run and on every GPU.
#pragma once

#include "device_utils.cuh"

namespace fusednorm {

template <typename V>
__global__ void __launch_bounds__(kMaxThreads, 1) bwd_kernel(const BwdParams p) {
  using T = typename V::T;
  using C = typename V::C;
  constexpr int G = V::kGroup;
  constexpr int kGroups = V::kBwdGroups;
  static_assert(V::kStaticStoreH, "the backward reads h or rebuilds it: STORE_H is static here");
  FUSEDNORM_SHARED C scratch[32 * 2];

  const int cols = static_cast<int>(p.cols);  // < 2^31 (checked on the host)
  const int tpr = blockDim.x;
  const int chunk = tpr * kGroups * G;
  const bool fits = cols <= chunk;
  const bool has_weight = V::has_weight(p);
  const int kind = V::scale_kind(p);
  const bool learned_scale = kind == kScaleScalar || kind == kScaleVector;
  const C scale_scalar = scalar_scale<V>(p);
  const C dropout_scale = static_cast<C>(p.dropout_scale);
  const C weight_offset = static_cast<C>(p.weight_offset);
  const uint64_t seed = V::kHasDropout ? static_cast<uint64_t>(*p.seed) : 0;
  const Operand<T> weight{p.weight, 0, V::weight_f32(p)};
  const Operand<T> h_in{p.h, p.h_row_stride, V::h_f32(p)};
  const Operand<T> dh_in{p.dh_in, p.dh_in_row_stride, p.dh_in_f32};
  const Operand<T> residual{p.residual, p.residual_row_stride, V::residual_f32(p)};
  const Operand<T> scale_vector{p.residual_scale, 0, V::scale_f32(p)};
  const OutOperand<T> dresidual{p.dresidual, cols, V::residual_f32(p)};

  C xhat[kGroups][G], g[kGroups][G];
  // Column partials of this row group (dweight, dbias, dscale), one slot each when needed, in dynamic
  // shared memory rather than registers (5 register arrays of a row chunk spill at 128 registers).
  // Layout [slot][row group][k][i][thread]: each thread owns its cells (no synchronization), and a
  // warp's accesses to one (k, i) fall in 32 consecutive banks.
  extern __shared__ __align__(16) unsigned char partial_smem[];
  constexpr int kCells = kGroups * G;
  const bool has_bias = V::has_bias(p);
  int slots = 0;
  auto slot_cells = [&](bool needed) -> C* {
    if (!needed) return nullptr;
    C* base = reinterpret_cast<C*>(partial_smem) + (int64_t(slots++) * blockDim.y + threadIdx.y) * kCells * tpr;
    return base + threadIdx.x;
  };
  C* const dw = slot_cells(has_weight);
  C* const db = slot_cells(has_bias);
  C* const ds = slot_cells(learned_scale);
  auto zero = [&](C* acc) {
    if (acc == nullptr) return;
#pragma unroll
    for (int cell = 0; cell < kCells; ++cell) acc[cell * tpr] = C(0);
  };
  zero(dw);
  zero(db);
  zero(ds);

  const int64_t partial_row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  auto column = [&](int c0, int k) { return c0 + (k * tpr + static_cast<int>(threadIdx.x)) * G; };
  // Writes (add = false) or adds (add = true) a chunk of accumulators to this row group's partial row.
  auto flush = [&](void* buffer, const C* acc, int c0, bool add) {
    if (buffer == nullptr || acc == nullptr) return;
    C* out = static_cast<C*>(buffer) + partial_row * cols;
#pragma unroll
    for (int k = 0; k < kGroups; ++k) {
      const int col = column(c0, k);
#pragma unroll
      for (int i = 0; i < G; ++i) {
        const C value = acc[(k * G + i) * tpr];
        if (col + i < cols) out[col + i] = add ? out[col + i] + value : value;
      }
    }
  };

  // Fills xhat and g for one chunk of a row (0 outside it); with `accumulate`, adds the row's
  // dweight/dbias terms to the column partials.
  auto load_chunk = [&](int64_t row, bool active, int c0, C mean, C rstd, bool accumulate) {
#pragma unroll
    for (int k = 0; k < kGroups; ++k) {
      const int col = column(c0, k);
      if (active && col < cols) {
        C h[G], dy[G];
        if constexpr (V::kStoreH) {
          h_in.template load<G>(row, col, cols, p.vectorized, h);
        } else {
          pre_norm_sum<V>(p, row, col, seed, scale_scalar, dropout_scale, h);
        }
        load_group<T, G>(static_cast<const T*>(p.dy) + row * p.dy_row_stride, col, cols, p.vectorized, dy);
        C w[G];
        if (has_weight) {
          weight.template load<G>(0, col, cols, p.vectorized, w);
#pragma unroll
          for (int i = 0; i < G; ++i) w[i] += weight_offset;
        } else {
#pragma unroll
          for (int i = 0; i < G; ++i) w[i] = C(1);
        }
#pragma unroll
        for (int i = 0; i < G; ++i) {
          xhat[k][i] = V::kIsRms ? h[i] * rstd : (h[i] - mean) * rstd;
          g[k][i] = dy[i] * w[i];
          if (accumulate && has_weight) dw[(k * G + i) * tpr] += dy[i] * xhat[k][i];
          if (accumulate && has_bias) db[(k * G + i) * tpr] += dy[i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < G; ++i) xhat[k][i] = g[k][i] = C(0);
      }
    }
  };

  bool flushed = false;  // rows that do not fit: this row group's partial row holds data already
  const int64_t row_step = int64_t(gridDim.x) * blockDim.y;
  for (int64_t first_row = int64_t(blockIdx.x) * blockDim.y; first_row < p.rows; first_row += row_step) {
    const int64_t row = first_row + threadIdx.y;
    const bool active = row < p.rows;
    C mean = C(0), rstd = C(0);
    if (active) {
      if constexpr (!V::kIsRms) mean = static_cast<const C*>(p.mean)[row];
      rstd = static_cast<const C*>(p.rstd)[row];
    }

    // Pass A: sum(g) and sum(g * xhat) over the row; dweight/dbias partials.
    if (fits) load_chunk(row, active, 0, mean, rstd, true);
    C sums[2] = {C(0), C(0)};
    for (int c0 = 0; c0 < cols; c0 += chunk) {
      if (!fits) {
        zero(dw);
        zero(db);
        load_chunk(row, active, c0, mean, rstd, true);
      }
#pragma unroll
      for (int k = 0; k < kGroups; ++k) {
#pragma unroll
        for (int i = 0; i < G; ++i) {
          sums[0] += g[k][i];
          sums[1] += g[k][i] * xhat[k][i];
        }
      }
      if (!fits && active) {
        flush(p.dweight_partial, dw, c0, flushed);
        flush(p.dbias_partial, db, c0, flushed);
      }
    }
    row_allreduce(sums, scratch);
    const C mean_g = V::kIsRms ? C(0) : sums[0] / static_cast<C>(cols);
    const C mean_gxhat = sums[1] / static_cast<C>(cols);

    // Pass B: dh, dx, dresidual, dscale partials.
    for (int c0 = 0; c0 < cols; c0 += chunk) {
      if (!fits) {
        zero(ds);
        load_chunk(row, active, c0, mean, rstd, false);
      }
      if (!active) continue;
#pragma unroll
      for (int k = 0; k < kGroups; ++k) {
        const int col = column(c0, k);
        if (col >= cols) continue;
        C dh[G];
#pragma unroll
        for (int i = 0; i < G; ++i) dh[i] = rstd * (g[k][i] - mean_g - xhat[k][i] * mean_gxhat);
        if (p.has_dh_in) {
          C extra[G];
          dh_in.template load<G>(row, col, cols, p.vectorized, extra);
#pragma unroll
          for (int i = 0; i < G; ++i) dh[i] += extra[i];
        }
        C dx[G];
#pragma unroll
        for (int i = 0; i < G; ++i) {
          if constexpr (V::kHasDropout) {
            const uint64_t index = static_cast<uint64_t>(row * p.cols + col + i);
            dx[i] = dropout_keep(seed, index, p.keep_threshold) ? dh[i] * dropout_scale : C(0);
          } else {
            dx[i] = dh[i];
          }
        }
        store_group<T, G>(static_cast<T*>(p.dx) + row * cols, col, cols, p.vectorized, dx);
        if constexpr (V::kHasResidual) {
          C s[G];
          if (kind == kScaleVector) {
            scale_vector.template load<G>(0, col, cols, p.vectorized, s);
          } else {
#pragma unroll
            for (int i = 0; i < G; ++i) s[i] = scale_scalar;
          }
          if (p.store_dresidual) {
            C dr[G];
#pragma unroll
            for (int i = 0; i < G; ++i) dr[i] = kind == kScaleNone ? dh[i] : dh[i] * s[i];
            dresidual.template store<G>(row, col, cols, p.vectorized, dr);
          }
          if (learned_scale) {
            C r[G];
            residual.template load<G>(row, col, cols, p.vectorized, r);
#pragma unroll
            for (int i = 0; i < G; ++i) ds[(k * G + i) * tpr] += dh[i] * r[i];
          }
        }
      }
      if (!fits && active) flush(p.dscale_partial, ds, c0, flushed);
    }
    if (active) flushed = true;
  }

  // Every partial row is written in full, also by row groups that got no rows.
  if (fits) {
    flush(p.dweight_partial, dw, 0, false);
    flush(p.dbias_partial, db, 0, false);
    flush(p.dscale_partial, ds, 0, false);
  } else if (!flushed) {
    zero(dw);
    zero(db);
    zero(ds);
    for (int c0 = 0; c0 < cols; c0 += chunk) {
      flush(p.dweight_partial, dw, c0, false);
      flush(p.dbias_partial, db, c0, false);
      flush(p.dscale_partial, ds, c0, false);
    }
  }
}

// out[c] = sum of partial[r, c] over r = 0..rows-1: eight interleaved strands of r per column
// (each in increasing r), then the eight strand sums in strand order. The order depends only on
// (rows, cols), so the result is bit-identical run to run.
template <typename C, typename Out>
__global__ void column_sum_kernel(const C* partial, int64_t rows, int64_t cols, Out* out) {
  FUSEDNORM_SHARED C strands[8][33];
  const int64_t col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  C acc = C(0);
  if (col < cols) {
    for (int64_t r = threadIdx.y; r < rows; r += 8) acc += partial[r * cols + col];
  }
  strands[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    C total = C(0);
#pragma unroll
    for (int s = 0; s < 8; ++s) total += strands[s][threadIdx.x];
    out[col] = from_compute<Out>(total);
  }
}

#ifdef __CUDACC__  // the launchers (the CPU emulation launches the kernels itself)
template <typename C, typename Out>
cudaError_t launch_column_sum(const C* partial, int64_t rows, int64_t cols, Out* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((cols + 31) / 32)), block(32, 8);
  column_sum_kernel<C, Out><<<grid, block, 0, stream>>>(partial, rows, cols, out);
  return cudaGetLastError();
}

// Static flags: IS_RMS, HAS_RESIDUAL, HAS_DROPOUT, STORE_H (16 backward kernels per x dtype); the
// others are read from the params, as in the forward (see fwd_kernel.cuh).
template <typename V>
cudaError_t run_bwd(BwdParams& p, cudaStream_t stream, bool configure_only) {
  const auto kernel = bwd_kernel<V>;
  if (configure_only) {
    LaunchConfig cfg = p.launch;  // the block shape and shared memory (host.h); the grid follows
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(cfg.smem_bytes));
    if (err != cudaSuccess) return err;
    // The partition of the rows (and so the gradients' bits) must not depend on this device.
    cfg.grid = backward_grid(p.rows, cfg);
    p.launch = cfg;
    return cudaSuccess;
  }
  const LaunchConfig& cfg = p.launch;
  kernel<<<dim3(static_cast<unsigned>(cfg.grid)), dim3(cfg.threads_per_row, cfg.rows_per_block),
           static_cast<size_t>(cfg.smem_bytes), stream>>>(p);
  return cudaGetLastError();
}

// configure_only: set p.launch.grid (it fixes the number of partial rows, which the caller
// allocates); otherwise launch with p.launch.
template <typename T>
cudaError_t launch_bwd(BwdParams& p, cudaStream_t stream, bool configure_only) {
  return FUSEDNORM_BOOL_SWITCH(p.is_rms, IS_RMS, [&] {
    return FUSEDNORM_BOOL_SWITCH(p.has_residual, HAS_RESIDUAL, [&] {
      return FUSEDNORM_BOOL_SWITCH(p.has_dropout, HAS_DROPOUT, [&] {
        return FUSEDNORM_BOOL_SWITCH(p.store_h, STORE_H, [&] {
          return run_bwd<Variant<T, IS_RMS, HAS_RESIDUAL, HAS_DROPOUT, STORE_H>>(p, stream, configure_only);
        });
      });
    });
  });
}

#endif  // __CUDACC__

}  // namespace fusednorm
